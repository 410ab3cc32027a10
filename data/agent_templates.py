"""Built-in templates for tool calling and reasoning: `qwen2.5`, `qwen3`, `llama-3.1`.

Each renders, byte for byte, what that family's published Jinja chat template renders for the same messages and
`tools` (tests/data/test_agent_templates.py compares them with the published templates, fetched as test assets),
but as pieces whose kind says who writes them (data/templates.py): the text a model emits for a turn — its
reasoning with the think tags, its reply, its tool-call text, its end of turn — begins exactly where that
template's generation prompt ends, so the tokens before a supervised turn are the inference prompt.

Messages are chattune's normalized form (data/toolcalls.py): `reasoning` is passed to the published templates as
`reasoning_content` where they read it (Qwen3) and otherwise written into the reply as a leading
`<think>\\n…\\n</think>\\n\\n` (Qwen2.5, Llama-3.1, and every older built-in), the form those models' users write.
"""

from __future__ import annotations

import json

from data.pieces import HEADER, Piece, TemplateError

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
HERMES_TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                     "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
HERMES_TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                     "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                     "\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n")
INLINE_THINK = ("<think>\n", "\n</think>\n\n")  # reasoning written into a reply, for templates without a field
EMPTY_THINK = "<think>\n\n</think>\n\n"  # what Qwen3 inserts for a turn without reasoning (never supervised)
LLAMA31_DATE = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
LLAMA31_TOOLS_USER = ("Given the following functions, please respond with a JSON for a function call with its proper "
                      "arguments that best answers the given prompt.\n\nRespond in the format {\"name\": function name, "
                      "\"parameters\": dictionary of argument name and its value}.Do not use variables.\n\n")


def tojson(value, indent: int | None = None) -> str:
    """transformers' `tojson` Jinja filter (no HTML escaping, non-ASCII kept)."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


def inline_reasoning(m: dict, i: int, text: str) -> list[Piece]:
    """A reply's text as pieces, led by its reasoning in `<think>` tags when it has some."""
    pieces = []
    if m.get("reasoning"):
        pieces += [Piece(INLINE_THINK[0], i, "reasoning_tag"), Piece(m["reasoning"], i, "reasoning"),
                   Piece(INLINE_THINK[1], i, "reasoning_tag")]
    if text:
        pieces.append(Piece(text, i, "content"))
    return pieces


def inline_reasoning_text(m: dict) -> str:
    """The reply text a template without a reasoning field is given (what `inline_reasoning` renders)."""
    return (INLINE_THINK[0] + m["reasoning"] + INLINE_THINK[1] if m.get("reasoning") else "") + m["content"]


def _hermes_call(call: dict, i: int, lead: list[Piece], raw_string_args: bool) -> list[Piece]:
    fn = call["function"]
    args = fn["arguments"]
    args_text = args if raw_string_args and isinstance(args, str) else tojson(args)
    return [*lead, Piece("<tool_call>\n{\"name\": \"", i, "call_tag"), Piece(fn["name"], i, "call"),
            Piece("\", \"arguments\": ", i, "call_tag"), Piece(args_text, i, "call"),
            Piece("}\n</tool_call>", i, "call_tag")]


def _hermes_system(messages: list[dict], tools, default: str | None) -> list[Piece]:
    has_system = bool(messages) and messages[0]["role"] == "system"
    owner = 0 if has_system else HEADER
    if tools:
        pieces = [Piece("<|im_start|>system\n", owner, "template")]
        if has_system:
            pieces += [Piece(messages[0]["content"], 0, "content"), Piece("\n\n", 0, "template")]
        elif default:
            pieces.append(Piece(default + "\n\n", HEADER, "template"))
        tool_text = "".join("\n" + tojson(t) for t in tools)  # data: never parsed for special tokens
        return pieces + [Piece(HERMES_TOOLS_HEAD, owner, "template"), Piece(tool_text, owner, "content"),
                         Piece(HERMES_TOOLS_TAIL, owner, "template")]
    if has_system:
        return [Piece("<|im_start|>system\n", 0, "template"), Piece(messages[0]["content"], 0, "content"),
                Piece("<|im_end|>\n", 0, "template")]
    return [Piece(f"<|im_start|>system\n{default}<|im_end|>\n", HEADER, "template")] if default else []


