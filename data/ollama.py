"""Ollama export: a Modelfile whose TEMPLATE renders exactly the prompt text training renders.

The TEMPLATE is generated from the training template's own rendering, not from a table per name. Conversations of
placeholder contents are rendered (`render_text`, generation prompt included) and cut at the contents; the text
between two messages must depend only on their two roles (with "start" before the first and "end", the generation
prompt, after the last), which holds for the 2023-style templates: a default system prompt is the start-to-user
text (vicuna_v1.1), a system prompt folded into the first user turn is the system-to-user text (llama-2, mistral).
Two content rules are found the same way: an empty system prompt that renders as none (llama-2, mistral), and
contents the template strips of white space (llama-3), which the Go template does with a helper over UTF-8 bytes
(Python's `str.strip` set; `range` over an int needs Ollama 0.5.13 or later, built with Go 1.24). What cannot be
put this way is refused with TemplateError: templates that render tools or reasoning (qwen2.5, qwen3, llama-3.1,
or a tokenizer's Jinja template that uses `tools=`), and any other dependence on position or content.

Before a template is returned it is rendered with data/gotemplate.py, given the data Ollama gives it, for probe
conversations (system prompt or none, empty, one and three turns, awkward contents); the text must equal
training's and its tokens `encode_prompt`'s, else TemplateError: a wrong template is never written.

BOS: Ollama's runtime tokenizes the rendered prompt and prepends BOS itself when the GGUF says
`tokenizer.ggml.add_bos_token` (tokenizer/vocabulary.go `addSpecials`; llama-server tokenizes with add_special),
which is the prefix the tokenizer adds automatically (`run_encoder(tokenizer).prefix_ids`). So the TEMPLATE leaves
out that prefix's text where training's text starts with it (llama-3's `<|begin_of_text|>` with a tokenizer that
adds it) and never adds it where training's text lacks it (Llama-2's `<s>`): runtime ids = prefix + tokens(text).
Ollama parses special tokens in the rendered text, so a message whose content spells one (`<|im_end|>`) gets the
control token at inference, where training kept it plain text; the test conversations hold none.

System prompts: a template's default system prompt lives in the TEMPLATE (the start-to-user text), as training
renders it for conversations without one. The Modelfile gets `SYSTEM` only when `system` is passed (a training run
that used one fixed system prompt); Ollama then inserts it as the first message of every chat whose first message
is not a system message (server/routes.go), which the TEMPLATE renders like any system message. An empty `system`
writes no SYSTEM (Ollama ignores an empty one).

Modelfile syntax is Ollama's parser/parser.go: a value ends at the first line end where it is complete, and a quoted
value (three double quotes or one on each side) is taken literally, with no escapes; and characters that are not printable (by Go's strconv.IsPrint, bar tab,
CR and LF) dropped. `parse_modelfile` reproduces that; `modelfile` picks quotes that read back exactly and raises
ModelfileError where none can (e.g. a SYSTEM with three double quotes ending a line, or a control character).
"""

from __future__ import annotations

import itertools
import json
import re
import unicodedata
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

from data.gotemplate import GoTemplateError, ollama_data, parse
from data.jinja_pieces import native_reasoning
from data.pieces import TemplateError
from data.templates import render_pieces, render_text
from data.tokenize import encode_prompt
from data.tokenizer import run_encoder

ROLES = ("system", "user", "assistant")
START, END = "", "end"  # the "previous role" before the first message; the "next role" after the last
_PROBES = [("user",), ("system", "user"), ("user", "assistant", "user"), ("user", "assistant")]
_TOOL_PROBE = [{"type": "function", "function": {"name": "probe", "description": "A probe.",
                                                  "parameters": {"type": "object", "properties": {}}}}]


class ModelfileError(ValueError):
    """A value that Ollama's Modelfile parser cannot read back as written."""


def _mark(k: int) -> str:
    return f"\ue000{k}\ue001"  # private-use characters: never template text, never whitespace


def _conversation(roles, contents) -> list[dict]:
    return [{"role": r, "content": c} for r, c in zip(roles, contents)]


