"""A model's reply, read back into OpenAI's fields: `reasoning_content`, `content` and `tool_calls`.

The formats are the ones training rendered (data/agent_templates.py): a leading `<think>…</think>` block, then
either Hermes-style `<tool_call>{"name", "arguments"}</tool_call>` blocks (Qwen2.5, Qwen3, and any model template
that uses them) or Llama-3.1's bare `{"name", "parameters"}` JSON reply. Parsing is all or nothing: a reply whose
call blocks are not all well formed JSON naming a known function stays plain content (never an error).

`StreamParser` does the same on a token stream: reasoning and content are passed on as they come, except text
that may still turn out to be a tool call, which is held back until it is certain either way.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def call_format(template: str, tokenizer=None) -> str | None:
    """How this template's model writes tool calls: "hermes", "llama-json" or None (no tool-call format)."""
    if template in ("qwen2.5", "qwen3"):
        return "hermes"
    if template == "llama-3.1":
        return "llama-json"
    if template == "tokenizer" and tokenizer is not None:
        source = tokenizer.chat_template or ""
        if HERMES_OPEN in source:
            return "hermes"
        if '"parameters": ' in source:
            return "llama-json"
    return None


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


@dataclass
class Parsed:
    content: str
    reasoning: str | None = None
    tool_calls: list[dict] = field(default_factory=list)


def split_reasoning(text: str, opened: bool = False) -> tuple[str | None, str]:
    """(reasoning, rest) of a reply that starts with a think block (or continues one its prompt `opened`)."""
    head = text.lstrip()
    if not opened:
        if not head.startswith(THINK_OPEN):
            return None, text
        head = head[len(THINK_OPEN):]
    if THINK_CLOSE not in head:  # stopped while thinking (max_tokens): all of it is reasoning
        return head.strip("\n") or None, ""
    inner, rest = head.split(THINK_CLOSE, 1)
    return inner.strip("\n") or None, rest.lstrip("\n")


def _call(name, args, known: set[str] | None) -> dict | None:
    if not isinstance(name, str) or (known is not None and name not in known):
        return None
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": new_call_id(), "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


def _outside_calls(text: str) -> str:
    """The text between and after a reply's call blocks, each stretch stripped, one per line."""
    return "\n".join(part.strip() for part in _HERMES_BLOCK.split(text)[::2] if part.strip())


def _join(head: str, tail: str) -> str:
    return head + ("\n" if head and tail else "") + tail


def parse_calls(text: str, fmt: str | None, known: set[str] | None) -> tuple[str, list[dict]]:
    """(content, tool calls) of a reply after its reasoning; ("text", []) whenever anything is malformed."""
    if fmt == "hermes" and HERMES_OPEN in text:
        blocks = _HERMES_BLOCK.findall(text)
        if not blocks or text.count(HERMES_OPEN) != len(blocks):
            return text, []
        calls = []
        for block in blocks:
            try:
                obj = json.loads(block)
            except json.JSONDecodeError:
                return text, []
            call = _call(obj.get("name"), obj.get("arguments", {}), known) if isinstance(obj, dict) else None
            if call is None:
                return text, []
            calls.append(call)
        first = text.index(HERMES_OPEN)
        return _join(text[:first].rstrip(), _outside_calls(text[first:])), calls
    if fmt == "llama-json":
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if body.startswith("{"):
            try:
                obj = json.loads(body)
            except json.JSONDecodeError:
                return text, []
            if isinstance(obj, dict):
                call = _call(obj.get("name"), obj.get("parameters", obj.get("arguments")), known)
                if call is not None:
                    return "", [call]
    return text, []


def parse_reply(text: str, fmt: str | None, known: set[str] | None, think_opened: bool = False) -> Parsed:
    reasoning, rest = split_reasoning(text, think_opened)
    content, calls = parse_calls(rest, fmt, known) if known is not None else (rest, [])
    return Parsed(content, reasoning, calls)


def _partial_suffix(text: str, tag: str, space: str = "") -> int:
    """Length of the longest end of `text` that begins `tag` (a tag split across deltas), with the `space`
    characters before it (stripped when the tag comes)."""
    k = max((k for k in range(1, len(tag)) if text.endswith(tag[:k])), default=0)
    while k < len(text) and text[len(text) - k - 1] in space:
        k += 1
    return k


def prompt_opens_think(template: str, tokenizer) -> bool:
    """Does the generation prompt already open a think block (QwQ)? Then the reply starts inside it."""
    from data.templates import render_text

    try:
        prompt = render_text([{"role": "user", "content": "x"}], template, tokenizer, add_generation_prompt=True)
    except ValueError:
        return False
    return prompt.rstrip().endswith("<think>")