def _tool_result(messages: list[dict], i: int) -> list[Piece]:
    """Qwen's tool results: consecutive ones share one user turn, each in <tool_response> tags."""
    m, pieces = messages[i], []
    if i == 0 or messages[i - 1]["role"] != "tool":
        pieces.append(Piece("<|im_start|>user", i, "template"))
    pieces += [Piece("\n<tool_response>\n", i, "template"), Piece(m["content"], i, "content"),
               Piece("\n</tool_response>", i, "template")]
    if i == len(messages) - 1 or messages[i + 1]["role"] != "tool":
        pieces.append(Piece("<|im_end|>\n", i, "template"))
    return pieces


def _end(i: int) -> list[Piece]:
    return [Piece("<|im_end|>", i, "eot"), Piece("\n", i, "template")]


def _hermes(messages: list[dict], tools, default_system: str | None, assistant) -> list[Piece]:
    """The Qwen family's conversation: system (with the tools), then user turns, tool results grouped into user
    turns, and assistant turns as `assistant(i)` renders them (the part that differs between the families)."""
    pieces = _hermes_system(messages, tools, default_system)
    for i, m in enumerate(messages):
        if m["role"] == "system" and i == 0:
            continue
        if m["role"] == "tool":
            pieces += _tool_result(messages, i)
        elif m["role"] != "assistant":
            pieces += [Piece(f"<|im_start|>{m['role']}\n", i, "template"), Piece(m["content"], i, "content"),
                       Piece("<|im_end|>\n", i, "template")]
        else:
            pieces += assistant(i)
    return pieces


def qwen25(messages: list[dict], add_generation_prompt: bool, tools=None, thinking=None) -> list[Piece]:
    """Qwen2.5-Instruct: Hermes-style `<tool_call>` JSON blocks, tools listed in the system turn."""

    def assistant(i: int) -> list[Piece]:
        m = messages[i]
        text = inline_reasoning(m, i, m["content"])
        if not m.get("tool_calls"):
            return [Piece("<|im_start|>assistant\n", i, "template"), *text, *_end(i)]
        pieces = [Piece("<|im_start|>assistant", i, "template"), Piece("\n", i, "template"), *text]
        for k, call in enumerate(m["tool_calls"]):
            # the newline before the first call ends the generation prompt when nothing precedes the call
            lead = [Piece("\n", i, "call_tag")] if text or k else []
            pieces += _hermes_call(call, i, lead, raw_string_args=False)
        return pieces + _end(i)

    pieces = _hermes(messages, tools, QWEN_DEFAULT_SYSTEM, assistant)
    if add_generation_prompt:
        pieces.append(Piece("<|im_start|>assistant\n", HEADER, "template"))
    return pieces


def _qwen3_last_query(messages: list[dict]) -> int:
    """Index of the last real user query (not a tool response written as a user turn); reasoning of assistant
    turns after it is kept in the history, earlier turns' reasoning is dropped."""
    for i in range(len(messages) - 1, -1, -1):
        c = messages[i]["content"]
        if messages[i]["role"] == "user" and not (c.startswith("<tool_response>") and c.endswith("</tool_response>")):
            return i
    return len(messages) - 1