def _prompt(messages: list[dict], template: str, tokenizer) -> str:
    """Training's prompt text, generation prompt included, without the prefix the runtime adds itself (BOS)."""
    text = render_text(messages, template, tokenizer, add_generation_prompt=True)
    enc = run_encoder(tokenizer)
    return text[len(enc.prefix_text):] if enc.prefix_ids and text.startswith(enc.prefix_text) else text


# --- deriving the shape of a template -------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    sep: dict[tuple[str, str], str]  # (previous role or START, next role or END) -> the template text between
    skip_empty_system: bool = False  # an empty system prompt renders as no system prompt
    strip: frozenset[str] = frozenset()  # roles whose content the template strips of white space

    def render(self, messages: list[dict]) -> str:
        """What the generated Go template renders for `messages` (the model the probes are checked against)."""
        out, prev = [], START
        for m in messages:
            if m["role"] == "system" and self.skip_empty_system and not m["content"]:
                continue
            content = m["content"].strip() if m["role"] in self.strip else m["content"]
            out += [self.sep.get((prev, m["role"]), ""), content]
            prev = m["role"]
        return "".join(out) + self.sep.get((prev, END), "")


def _between(text: str, n: int) -> list[str]:
    """The n + 1 texts around the placeholder contents 0..n-1, which must each appear once, in order."""
    parts, pos = [], 0
    for k in range(n):
        at = text.find(_mark(k), pos)
        if at < 0 or text.count(_mark(k)) != 1:
            raise TemplateError("it does not render each message's content once and as written, which an Ollama "
                                "template must")
        parts.append(text[pos:at])
        pos = at + len(_mark(k))
    return parts + [text[pos:]]


def _refuse_tools(template: str, tokenizer) -> None:
    user = [{"role": "user", "content": "x"}]
    try:
        with_tools = render_text(user, template, tokenizer, add_generation_prompt=True, tools=_TOOL_PROBE)
    except TemplateError:
        with_tools = None  # a chat-only template has no tool-call format
    if (with_tools is not None and with_tools != render_text(user, template, tokenizer, add_generation_prompt=True)
            or template == "tokenizer" and native_reasoning(tokenizer)):
        raise TemplateError("it has a tool-call or reasoning format (tools, tool calls, reasoning), which a generated "
                            "Ollama template cannot express; export with a chat-only template")


def _separators(template: str, tokenizer) -> dict[tuple[str, str], str]:
    """The text between each two roles, from probe conversations of placeholder contents; it must not vary."""
    sep: dict[tuple[str, str], str] = {}
    for roles in _PROBES:
        msgs = _conversation(roles, map(_mark, range(len(roles))))
        parts = _between(_prompt(msgs, template, tokenizer), len(roles))
        for key, text in zip(zip((START, *roles), (*roles, END)), parts):
            if sep.setdefault(key, text) != text:
                raise TemplateError("the text between two messages depends on more than their two roles, which a "
                                    "generated Ollama template cannot express")
    return sep


def _first_fitting(shapes, messages: list[dict], template: str, tokenizer, problem: str) -> _Shape:
    """The first of `shapes` whose rendering of `messages` is training's."""
    want = _prompt(messages, template, tokenizer)
    for shape in shapes:
        if shape.render(messages) == want:
            return shape
    raise TemplateError(problem)


def _derive(template: str, tokenizer) -> _Shape:
    """The template's shape: separators, then whether an empty system prompt renders as none, then which roles'
    contents are stripped (each checked on a probe, the simplest rule that fits first)."""
    shape = _Shape(_separators(template, tokenizer))
    empty = [{"role": "system", "content": ""}, {"role": "user", "content": _mark(0)}]
    shape = _first_fitting([shape, replace(shape, skip_empty_system=True)], empty, template, tokenizer,
                           "it renders an empty system prompt in a way a generated Ollama template cannot express")
    padded = _conversation(("system", "user", "assistant", "user"), (f" \u3000\n{_mark(k)}\t\n " for k in range(4)))
    strips = [frozenset(c) for n in range(len(ROLES) + 1) for c in itertools.combinations(ROLES, n)]
    return _first_fitting([replace(shape, strip=s) for s in strips], padded, template, tokenizer,
                          "it changes message contents in a way a generated Ollama template cannot express (only "
                          "stripping white space can be)")