class StreamParser:
    """Incremental `parse_reply`: `feed(delta)` → [(field, text)] with field "reasoning_content" or "content";
    `finish()` → (the last such events, tool calls). Held-back text is released once it cannot start a call."""

    def __init__(self, fmt: str | None, known: set[str] | None, think_opened: bool = False):
        self.fmt, self.known = fmt, known
        self.buf = ""
        self.state = "reasoning" if think_opened else "start"  # start → reasoning? → content (→ held)
        self.held = False  # content from here on may be a tool call: keep it until the end
        self.after_think = False
        self.gap = ""  # whitespace held back before a call's opening tag
        self.reasoned = False  # some reasoning was passed on
        self.content = ""

    def feed(self, delta: str) -> list[tuple[str, str]]:
        self.buf += delta
        out: list[tuple[str, str]] = []
        if self.state == "start":
            head = self.buf.lstrip()
            if head.startswith(THINK_OPEN):
                self.buf, self.state = head[len(THINK_OPEN):].lstrip("\n"), "reasoning"
            elif THINK_OPEN.startswith(head):
                return out  # could still be the opening tag
            else:
                self.state = "content"
        if self.state == "reasoning":
            if THINK_CLOSE in self.buf:
                inner, rest = self.buf.split(THINK_CLOSE, 1)
                inner = inner.rstrip("\n") if self.reasoned else inner.lstrip().rstrip("\n")
                if inner:
                    out.append(("reasoning_content", inner))
                self.buf, self.state, self.after_think = rest.lstrip("\n"), "content", True
            else:
                if not self.reasoned:
                    self.buf = self.buf.lstrip()
                keep = _partial_suffix(self.buf, THINK_CLOSE, "\n")
                emit = self.buf[:len(self.buf) - keep]
                if emit:
                    out.append(("reasoning_content", emit))
                    self.reasoned = True
                self.buf = self.buf[len(emit):]
                return out
        if self.after_think and not self.content:  # the reply after a think block starts at its text
            self.buf = self.buf.lstrip("\n")
        if self.state == "content" and not self.held:
            emit = self._content_ready()
            if emit:
                out.append(("content", emit))
                self.content += emit
        return out

    def _content_ready(self) -> str:
        """Content that cannot be part of a tool call (taken off the buffer); sets `held` once a call may begin."""
        if self.known is not None and self.fmt == "hermes":
            at = self.buf.find(HERMES_OPEN)
            if at >= 0:
                emit = self.buf[:at].rstrip()
                self.gap, self.buf, self.held = self.buf[len(emit):at], self.buf[at:], True
                return emit
            # a call's tag may be split across deltas; whitespace before a call is not part of the reply
            keep = _partial_suffix(self.buf, HERMES_OPEN, " \n\t")
        elif self.known is not None and self.fmt == "llama-json" and not self.content.strip():
            head = self.buf.lstrip()
            if head.startswith(("{", "<|python_tag|>")):
                self.held = True
                return ""
            if not head or "<|python_tag|>".startswith(head):
                return ""  # only whitespace or part of the tag so far: wait
            keep = 0
        else:
            keep = 0
        emit, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return emit

    def finish(self) -> tuple[list[tuple[str, str]], list[dict]]:
        if self.state == "reasoning":
            return ([("reasoning_content", self.buf)] if self.buf.strip() else []), []
        if self.state == "start":
            return ([("content", self.buf)] if self.buf else []), []
        if self.held:
            content, calls = parse_calls(self.content + self.gap + self.buf, self.fmt, self.known)
            if calls:
                tail = _outside_calls(self.buf) if self.fmt == "hermes" else ""
                return ([("content", ("\n" if self.content and tail else "") + tail)] if tail else []), calls
            return ([("content", self.gap + self.buf)] if self.gap + self.buf else []), []
        return ([("content", self.buf)] if self.buf else []), []


# --- the request side: OpenAI `messages` with tools, `tools`, `tool_choice` ----------------------------------------