def _qwen3_reasoning(m: dict) -> tuple[str, str]:
    """(reply, reasoning) as the Qwen3 template reads them: the field, else a `</think>` split of the reply."""
    content = m["content"]
    if m.get("reasoning") is not None:
        return content, m["reasoning"]
    if "</think>" in content:
        return (content.split("</think>")[-1].lstrip("\n"),
                content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n"))
    return content, ""


def qwen3(messages: list[dict], add_generation_prompt: bool, tools=None, thinking=None) -> list[Piece]:
    """Qwen3: `<think>` blocks; reasoning kept only for turns after the last user query; a last turn without
    reasoning gets an empty think block (the `enable_thinking=False` generation prompt, so never supervised)."""
    last_query = _qwen3_last_query(messages)

    def assistant(i: int) -> list[Piece]:
        content, reasoning = _qwen3_reasoning(messages[i])
        pieces = [Piece("<|im_start|>assistant\n", i, "template")]
        shown = content
        if i > last_query and (i == len(messages) - 1 or reasoning):
            if reasoning.strip("\n"):
                pieces += [Piece("<think>\n", i, "reasoning_tag"), Piece(reasoning.strip("\n"), i, "reasoning"),
                           Piece("\n</think>\n\n", i, "reasoning_tag")]
            else:
                pieces.append(Piece(EMPTY_THINK, i, "template"))
            shown = content.lstrip("\n")
        if shown:
            pieces.append(Piece(shown, i, "content"))
        for k, call in enumerate(messages[i].get("tool_calls") or []):
            lead = [Piece("\n", i, "call_tag")] if (k == 0 and content) or k else []
            pieces += _hermes_call(call, i, lead, raw_string_args=True)
        return pieces + _end(i)

    pieces = _hermes(messages, tools, None, assistant)
    if add_generation_prompt:
        pieces.append(Piece("<|im_start|>assistant\n" + (EMPTY_THINK if thinking is False else ""), HEADER, "template"))
    return pieces


def llama31(messages: list[dict], add_generation_prompt: bool, tools=None, thinking=None) -> list[Piece]:
    """Llama-3.1-Instruct: JSON tool calls (`{"name", "parameters"}`, one per turn), results as `ipython` turns
    (JSON-quoted, as Meta's template writes them), tools in the first user turn."""
    pieces = [Piece("<|begin_of_text|>", HEADER, "template")]
    start = 0
    owner = HEADER
    system = ""
    if messages and messages[0]["role"] == "system":
        start, owner, system = 1, 0, messages[0]["content"].strip()
    head = "<|start_header_id|>system<|end_header_id|>\n\n" + ("Environment: ipython\n" if tools else "") + LLAMA31_DATE
    pieces.append(Piece(head, owner, "template"))
    if system:
        pieces.append(Piece(system, 0, "content"))
    pieces.append(Piece("<|eot_id|>", owner, "template"))
    rest = list(range(start, len(messages)))
    if tools:
        if not rest:
            raise TemplateError("llama-3.1 puts tools in the first user turn, and there is none")
        first = rest.pop(0)
        tool_text = "".join(tojson(t, indent=4) + "\n\n" for t in tools)
        pieces += [Piece("<|start_header_id|>user<|end_header_id|>\n\n" + LLAMA31_TOOLS_USER, first, "template"),
                   Piece(tool_text, first, "content"),  # data: never parsed for special tokens
                   Piece(messages[first]["content"].strip(), first, "content"), Piece("<|eot_id|>", first, "template")]
    for i in rest:
        m = messages[i]
        if m["role"] == "tool":
            pieces += [Piece("<|start_header_id|>ipython<|end_header_id|>\n\n", i, "template"),
                       Piece(tojson(m["content"]), i, "content"), Piece("<|eot_id|>", i, "template")]
        elif m.get("tool_calls"):
            if len(m["tool_calls"]) != 1:
                raise TemplateError(f"llama-3.1 supports one tool call per assistant turn; message {i} has "
                                    f"{len(m['tool_calls'])} (use qwen2.5 or qwen3 for parallel calls)")
            fn = m["tool_calls"][0]["function"]
            pieces += [Piece("<|start_header_id|>assistant<|end_header_id|>\n\n", i, "template"),
                       Piece("{\"name\": \"", i, "call_tag"), Piece(fn["name"], i, "call"),
                       Piece("\", \"parameters\": ", i, "call_tag"), Piece(tojson(fn["arguments"]), i, "call"),
                       Piece("}", i, "call_tag"), Piece("<|eot_id|>", i, "eot")]
        else:
            assistant = m["role"] == "assistant"
            text = inline_reasoning(m, i, m["content"].rstrip()) if assistant and m.get("reasoning") else \
                [Piece(m["content"].strip(), i, "content")]
            pieces += [Piece(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", i, "template"), *text,
                       Piece("<|eot_id|>", i, "eot" if assistant else "template")]
    if add_generation_prompt:
        pieces.append(Piece("<|start_header_id|>assistant<|end_header_id|>\n\n", HEADER, "template"))
    return pieces


# --- the same three as Jinja, for exported tokenizers (`chat_template`) ----------------------------------------------
# Our own sources (written for chattune, not copied): the published templates' output for OpenAI-style messages
# (`reasoning_content`, `tool_calls` with arguments as an object or a JSON string, `tool` messages), which is what
# the renderers above produce from normalized ones. tests/data/test_agent_export.py proves ids equal training's.


def _q(text: str) -> str:
    return repr(text)


_JINJA_ARGS = "(f.arguments if f.arguments is string else f.arguments | tojson)"
_JINJA_TOOL_RESULT = (
    "{%- elif m.role == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- " + _q("\n<tool_response>\n") + " + m.content + " + _q("\n</tool_response>") + " -}}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- " + _q("<|im_end|>\n") + " -}}{%- endif -%}"
)


def _jinja_hermes_system(default: str | None) -> str:
    with_default = "{%- else -%}{{- " + _q(default + "\n\n") + " -}}" if default else ""
    plain_default = ("{%- else -%}{{- " + _q(f"<|im_start|>system\n{default}<|im_end|>\n") + " -}}") if default else ""
    return (
        "{%- if tools -%}{{- " + _q("<|im_start|>system\n") + " -}}"
        "{%- if messages[0].role == 'system' -%}{{- messages[0].content + " + _q("\n\n") + " -}}" + with_default + "{%- endif -%}"
        "{{- " + _q(HERMES_TOOLS_HEAD) + " -}}{%- for t in tools -%}{{- " + _q("\n") + " + (t | tojson) -}}{%- endfor -%}"
        "{{- " + _q(HERMES_TOOLS_TAIL) + " -}}"
        "{%- elif messages[0].role == 'system' -%}{{- " + _q("<|im_start|>system\n") + " + messages[0].content + "
        + _q("<|im_end|>\n") + " -}}" + plain_default + "{%- endif -%}"
    )


JINJA_QWEN25 = (
    _jinja_hermes_system(QWEN_DEFAULT_SYSTEM)
    + "{%- for m in messages -%}{%- if m.role == 'system' and loop.first -%}" + _JINJA_TOOL_RESULT
    + "{%- elif m.role != 'assistant' -%}{{- '<|im_start|>' + m.role + " + _q("\n") + " + m.content + "
    + _q("<|im_end|>\n") + " -}}"
    "{%- else -%}{%- set r = m.reasoning_content if m.reasoning_content is defined and m.reasoning_content else '' -%}"
    "{%- set text = (" + _q(INLINE_THINK[0]) + " + r + " + _q(INLINE_THINK[1]) + " if r else '') + (m.content if m.content else '') -%}"
    "{%- if not m.tool_calls -%}{{- " + _q("<|im_start|>assistant\n") + " + text + '<|im_end|>' + " + _q("\n") + " -}}"
    "{%- else -%}{{- '<|im_start|>assistant' -}}{%- if text -%}{{- " + _q("\n") + " + text -}}{%- endif -%}"
    "{%- for c in m.tool_calls -%}{%- set f = c.function -%}"
    "{{- " + _q('\n<tool_call>\n{"name": "') + " + f.name + " + _q('", "arguments": ') + " + " + _JINJA_ARGS + " + "
    + _q("}\n</tool_call>") + " -}}{%- endfor -%}{{- " + _q("<|im_end|>\n") + " -}}{%- endif -%}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- " + _q("<|im_start|>assistant\n") + " -}}{%- endif -%}"
)

JINJA_QWEN3 = (
    _jinja_hermes_system(None)
    + "{%- set ns = namespace(found=false, last_query=messages|length - 1) -%}"
    "{%- for m in messages[::-1] -%}{%- if not ns.found and m.role == 'user' and not (m.content.startswith('<tool_response>')"
    " and m.content.endswith('</tool_response>')) -%}{%- set ns.found = true -%}"
    "{%- set ns.last_query = messages|length - 1 - loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}{%- if m.role == 'system' and loop.first -%}" + _JINJA_TOOL_RESULT
    + "{%- elif m.role != 'assistant' -%}{{- '<|im_start|>' + m.role + " + _q("\n") + " + m.content + "
    + _q("<|im_end|>\n") + " -}}"
    "{%- else -%}{%- set content = m.content if m.content else '' -%}"
    "{%- if m.reasoning_content is defined and m.reasoning_content is not none -%}{%- set reasoning = m.reasoning_content -%}"
    "{%- elif '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].rstrip(" + _q("\n") + ").split('<think>')[-1].lstrip(" + _q("\n") + ") -%}"
    "{%- set content = content.split('</think>')[-1].lstrip(" + _q("\n") + ") -%}"
    "{%- else -%}{%- set reasoning = '' -%}{%- endif -%}"
    "{{- " + _q("<|im_start|>assistant\n") + " -}}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}"
    "{%- if reasoning.strip(" + _q("\n") + ") -%}{{- " + _q("<think>\n") + " + reasoning.strip(" + _q("\n") + ") + "
    + _q("\n</think>\n\n") + " -}}{%- else -%}{{- " + _q(EMPTY_THINK) + " -}}{%- endif -%}"
    "{{- content.lstrip(" + _q("\n") + ") -}}{%- else -%}{{- content -}}{%- endif -%}"
    "{%- for c in (m.tool_calls if m.tool_calls else []) -%}{%- set f = c.function -%}"
    "{%- if (loop.first and content) or not loop.first -%}{{- " + _q("\n") + " -}}{%- endif -%}"
    "{{- " + _q('<tool_call>\n{"name": "') + " + f.name + " + _q('", "arguments": ') + " + " + _JINJA_ARGS + " + "
    + _q("}\n</tool_call>") + " -}}{%- endfor -%}{{- " + _q("<|im_end|>\n") + " -}}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- " + _q("<|im_start|>assistant\n") + " -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- " + _q(EMPTY_THINK) + " -}}{%- endif -%}{%- endif -%}"
)

JINJA_LLAMA31 = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- if messages[0].role == 'system' -%}{%- set system = messages[0].content | trim -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set system = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{{- " + _q("<|start_header_id|>system<|end_header_id|>\n\n") + " -}}"
    "{%- if tools -%}{{- " + _q("Environment: ipython\n") + " -}}{%- endif -%}"
    "{{- " + _q(LLAMA31_DATE) + " + system + '<|eot_id|>' -}}"
    "{%- if tools -%}{{- " + _q("<|start_header_id|>user<|end_header_id|>\n\n" + LLAMA31_TOOLS_USER) + " -}}"
    "{%- for t in tools -%}{{- (t | tojson(indent=4)) + " + _q("\n\n") + " -}}{%- endfor -%}"
    "{{- (loop_messages[0].content | trim) + '<|eot_id|>' -}}{%- set loop_messages = loop_messages[1:] -%}{%- endif -%}"
    "{%- for m in loop_messages -%}"
    "{%- if m.role == 'tool' or m.role == 'ipython' -%}{{- " + _q("<|start_header_id|>ipython<|end_header_id|>\n\n")
    + " + (m.content | tojson) + '<|eot_id|>' -}}"
    "{%- elif m.tool_calls -%}{%- set f = m.tool_calls[0].function -%}"
    "{{- " + _q('<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "') + " + f.name + "
    + _q('", "parameters": ') + " + " + _JINJA_ARGS + " + '}<|eot_id|>' -}}"
    "{%- else -%}{{- '<|start_header_id|>' + m.role + " + _q("<|end_header_id|>\n\n") + " -}}"
    "{%- if m.role == 'assistant' and m.reasoning_content is defined and m.reasoning_content -%}"
    "{{- " + _q(INLINE_THINK[0]) + " + m.reasoning_content + " + _q(INLINE_THINK[1]) + " + m.content.rstrip() -}}"
    "{%- else -%}{{- m.content | trim -}}{%- endif -%}{{- '<|eot_id|>' -}}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- " + _q("<|start_header_id|>assistant<|end_header_id|>\n\n") + " -}}{%- endif -%}"
)