# --- writing the Go template ----------------------------------------------------------------------------


def _go_printable(c: str) -> bool:
    """Go's strconv.IsPrint: letters, marks, numbers, punctuation, symbols and the ASCII space."""
    return c == " " or unicodedata.category(c)[0] in "LMNPS"


def go_quote(text: str) -> str:
    """A Go string literal for `text`, with everything Go's IsPrint rejects escaped (the Modelfile parser drops
    such characters, so they must not appear raw in a TEMPLATE)."""
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[c])
        elif _go_printable(c):
            out.append(c)
        else:
            out.append(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}")
    return '"' + "".join(out) + '"'


@cache
def _whitespace_by_width() -> dict[int, list[str]]:
    """What Python's str.strip removes, by UTF-8 length (every such character is below U+3001)."""
    out: dict[int, list[str]] = {}
    for c in map(chr, range(0x3001)):
        if c.isspace():
            out.setdefault(len(c.encode()), []).append(c)
    return out


def _starts_with_space(var: str) -> list[tuple[int, str]]:
    """(width, Go condition) per UTF-8 width: the string in `var` starts with a white space character that wide."""
    return [(w, f"and (ge (len {var}) {w}) (eq (slice {var} 0 {w}) {' '.join(go_quote(c) for c in chars)})")
            for w, chars in sorted(_whitespace_by_width().items())]


def _strip_define() -> list[str]:
    """`{{ template "strip" X }}` writes X without leading and trailing white space, as str.strip() does.
    Go templates have no trim function and no arithmetic: the leading loop drops one character per pass; the
    trailing one walks the character starts and keeps the text up to the last non-space character."""
    lead = [f"{{{{- {'if' if i == 0 else 'else if'} {cond} }}}}{{{{ $s = slice $s {w} }}}}"
            for i, (w, cond) in enumerate(_starts_with_space("$s"))]
    any_space = " ".join(f"({cond})" for _, cond in _starts_with_space("$c"))
    return [
        '{{- define "strip" }}', "{{- $s := . }}", "{{- range len . }}", *lead, "{{- else }}{{ break }}",
        "{{- end }}", "{{- end }}", '{{- $out := "" }}', "{{- $keep := false }}", "{{- range $k := len $s }}",
        "{{- if or (lt (index $s $k) 128) (ge (index $s $k) 192) }}",  # a character starts here (not 10xxxxxx)
        "{{- if $keep }}{{ $out = slice $s 0 $k }}{{ end }}", "{{- $c := slice $s $k }}",
        f"{{{{- $keep = not (or {any_space}) }}}}", "{{- end }}", "{{- end }}", "{{- if $keep }}{{ $out = $s }}{{ end }}",
        "{{- $out }}", "{{- end }}",
    ]


def _on_prev(shape: _Shape, cur: str, open_: str = "{{ ") -> str:
    """An if-chain on `$prev` writing the text that comes before `cur` after each previous role ("" if none)."""
    branches = [(prev, text) for (prev, nxt), text in shape.sep.items() if nxt == cur and text]
    chain = "".join(f'{open_ if i == 0 else "{{ else "}if eq $prev "{prev}" }}}}{{{{ {go_quote(text)} }}}}'
                    for i, (prev, text) in enumerate(branches))
    return chain + "{{ end }}" if branches else ""


def _go_template(shape: _Shape) -> str:
    """The Go template for a shape. All literal text is in string literals, so the only raw text is the layout
    between actions, which each action's `{{-` trims."""
    lines = _strip_define() if shape.strip else []
    lines += ['{{- $prev := "" }}', "{{- range .Messages }}"]
    for i, role in enumerate(ROLES):
        cond = f'eq .Role "{role}"'
        if role == "system" and shape.skip_empty_system:
            cond = f"and ({cond}) .Content"  # an empty system prompt is skipped, $prev stays as it was
        content = '{{ template "strip" .Content }}' if role in shape.strip else "{{ .Content }}"
        lines.append(f"{{{{- {'if' if i == 0 else 'else if'} {cond} }}}}{_on_prev(shape, role)}{content}"
                     "{{ $prev = .Role }}")
    lines += ["{{- end }}", "{{- end }}"]
    if _on_prev(shape, END):
        lines.append(_on_prev(shape, END, open_="{{- "))  # the generation prompt
    return "\n".join(lines)