class ToolRequestError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def request_messages(msgs: list, max_messages: int) -> list[dict]:
    """OpenAI chat messages → chattune's normalized messages (data/toolcalls.py): system/user/assistant/tool,
    assistant `tool_calls` (arguments parsed) and `reasoning_content`. Errors name `messages[i]`."""
    from data.toolcalls import Bad, parse_tool_calls

    if not isinstance(msgs, list) or not msgs:
        raise ToolRequestError("'messages' must be a non-empty list", "messages")
    if len(msgs) > max_messages:
        raise ToolRequestError(f"'messages' has {len(msgs)} entries; at most {max_messages} are allowed", "messages")
    out: list[dict] = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ToolRequestError(f"messages[{i}] must be an object", "messages")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant", "tool"):
            raise ToolRequestError(f"messages[{i}].role must be system, user, assistant or tool, got {role!r}", "messages")
        if isinstance(content, list):  # [{"type": "text", "text": ...}] parts
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise ToolRequestError(f"messages[{i}].content parts must all be text", "messages")
            content = "".join(p["text"] for p in content)
        if content is None and role == "assistant" and m.get("tool_calls"):
            content = ""
        if not isinstance(content, str):
            raise ToolRequestError(f"messages[{i}].content must be a string", "messages")
        if role == "system" and i != 0:
            raise ToolRequestError(f"messages[{i}]: a system message may only come first", "messages")
        msg: dict = {"role": role, "content": content}
        if role == "assistant":
            try:
                if m.get("tool_calls"):
                    msg["tool_calls"] = parse_tool_calls(m["tool_calls"], f"messages[{i}]", f"call_{i}")
            except Bad as e:
                raise ToolRequestError(e.message, "messages") from None
            reasoning = m.get("reasoning_content")
            if isinstance(reasoning, str) and reasoning.strip():
                msg["reasoning"] = reasoning.strip("\n")
        elif role == "tool":
            if not out or not (out[-1].get("tool_calls") or out[-1]["role"] == "tool"):
                raise ToolRequestError(f"messages[{i}]: a tool result must follow an assistant message with tool_calls",
                                       "messages")
            for key in ("tool_call_id", "name"):
                if isinstance(m.get(key), str):
                    msg[key] = m[key]
        out.append(msg)
    start = 1 if out[0]["role"] == "system" else 0
    for j, m in enumerate(out[start:]):
        prev = out[start + j - 1]["role"] if j else None
        ok = {None: ("user",), "user": ("assistant",), "assistant": ("user", "tool"), "tool": ("tool", "assistant", "user")}
        if m["role"] not in ok[prev]:
            raise ToolRequestError(f"messages[{start + j}] cannot be a {m['role']} message after "
                                   f"{'the start' if prev is None else 'a ' + prev + ' message'}", "messages")
    if out[-1]["role"] not in ("user", "tool"):
        raise ToolRequestError("the last message must be from the user or a tool", "messages")
    return out


def request_tools(body: dict, fmt: str | None) -> tuple[list[dict] | None, str | None]:
    """(the tools to render, the function the reply must call: None for no constraint, "" for any) from `tools` and
    `tool_choice` ("auto", "none", "required" or {"type": "function", "function": {"name"}}). "none" renders no
    tools and parses no calls."""
    from data.toolcalls import Bad, parse_tools

    if body.get("tools") is None:
        if body.get("tool_choice") not in (None, "none", "auto"):
            raise ToolRequestError("'tool_choice' needs 'tools'", "tool_choice")
        return None, None
    try:
        tools = parse_tools(body["tools"], "'tools'")
    except Bad as e:
        raise ToolRequestError(e.message, "tools") from None
    if tools and fmt is None:
        raise ToolRequestError("this model's chat template has no tool-call format", "tools")
    choice = body.get("tool_choice", "auto")
    if choice == "none":
        return None, None
    if choice == "auto":
        return tools, None
    if choice == "required":
        if not tools:
            raise ToolRequestError("'tool_choice' required needs at least one function in 'tools'", "tool_choice")
        return tools, ""  # a call, to a function the model picks
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    declared = [t for t in tools or [] if t["function"]["name"] == name]
    if not declared:
        raise ToolRequestError("'tool_choice' must be auto, none, required or {\"type\": \"function\", \"function\": "
                               "{\"name\": ...}} naming one of 'tools'", "tool_choice")
    return declared, name


def forced_call_prefix(template: str, tokenizer, name: str, tools: list[dict]) -> str:
    """The text a reply that calls `name` starts with, up to its arguments (what the model is made to begin with
    for a named `tool_choice`; name "": up to the function's name, for "required"), rendered by the training
    template itself."""
    from data.pieces import OUTPUT_KINDS
    from data.templates import render_pieces

    probe = name or tools[0]["function"]["name"]
    msgs = [{"role": "user", "content": "x"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": probe, "arguments": {}}}]}]
    pieces = [p for p in render_pieces(msgs, template, tokenizer, tools=tools) if p.msg == 1 and p.kind in OUTPUT_KINDS]
    prefix = ""
    for p in pieces:
        if p.kind == "call" and (not name or p.text != name):  # the name (for "required") or the arguments
            return prefix
        prefix += p.text
    raise ValueError(f"cannot find where the arguments begin in template {template!r}")
