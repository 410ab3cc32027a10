"""Reading a reply back into OpenAI's fields (tool_calls, reasoning_content, content), whole and streamed, and
the request side (messages with tool history, tools, tool_choice) — pure functions, no model."""

from __future__ import annotations

import json

import pytest

from serve.tool_parsing import (
    StreamParser,
    ToolRequestError,
    call_format,
    forced_call_prefix,
    parse_reply,
    request_messages,
    request_tools,
)

KNOWN = {"calc", "get_weather"}
HERMES_CALL = '<tool_call>\n{"name": "calc", "arguments": {"expr": "1+1"}}\n</tool_call>'
CASES = [  # (format, model output, reasoning, content, [(name, arguments)])
    ("hermes", "<think>\nplan it\n</think>\n\nLet me check.\n" + HERMES_CALL, "plan it", "Let me check.",
     [("calc", {"expr": "1+1"})]),
    ("hermes", HERMES_CALL + "\n" + HERMES_CALL.replace("calc", "get_weather").replace('"expr": "1+1"', '"city": "Oslo"'),
     None, "", [("calc", {"expr": "1+1"}), ("get_weather", {"city": "Oslo"})]),
    ("hermes", HERMES_CALL.replace("calc", "unknown_fn"), None, HERMES_CALL.replace("calc", "unknown_fn"), []),
    ("hermes", "<tool_call>{not json</tool_call>", None, "<tool_call>{not json</tool_call>", []),
    ("hermes", HERMES_CALL + "<tool_call>{bad", None, HERMES_CALL + "<tool_call>{bad", []),  # all or nothing
    ("hermes", "<think>\nshort\n</think>\n\nPlain <tool text.", "short", "Plain <tool text.", []),
    ("hermes", "Let me.\n" + HERMES_CALL + " then " + HERMES_CALL + "\nDone.", None, "Let me.\nthen\nDone.",
     [("calc", {"expr": "1+1"}), ("calc", {"expr": "1+1"})]),  # text between and after calls is kept
    ("hermes", "Hi\n" + HERMES_CALL.replace("calc", "zz"), None, "Hi\n" + HERMES_CALL.replace("calc", "zz"), []),
    ("llama-json", '{"name": "calc", "parameters": {"expr": "2"}}', None, "", [("calc", {"expr": "2"})]),
    ("llama-json", '{"name": "calc", "parameters": ', None, '{"name": "calc", "parameters": ', []),
    ("llama-json", "The answer is 4.", None, "The answer is 4.", []),
]


@pytest.mark.parametrize("fmt,text,reasoning,content,calls", CASES)
def test_replies_parse_whole_and_streamed_alike(fmt, text, reasoning, content, calls):
    parsed = parse_reply(text, fmt, KNOWN)
    assert parsed.reasoning == reasoning and parsed.content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls] == calls
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in parsed.tool_calls)
    for step in (1, 2, 3, 7):  # any split into deltas gives the same fields
        sp = StreamParser(fmt, KNOWN)
        events = [e for k in range(0, len(text), step) for e in sp.feed(text[k:k + step])]
        tail, streamed_calls = sp.finish()
        events += tail
        got = {f: "".join(t for g, t in events if g == f) for f in ("reasoning_content", "content")}
        assert got["reasoning_content"] == (reasoning or "")
        assert got["content"] == content
        assert [c["function"]["name"] for c in streamed_calls] == [n for n, _ in calls]


def test_without_tools_nothing_is_parsed_as_a_call():
    assert parse_reply(HERMES_CALL, "hermes", None).content == HERMES_CALL
    assert parse_reply("<think>", "hermes", None).reasoning is None  # an unfinished think holds nothing
    assert parse_reply("I was thinking", "hermes", None, think_opened=True).reasoning == "I was thinking"


def test_call_formats_and_forced_call_prefix(tokenizers):
    tools = [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}]
    assert call_format("qwen2.5") == call_format("qwen3") == "hermes" and call_format("llama-3.1") == "llama-json"
    assert call_format("vicuna_v1.1") is None
    assert forced_call_prefix("qwen2.5", None, "calc", tools) == '<tool_call>\n{"name": "calc", "arguments": '
    assert forced_call_prefix("llama-3.1", None, "calc", tools) == '{"name": "calc", "parameters": '
    assert forced_call_prefix("qwen3", None, "", tools) == '<tool_call>\n{"name": "'  # "required": any function


def test_request_messages_and_tools_are_checked_with_the_parameter_named():
    msgs = request_messages([
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": None, "reasoning_content": "use calc",
         "tool_calls": [{"id": "a", "type": "function", "function": {"name": "calc", "arguments": "{\"expr\": \"2+2\"}"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "4"}], 16)
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == {"expr": "2+2"} and msgs[1]["reasoning"] == "use calc"
    assert msgs[2] == {"role": "tool", "content": "4", "tool_call_id": "a"}
    bad = [
        ([{"role": "tool", "content": "4"}], "messages"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "messages"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None,
                                              "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]},
          {"role": "tool", "content": "1"}], "messages"),
    ]
    for body, param in bad:
        with pytest.raises(ToolRequestError) as err:
            request_messages(body, 16)
        assert err.value.param == param
    tools = [{"type": "function", "function": {"name": "calc"}}]
    assert request_tools({"tools": tools}, "hermes") == (tools, None)
    assert request_tools({"tools": tools, "tool_choice": "none"}, "hermes") == (None, None)
    assert request_tools({"tools": tools, "tool_choice": "required"}, "hermes") == (tools, "")
    assert request_tools({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "calc"}}},
                         "hermes") == (tools, "calc")
    for body, fmt, param in [({"tools": tools, "tool_choice": {"function": {"name": "nope"}}}, "hermes", "tool_choice"),
                             ({"tools": "x"}, "hermes", "tools"), ({"tools": tools}, None, "tools"),
                             ({"tool_choice": "required"}, "hermes", "tool_choice"),
                             ({"tools": [], "tool_choice": "required"}, "hermes", "tool_choice"),
                             ({"tools": tools, "tool_choice": {"type": "function", "function": "calc"}}, "hermes",
                              "tool_choice")]:
        with pytest.raises(ToolRequestError) as err:
            request_tools(body, fmt)
        assert err.value.param == param


@pytest.mark.parametrize("visible", [True, False])
def test_cli_shows_reasoning_apart_from_the_reply_or_hides_it(visible, capsys):
    from serve.cli import SimpleIO, show_reply

    io, shown, thought = SimpleIO(), [], []
    parser = StreamParser(None, None)
    text = "<think>\nweigh it\n</think>\n\nThe reply."
    for k in range(0, len(text), 4):
        show_reply(io, parser.feed(text[k:k + 4]), shown, thought, visible)
    show_reply(io, parser.finish()[0], shown, thought, visible)
    out = capsys.readouterr().out
    assert "".join(shown) == "The reply." and "".join(thought) == "weigh it"
    assert out == ("weigh it\nThe reply." if visible else "The reply.")  # the thought on its own line, then the reply