# --- checking it ----------------------------------------------------------------------------------------


def _verify_conversations() -> list[list[dict]]:
    texts = ["Hi there", " spaced\tout \n", "line one\nline two\n\n", 'quotes "x" and {{ .Content }} and `t`',
             "\u3000wide\u00a0space\u2028", "ünïcødé 日本語 🙂", ""]
    convs, k = [], 0
    for roles in [("user",), ("system", "user"), ("system", "user"), ("user", "assistant", "user"),
                  ("system", "user", "assistant", "user", "assistant", "user"), ("user", "assistant"),
                  ("user", "assistant", "user", "assistant")]:
        convs.append(_conversation(roles, [texts[(k + j) % len(texts)] for j in range(len(roles))]))
        k += len(roles)
    convs[2][0]["content"] = ""  # an empty system prompt
    return convs


def _verify(source: str, template: str, tokenizer) -> None:
    go = parse(source)
    for msgs in _verify_conversations():
        got, want = go.render(ollama_data(msgs)), _prompt(msgs, template, tokenizer)
        if got != want:
            raise TemplateError(f"the generated template renders {got!r} where training renders {want!r}")
        runtime = tokenizer(got, add_special_tokens=True).input_ids
        training = encode_prompt(msgs, tokenizer, template)
        if runtime != training:
            at = next((i for i, (a, b) in enumerate(zip(runtime, training)) if a != b), min(len(runtime), len(training)))
            raise TemplateError(f"the runtime would tokenize the generated template's text {got!r} differently from "
                                f"training: from token {at}, {tokenizer.convert_ids_to_tokens(runtime[at:at + 3])} "
                                f"where training has {tokenizer.convert_ids_to_tokens(training[at:at + 3])}")


def ollama_template(template: str, tokenizer) -> str:
    """The Go template (a Modelfile's TEMPLATE) that renders what training renders for `template`, BOS excluded
    where the runtime adds it; TemplateError with the reason where that cannot be expressed."""
    try:
        _refuse_tools(template, tokenizer)
        source = _go_template(_derive(template, tokenizer))
        _verify(source, template, tokenizer)
    except (TemplateError, GoTemplateError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]  # one line: Jinja errors can span several
        raise TemplateError(f"cannot export template {template!r} to Ollama: {reason}") from e
    return source


def stop_strings(template: str, tokenizer) -> list[str]:
    """Every end-of-turn string: the template's end-of-turn text and the tokenizer's EOS, deduplicated."""
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    texts = [p.text.strip() for p in render_pieces(msgs, template, tokenizer) if p.kind == "eot"]
    return list(dict.fromkeys(t for t in [*texts, tokenizer.eos_token or ""] if t))


# --- the Modelfile --------------------------------------------------------------------------------------

_COMMANDS = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
             "message", "requires"}
_LINE_END = "\r\n"


def _unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s.startswith('"'):
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True


