"""Tool definitions, tool calls and reasoning: parsed and checked into the normalized message form.

Normalized (docs/design.md §2, "Tools and reasoning"):
  record  "tools":      [{"type": "function", "function": {"name", "description"?, "parameters"?}}, ...]
  assistant "tool_calls": [{"id", "type": "function", "function": {"name", "arguments": {JSON object}}}]
  assistant "reasoning":  str (from `reasoning_content`, `reasoning` or a leading `<think>…</think>`)
  {"role": "tool", "content", "tool_call_id", "name"}

Arguments are kept as the parsed object, not the JSON string: the published templates render them with
`tojson` (Qwen2.5, Llama-3.1), which would quote a string a second time. Every function here raises
`Bad(rule, message)`; data/validate.py turns that into `PATH:LINE: message (id)`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from data.flags import suggest

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class Bad(Exception):
    def __init__(self, rule: str, message: str):
        super().__init__(message)
        self.rule, self.message = rule, message


def reject_unknown(obj: dict, allowed, where: str) -> None:
    """A field the format does not have is a typo or a misread format: name it."""
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise Bad("unknown-field", f"{where}: unknown field(s) {', '.join(map(repr, unknown))}")


def parse_tools(value, where: str = "'tools'") -> list[dict] | None:
    """A record's `tools`: a list (or a JSON string of one, LLaMA-Factory's form) of functions, each either
    OpenAI's `{"type": "function", "function": {...}}` or a bare `{"name", "description", "parameters"}`; bare
    ones are wrapped, so training renders what an OpenAI-style client sends at inference. [] → None."""
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise Bad("bad-tools", f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, list):
        raise Bad("bad-tools", f"{where}: must be a list of functions, got {type(value).__name__}")
    out = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise Bad("bad-tools", f"{where}[{i}]: must be an object, got {type(tool).__name__}")
        if "function" in tool or "type" in tool:
            if tool.get("type", "function") != "function" or not isinstance(tool.get("function"), dict):
                raise Bad("bad-tools", f"{where}[{i}]: expected {{\"type\": \"function\", \"function\": {{...}}}}")
            fn = tool["function"]
        else:
            fn, tool = tool, {"type": "function", "function": tool}
        if not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise Bad("bad-tools", f"{where}[{i}]: the function has no 'name'")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise Bad("bad-tools", f"{where}[{i}] ({fn['name']}): 'parameters' must be a JSON-schema object")
        out.append(tool)
    names = [t["function"]["name"] for t in out]
    if len(set(names)) != len(names):
        raise Bad("bad-tools", f"{where}: function names repeat ({', '.join(sorted({n for n in names if names.count(n) > 1}))})")
    return out or None


def parse_arguments(value, where: str) -> dict:
    """`function.arguments`: a JSON string or an object; the result must be a JSON object."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as e:
            raise Bad("bad-arguments", f"{where}: arguments are not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, dict):
        raise Bad("bad-arguments", f"{where}: arguments must be a JSON object, got {type(value).__name__}")
    return value


def parse_tool_calls(value, where: str, first_id: str) -> list[dict]:
    """An assistant's `tool_calls` (OpenAI form). Ids missing in the data become `{first_id}_{k}`."""
    if not isinstance(value, list) or not value:
        raise Bad("bad-tool-call", f"{where}: 'tool_calls' must be a non-empty list")
    out = []
    for k, call in enumerate(value):
        at = f"{where} tool call {k}"
        if not isinstance(call, dict):
            raise Bad("bad-tool-call", f"{at}: must be an object, got {type(call).__name__}")
        reject_unknown(call, ("id", "type", "function", "index"), at)
        if call.get("type", "function") != "function":
            raise Bad("bad-tool-call", f"{at}: type must be 'function', got {call.get('type')!r}")
        fn = call.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise Bad("bad-tool-call", f"{at}: needs 'function': {{'name': str, 'arguments': ...}}")
        cid = call.get("id")
        if cid is not None and not isinstance(cid, str):
            raise Bad("bad-tool-call", f"{at}: 'id' must be a string")
        args = parse_arguments(fn.get("arguments", {}), f"{at} ({fn['name']})")
        out.append({"id": cid or f"{first_id}_{k}", "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def sharegpt_calls(value: str, where: str, first_id: str) -> list[dict]:
    """A ShareGPT `function_call` turn's value: a JSON object `{"name", "arguments"}` or a list of them (parallel)."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise Bad("bad-arguments", f"{where}: a function_call value must be JSON ({e.msg} at column {e.colno})") from None
    items = parsed if isinstance(parsed, list) else [parsed]
    calls = []
    for item in items:
        if not isinstance(item, dict) or "name" not in item:
            raise Bad("bad-tool-call", f"{where}: a function_call is {{\"name\": ..., \"arguments\": {{...}}}} or a list of them")
        calls.append({"function": {"name": item["name"], "arguments": item.get("arguments", item.get("parameters", {}))}})
    return parse_tool_calls(calls, where, first_id)


def split_inline_think(content: str) -> tuple[str | None, str]:
    """`<think>R</think>rest` at the start of a reply → (R, rest), stripped of the newlines around them as the
    Qwen3 template strips them; anything else → (None, content). An empty think block gives reasoning None."""
    head = content.lstrip()
    if not head.startswith(THINK_OPEN) or THINK_CLOSE not in head:
        return None, content
    inner, rest = head[len(THINK_OPEN):].split(THINK_CLOSE, 1)
    reasoning = inner.strip("\n")
    return (reasoning if reasoning.strip() else None), rest.lstrip("\n")


def check_tool_flow(msgs: list[dict], tool_names: set[str] | None, allow_undeclared: bool,
                    flags: Mapping[str, str] | None = None) -> None:
    """Calls, results and their order: a tool message answers a call made before it (by id, or the next
    unanswered one); calls name declared functions (unless allowed); a conversation does not end on a result."""
    pending: list[dict] = []
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            pending = [dict(c) for c in m.get("tool_calls", [])]
            ids = [c["id"] for c in pending]
            if len(set(ids)) != len(ids):
                raise Bad("bad-tool-call", f"message {i}: two tool calls share the id {next(x for x in ids if ids.count(x) > 1)!r}")
            for c in pending:
                name = c["function"]["name"]
                if not allow_undeclared and (tool_names is None or name not in tool_names):
                    declared = f"declared: {', '.join(sorted(tool_names))}" if tool_names else "the record declares no 'tools'"
                    raise Bad("undeclared-tool", f"message {i}: calls {name!r}, which is not in 'tools' ({declared}; "
                              f"{suggest('allow_undeclared_tools', 'accept it', flags)})")
        elif m["role"] == "tool":
            if not pending:
                raise Bad("orphan-tool-result", f"message {i}: a tool result with no tool call before it")
            cid = m.get("tool_call_id")
            if cid is None:
                call = next((c for c in pending if "_answered" not in c), None)
                if call is None:
                    raise Bad("orphan-tool-result", f"message {i}: more tool results than calls before it")
                m["tool_call_id"] = call["id"]
            else:
                call = next((c for c in pending if c["id"] == cid), None)
                if call is None:
                    raise Bad("unknown-tool-call-id", f"message {i}: tool_call_id {cid!r} matches no call before it "
                              f"(calls: {', '.join(c['id'] for c in pending)})")
            if "_answered" in call:
                raise Bad("unknown-tool-call-id", f"message {i}: a second result for tool call {call['id']!r}")
            call["_answered"] = True
            m.setdefault("name", call["function"]["name"])
        elif m["role"] == "user":
            pending = []
    if msgs and msgs[-1]["role"] == "tool":
        raise Bad("ends-on-tool-result", f"message {len(msgs) - 1}: the conversation ends on a tool result with no "
                  "assistant turn after it (nothing there to learn)")