def _read_value(text: str, i: int) -> tuple[str, int]:
    """A command's value from text[i]: it ends at the first line end where it is complete (parser.go)."""
    buf: list[str] = []
    while i < len(text):
        c = text[i]
        i += 1
        if c in _LINE_END:
            value, ok = _unquote("".join(buf).strip(" \t\r\n"))
            if ok:
                return value, i
            buf.append(c)
        elif c in " \t" or _go_printable(c):
            buf.append(c)  # anything else is dropped, as parser.go writes only printable runes
    value, ok = _unquote("".join(buf).strip(" \t\r\n"))
    if not ok:
        raise ModelfileError("unterminated quoted value at the end of the Modelfile")
    return value, i


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, value) pairs as Ollama reads a Modelfile: FROM is "model", PARAMETER NAME VALUE is (NAME, VALUE),
    MESSAGE ROLE VALUE is ("message", "ROLE: VALUE"). Raises ModelfileError where Ollama would refuse it."""
    commands: list[tuple[str, str]] = []
    i = 0
    while i < len(text):
        if text[i] == "#":
            while i < len(text) and text[i] not in _LINE_END:
                i += 1
            continue
        if text[i] in " \t\r\n":
            i += 1
            continue
        m = re.compile(r"[A-Za-z]*").match(text, i)
        word, i = m.group().lower(), m.end()
        if word not in _COMMANDS or i >= len(text) or text[i] not in " \t":
            raise ModelfileError(f"invalid command at {text[m.start():m.start() + 20]!r}")
        i += 1
        name, role = {"from": "model"}.get(word, word), ""
        if word in ("parameter", "message"):
            m = re.compile(r"[A-Za-z0-9_]*" if word == "parameter" else r"[A-Za-z]*").match(text, i)
            if not m.group() or m.end() >= len(text) or text[m.end()] not in " \t":
                raise ModelfileError(f"bad {word.upper()} at {text[i:i + 20]!r}")
            name, role, i = (m.group(), "", m.end() + 1) if word == "parameter" else (name, m.group(), m.end() + 1)
            if word == "message" and role not in ROLES:
                raise ModelfileError(f"message role must be one of {', '.join(ROLES)}, got {role!r}")
        value, i = _read_value(text, i)
        commands.append((name, f"{role}: {value}" if role else value))
    if not any(name == "model" for name, _ in commands):
        raise ModelfileError("no FROM line")
    return commands


def _quoted(what: str, value: str, forms: tuple[str, ...]) -> str:
    """`value` written in the first of `forms` ("bare", "triple", "double") that parse_modelfile reads back as
    written."""
    dropped = sorted({f"U+{ord(c):04X}" for c in value if not (c in " \t\r\n" or _go_printable(c))})
    if dropped:
        raise ModelfileError(f"{what} contains characters Ollama's Modelfile parser drops: {', '.join(dropped)}")
    for form in forms:
        written = {"bare": value, "double": f'"{value}"', "triple": f'"""{value}"""'}[form]
        try:
            if _read_value(written + "\n", 0) == (value, len(written) + 1):
                return written
        except ModelfileError:
            continue
    raise ModelfileError(f"{what} cannot be quoted so that Ollama's Modelfile parser reads it back as written "
                         f"(it ends a line with a quote): {value!r}")


def modelfile(gguf_path: str, template: str, tokenizer, system: str | None = None) -> str:
    """A Modelfile for the GGUF at `gguf_path` (relative paths are relative to the Modelfile's directory, as
    Ollama reads them): FROM, TEMPLATE, one PARAMETER stop per stop string, and SYSTEM when `system` is given."""
    path = str(gguf_path)
    if not path.startswith(("/", "./", "../", "~")) and not re.match(r"[A-Za-z]:[\\/]", path):
        path = "./" + path  # a bare name would also be tried as a model name to pull
    stops = stop_strings(template, tokenizer)
    commands = [("model", path), ("template", ollama_template(template, tokenizer))]
    commands += [("stop", s) for s in stops] + ([("system", system)] if system else [])
    lines = [f"# Generated by chattune for the {template!r} chat template: TEMPLATE renders training's prompts.",
             f"FROM {_quoted('the GGUF path', path, ('bare', 'double'))}",
             f"TEMPLATE {_quoted('TEMPLATE', commands[1][1], ('triple', 'double'))}",
             *(f"PARAMETER stop {_quoted('a stop string', s, ('double', 'triple'))}" for s in stops)]
    if system:
        lines.append(f"SYSTEM {_quoted('SYSTEM', system, ('triple', 'double'))}")
    text = "\n".join(lines) + "\n"
    if parse_modelfile(text) != commands:  # belt and braces: the file as a whole reads back as written
        raise ModelfileError(f"the Modelfile does not read back as written: {json.dumps(parse_modelfile(text))}")
    return text


def write_modelfile(directory, gguf_path, template: str, tokenizer, system: str | None = None) -> Path:
    """Write `directory`/Modelfile for the GGUF; FROM is `./NAME` when the GGUF is in `directory`, else its
    absolute path. Returns the Modelfile's path."""
    directory, gguf = Path(directory), Path(gguf_path)
    same = gguf.resolve().parent == directory.resolve()
    text = modelfile(f"./{gguf.name}" if same else str(gguf.resolve()), template, tokenizer, system)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "Modelfile"
    target.write_text(text, encoding="utf-8")
    return target
