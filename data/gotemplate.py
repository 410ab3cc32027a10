"""A renderer for the subset of Go's text/template that data/ollama.py generates, and Ollama's template data.

Ollama renders a Modelfile's TEMPLATE with Go's text/template, so proving a generated template right needs Go's
semantics, not Jinja's. This module implements the part of them the generated templates use and refuses everything
else with GoTemplateError, so a template that leans on anything unimplemented fails loudly instead of rendering
differently from Go:

- text and `{{ }}` actions; `{{- ` / ` -}}` trim the white space (space, tab, CR, LF) next to them;
- `if` / `else if` / `else` / `end`; `range PIPE`, `range $v := PIPE`, `range $i, $v := PIPE` over a list, over an
  int (Go 1.24, which Ollama has been built with since 0.5.13) or over nil, with `else`, `break` and `continue`;
- `define "name"` at the top level and `template "name" PIPE`;
- variables (`$`, `$x := PIPE`, `$x = PIPE`; a body's declarations end with it, an assignment reaches the variable
  where it was declared), `.Field` chains on `.`, a variable or a parenthesized pipeline, and `|` pipelines;
- string literals ("..." with Go's escapes, `raw`), decimal integers, true, false;
- functions eq, ne, lt, le, gt, ge, and, or (both short-circuit, as since Go 1.18), not, len, index, slice.

Go strings are bytes: `len`, `index` and `slice` count UTF-8 bytes, so values are held as `bytes` inside and the
output is decoded once at the end. Values print as Go prints them (a missing map key: `<no value>`).

`ollama_data` builds the data Ollama executes a `.Messages` template with (template/template.go `Execute` and
`collate`; the Modelfile SYSTEM is prepended by server/routes.go when a chat request has no system message first).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

_SPACE = " \t\r\n"  # what trim markers remove, and what may separate them from the delimiters
_KEYWORDS = {"if", "else", "end", "range", "break", "continue", "define", "template", "with", "block"}
_MAX_DEPTH = 200  # nested `template` calls (Go allows 100000; the generated templates never nest)


class GoTemplateError(ValueError):
    """A template outside the supported subset, or one that Go would fail to parse or execute."""


class Struct(dict):
    """A Go struct (Ollama's template message): reading a field it lacks is an error, as in Go."""


# --- lexing -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tok:
    kind: str  # str num ident field var dot ( ) | , := =
    value: object = None
    spaced: bool = False  # white space before it (`$x .F` is two arguments, `$x.F` one)


_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92, '"': 34}
_TOKEN_RES = [
    ("var", re.compile(r"\$[A-Za-z0-9_]*")),
    ("field", re.compile(r"\.[A-Za-z_][A-Za-z0-9_]*")),
    ("num", re.compile(r"-?[0-9]+(?![0-9A-Za-z_.])")),
    ("ident", re.compile(r"[A-Za-z_][A-Za-z0-9_]*")),
    (":=", re.compile(r":=")),
]
_STRING_RE = re.compile(r'"((?:[^"\\\n]|\\.)*)"')


def _go_string(body: str) -> bytes:
    """An interpreted Go string literal's value (the text between the quotes)."""
    out = bytearray()
    i = 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out += c.encode()
            i += 1
            continue
        e = body[i + 1]
        if e in _ESCAPES:
            out.append(_ESCAPES[e])
            i += 2
        elif e in "xuU":
            n = {"x": 2, "u": 4, "U": 8}[e]
            digits = body[i + 2:i + 2 + n]
            if not re.fullmatch(f"[0-9A-Fa-f]{{{n}}}", digits):
                raise GoTemplateError(f"bad escape \\{e}{digits} in a string literal")
            value = int(digits, 16)
            out += bytes([value]) if e == "x" else chr(value).encode()
            i += 2 + n
        elif e in "01234567":
            digits = body[i + 1:i + 4]
            if not re.fullmatch("[0-7]{3}", digits) or int(digits, 8) > 255:
                raise GoTemplateError(f"bad octal escape \\{digits} in a string literal")
            out.append(int(digits, 8))
            i += 4
        else:
            raise GoTemplateError(f"unknown escape \\{e} in a string literal")
    return bytes(out)


def _lex_action(src: str, i: int) -> tuple[list[_Tok], int, bool]:
    """Tokens of the action starting at src[i] (just after `{{` and any left trim marker): (tokens, index after
    `}}`, whether a right trim marker closed it)."""
    toks: list[_Tok] = []
    while True:
        start = i
        while i < len(src) and src[i] in _SPACE:
            i += 1
        spaced = i > start
        if src.startswith("}}", i):
            return toks, i + 2, False
        if spaced and src.startswith("-}}", i):
            return toks, i + 3, True
        if i >= len(src):
            raise GoTemplateError("unclosed action: no }}")
        c = src[i]
        if c == '"':
            m = _STRING_RE.match(src, i)
            if not m:
                raise GoTemplateError("unterminated string literal")
            toks.append(_Tok("str", _go_string(m.group(1)), spaced))
            i = m.end()
        elif c == "`":
            end = src.find("`", i + 1)
            if end < 0:
                raise GoTemplateError("unterminated raw string literal")
            toks.append(_Tok("str", src[i + 1:end].replace("\r", "").encode(), spaced))  # Go drops CRs in raw strings
            i = end + 1
        elif c in "()|,":
            toks.append(_Tok(c, None, spaced))
            i += 1
        elif c == "=":
            toks.append(_Tok("=", None, spaced))
            i += 1
        elif c == "/" and src.startswith("/*", i):
            raise GoTemplateError("comments ({{/* */}}) are outside the supported subset")
        elif c == "." and not re.match(r"\.[A-Za-z_]", src[i:i + 2]):
            toks.append(_Tok("dot", None, spaced))
            i += 1
        else:
            for kind, rx in _TOKEN_RES:
                m = rx.match(src, i)
                if m:
                    text = m.group()
                    value = int(text) if kind == "num" else text.lstrip(".") if kind == "field" else text
                    toks.append(_Tok(kind, value, spaced))
                    i = m.end()
                    break
            else:
                raise GoTemplateError(f"unsupported syntax in an action at {src[i:i + 12]!r}")


def _lex(src: str) -> list[tuple[str, object]]:
    """[("text", bytes) | ("action", [tokens])], trim markers applied."""
    items: list[tuple[str, object]] = []
    pos = 0
    while True:
        at = src.find("{{", pos)
        text = src[pos:] if at < 0 else src[pos:at]
        if at < 0:
            items.append(("text", text.encode()))
            return items
        i = at + 2
        if src.startswith("-", i) and i + 1 < len(src) and src[i + 1] in _SPACE:
            text = text.rstrip(_SPACE)
            i += 1
        items.append(("text", text.encode()))
        toks, pos, right_trim = _lex_action(src, i)
        items.append(("action", toks))
        if right_trim:
            while pos < len(src) and src[pos] in _SPACE:
                pos += 1


# --- parsing ----------------------------------------------------------------------------------------------


@dataclass
class _Pipe:
    decl: list[str]
    assign: bool  # `=` rather than `:=`
    cmds: list[list[tuple]]  # each command: operands; an operand is a tuple (see _operand)


@dataclass
class _Node:
    kind: str  # text action if range break continue template
    value: object = None  # text bytes, a _Pipe, or the called template's name
    pipe: _Pipe | None = None
    body: list[_Node] = field(default_factory=list)
    else_body: list[_Node] = field(default_factory=list)


class _Parser:
    def __init__(self, src: str):
        self.items = _lex(src)
        self.pos = 0
        self.defines: dict[str, list[_Node]] = {}
        self.ranges = 0  # enclosing ranges (break and continue need one)

    def parse(self) -> list[_Node]:
        nodes, stop = self.block(top=True)
        if stop is not None:
            raise GoTemplateError(f"unexpected {{{{{stop[0].value}}}}}")
        return nodes

    def block(self, top: bool = False) -> tuple[list[_Node], list[_Tok] | None]:
        """Nodes up to an `else` or `end` (returned with its tokens) or the end of the source (None)."""
        nodes: list[_Node] = []
        while self.pos < len(self.items):
            kind, value = self.items[self.pos]
            self.pos += 1
            if kind == "text":
                if value:
                    nodes.append(_Node("text", value))
                continue
            toks = value
            if not toks:
                raise GoTemplateError("empty action {{}}")
            word = toks[0].value if toks[0].kind == "ident" else None
            if word in ("else", "end"):
                return nodes, toks
            if word == "define":
                if not top:
                    raise GoTemplateError("define is only allowed at the top level")
                self.define(toks)
            elif word in ("if", "range"):
                nodes.append(self.branch(word, toks[1:]))
            elif word in ("break", "continue"):
                if not self.ranges or len(toks) > 1:
                    raise GoTemplateError(f"{{{{{word}}}}} outside a range or with arguments")
                nodes.append(_Node(word))
            elif word == "template":
                nodes.append(self.call(toks[1:]))
            elif word in ("with", "block"):
                raise GoTemplateError(f"{{{{{word}}}}} is outside the supported subset")
            else:
                nodes.append(_Node("action", _pipe(toks, decl_vars=1)))
        return nodes, None

    def branch(self, word: str, toks: list[_Tok]) -> _Node:
        node = _Node(word, pipe=_pipe(toks, decl_vars=2 if word == "range" else 1))
        self.ranges += word == "range"
        node.body, stop = self.block()
        self.ranges -= word == "range"
        if stop is None:
            raise GoTemplateError(f"unclosed {{{{{word}}}}}: no {{{{end}}}}")
        if stop[0].value == "else":
            if len(stop) > 1 and stop[1].kind == "ident" and stop[1].value == "if" and word == "if":
                node.else_body = [self.branch("if", stop[2:])]  # `else if` shares the outer `end`
                return node
            if len(stop) > 1:
                raise GoTemplateError("unexpected tokens after {{else}}")
            node.else_body, stop = self.block()
            if stop is None or stop[0].value != "end":
                raise GoTemplateError(f"{{{{{word}}}}} ... {{{{else}}}} has no {{{{end}}}}")
        if len(stop) > 1:
            raise GoTemplateError("unexpected tokens after {{end}}")
        return node

    def define(self, toks: list[_Tok]) -> None:
        if len(toks) != 2 or toks[1].kind != "str":
            raise GoTemplateError('define needs one name: {{define "name"}}')
        body, stop = self.block()
        if stop is None or stop[0].value != "end" or len(stop) > 1:
            raise GoTemplateError("define has no {{end}}")
        self.defines[toks[1].value.decode()] = body

    def call(self, toks: list[_Tok]) -> _Node:
        if not toks or toks[0].kind != "str":
            raise GoTemplateError('template needs a name: {{template "name" PIPE}}')
        return _Node("template", toks[0].value.decode(), pipe=_pipe(toks[1:], decl_vars=0) if len(toks) > 1 else None)


def _pipe(toks: list[_Tok], decl_vars: int) -> _Pipe:
    """A pipeline with up to `decl_vars` declared or assigned variables in front."""
    decl: list[str] = []
    assign = False
    for n in range(decl_vars, 0, -1):
        names = toks[0:2 * n - 1:2]
        commas = toks[1:2 * n - 1:2]
        if (len(toks) > 2 * n - 1 and all(t.kind == "var" for t in names) and all(t.kind == "," for t in commas)
                and toks[2 * n - 1].kind in (":=", "=")):
            decl = [t.value for t in names]
            assign = toks[2 * n - 1].kind == "="
            toks = toks[2 * n:]
            break
    cmds: list[list[tuple]] = [[]]
    i = 0
    while i < len(toks):
        if toks[i].kind == "|":
            cmds.append([])
            i += 1
            continue
        operand, i = _operand(toks, i)
        cmds[-1].append(operand)
    if not all(cmds):
        raise GoTemplateError("missing command in a pipeline")
    return _Pipe(decl, assign, cmds)


def _operand(toks: list[_Tok], i: int) -> tuple[tuple, int]:
    """One operand: ("str"|"num"|"bool", value), ("ident", name), ("nil",), or (base, fields) with base one of
    ("dot",), ("var", name), ("pipe", _Pipe)."""
    t = toks[i]
    i += 1
    if t.kind == "str" or t.kind == "num":
        term: tuple = (t.kind, t.value)
    elif t.kind == "ident":
        if t.value in ("true", "false"):
            term = ("bool", t.value == "true")
        elif t.value == "nil":
            term = ("nil",)
        elif t.value in _KEYWORDS:
            raise GoTemplateError(f"unexpected keyword {t.value!r} in a pipeline")
        else:
            term = ("ident", t.value)
    elif t.kind == "field":
        term, i = ("dot",), i - 1  # `.A.B`: the fields below start here
    elif t.kind == "dot":
        term = ("dot",)
    elif t.kind == "var":
        term = ("var", t.value)
    elif t.kind == "(":
        depth, j = 1, i
        while j < len(toks) and depth:
            depth += {"(": 1, ")": -1}.get(toks[j].kind, 0)
            j += 1
        if depth:
            raise GoTemplateError("unclosed parenthesis")
        term, i = ("pipe", _pipe(toks[i:j - 1], decl_vars=0)), j
    else:
        raise GoTemplateError(f"unexpected {t.kind!r} in a pipeline")
    fields: list[str] = []
    while i < len(toks) and toks[i].kind == "field" and (not toks[i].spaced or (not fields and t.kind == "field")):
        fields.append(toks[i].value)
        i += 1
    if fields and term[0] not in ("dot", "var", "pipe"):
        raise GoTemplateError(f"cannot read field {fields[0]} of a {term[0]}")
    return (term, fields) if term[0] in ("dot", "var", "pipe") else term, i


# --- execution --------------------------------------------------------------------------------------------


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


def _kind(v) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, bytes):
        return "string"
    raise GoTemplateError(f"cannot compare a value of type {_go_type(v)} (only bool, int and string are supported)")


def _go_type(v) -> str:
    return {bool: "bool", int: "int", bytes: "string", list: "slice", Struct: "struct", dict: "map"}.get(
        type(v), "nil" if v is None else type(v).__name__)


def _truth(v) -> bool:
    if v is None:
        return False
    if isinstance(v, (bool, int, bytes, list)) or (isinstance(v, dict) and not isinstance(v, Struct)):
        return bool(v)
    return True  # a pointer to a struct


def _compare(op: str, a, b) -> bool:
    ka, kb = _kind(a), _kind(b)
    if ka != kb:
        raise GoTemplateError(f"incompatible types for comparison: {ka} and {kb}")
    if op in ("lt", "le", "gt", "ge") and ka == "bool":
        raise GoTemplateError("invalid type for comparison: bool")
    return {"eq": a == b, "ne": a != b, "lt": a < b, "le": a <= b, "gt": a > b, "ge": a >= b}[op]


def _index(v, i):
    if isinstance(v, (list, bytes)):
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(v):
            raise GoTemplateError(f"index {i!r} out of range for a {_go_type(v)} of length {len(v)}")
        return v[i]
    if isinstance(v, dict) and not isinstance(v, Struct):
        return v.get(i.decode() if isinstance(i, bytes) else i)  # a missing key: the zero value (nil)
    raise GoTemplateError(f"cannot index a {_go_type(v)}")


def _slice(v, *idx):
    if not isinstance(v, (list, bytes)):
        raise GoTemplateError(f"cannot slice a {_go_type(v)}")
    if len(idx) > 2:
        raise GoTemplateError("3-index slices are outside the supported subset")
    lo, hi = (list(idx) + [0, len(v)][len(idx):])[:2]
    if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi <= len(v)):
        raise GoTemplateError(f"slice bounds [{lo}:{hi}] out of range for length {len(v)}")
    return v[lo:hi]


def _length(v) -> int:
    if isinstance(v, (list, bytes)) or (isinstance(v, dict) and not isinstance(v, Struct)):
        return len(v)
    raise GoTemplateError(f"len of a {_go_type(v)}")


def _lazy_and(args: list[Callable]):
    v = None
    for arg in args:
        v = arg()
        if not _truth(v):
            return v
    return v


def _lazy_or(args: list[Callable]):
    v = None
    for arg in args:
        v = arg()
        if _truth(v):
            return v
    return v


_FUNCS: dict[str, tuple[Callable, int, int]] = {  # name: (function of the values, min args, max args)
    "eq": (lambda a, *bs: any(_compare("eq", a, b) for b in bs), 2, 99),
    "ne": (lambda a, b: _compare("ne", a, b), 2, 2),
    "lt": (lambda a, b: _compare("lt", a, b), 2, 2),
    "le": (lambda a, b: _compare("le", a, b), 2, 2),
    "gt": (lambda a, b: _compare("gt", a, b), 2, 2),
    "ge": (lambda a, b: _compare("ge", a, b), 2, 2),
    "not": (lambda a: not _truth(a), 1, 1),
    "len": (_length, 1, 1),
    "index": (lambda v, *idx: _index_all(v, idx), 1, 99),
    "slice": (_slice, 1, 3),
}
_LAZY = {"and": _lazy_and, "or": _lazy_or}


def _index_all(v, idx):
    for i in idx:
        v = _index(v, i)
    return v


def _printed(v) -> bytes:
    if isinstance(v, bytes):
        return v
    if isinstance(v, bool):
        return b"true" if v else b"false"
    if isinstance(v, int):
        return str(v).encode()
    if v is None:
        return b"<no value>"
    raise GoTemplateError(f"printing a {_go_type(v)} is outside the supported subset")


class _Exec:
    def __init__(self, defines: dict[str, list[_Node]]):
        self.defines = defines
        self.out = bytearray()
        self.vars: list[list] = []  # Go's variable stack: [name, value] pairs
        self.depth = 0

    def lookup(self, name: str):
        for pair in reversed(self.vars):
            if pair[0] == name:
                return pair
        raise GoTemplateError(f"undefined variable {name}")

    def walk(self, nodes: list[_Node], dot) -> None:
        for node in nodes:
            if node.kind == "text":
                self.out += node.value
            elif node.kind == "action":
                v = self.pipe(node.value, dot)
                if not node.value.decl:
                    self.out += _printed(v)
            elif node.kind == "if":
                mark = len(self.vars)
                self.walk(node.body if _truth(self.pipe(node.pipe, dot)) else node.else_body, dot)
                del self.vars[mark:]
            elif node.kind == "range":
                self.range(node, dot)
            elif node.kind == "break":
                raise _Break
            elif node.kind == "continue":
                raise _Continue
            else:
                self.call(node, dot)

    def range(self, node: _Node, dot) -> None:
        outer = len(self.vars)
        value = self.pipe(_Pipe([], False, node.pipe.cmds), dot)
        decl = node.pipe.decl
        if not node.pipe.assign:
            self.vars += [[name, None] for name in decl]
        if isinstance(value, bool) or not isinstance(value, (list, int, type(None))):
            raise GoTemplateError(f"range can't iterate over a {_go_type(value)}")
        if isinstance(value, int) and len(decl) > 1:
            raise GoTemplateError("can't use two variables to range over an int")
        pairs = list(enumerate(value)) if isinstance(value, list) else [(i, i) for i in range(value or 0)]
        mark = len(self.vars)
        try:
            for i, elem in pairs:
                values = [i, elem] if len(decl) == 2 else [elem]
                for name, v in zip(decl, values):
                    (self.lookup(name) if node.pipe.assign else self.vars[mark - len(decl) + decl.index(name)])[1] = v
                try:
                    self.walk(node.body, elem)
                except _Continue:
                    pass
                finally:
                    del self.vars[mark:]
        except _Break:
            pass
        if not pairs:
            self.walk(node.else_body, dot)
        del self.vars[outer:]

    def call(self, node: _Node, dot) -> None:
        if node.value not in self.defines:
            raise GoTemplateError(f"no such template {node.value!r}")
        if self.depth >= _MAX_DEPTH:
            raise GoTemplateError("template calls nest too deep")
        arg = self.pipe(node.pipe, dot) if node.pipe else None
        saved, self.vars = self.vars, [["$", arg]]
        self.depth += 1
        try:
            self.walk(self.defines[node.value], arg)
        finally:
            self.vars, self.depth = saved, self.depth - 1

    def pipe(self, pipe: _Pipe, dot):
        value = _MISSING
        for cmd in pipe.cmds:
            value = self.command(cmd, dot, value)
        for name in pipe.decl:
            if pipe.assign:
                self.lookup(name)[1] = value
            else:
                self.vars.append([name, value])
        return value

    def command(self, cmd: list[tuple], dot, final):
        head, args = cmd[0], cmd[1:]
        if head[0] != "ident":
            if args or final is not _MISSING:
                raise GoTemplateError("can't give an argument to a non-function")
            return self.operand(head, dot)
        name = head[1]
        thunks = [lambda a=a: self.operand(a, dot) for a in args] + ([lambda: final] if final is not _MISSING else [])
        if name in _LAZY:
            if not thunks:
                raise GoTemplateError(f"{name} needs at least one argument")
            return _LAZY[name](thunks)
        if name not in _FUNCS:
            raise GoTemplateError(f"function {name!r} is outside the supported subset")
        fn, least, most = _FUNCS[name]
        if not least <= len(thunks) <= most:
            raise GoTemplateError(f"wrong number of arguments for {name}: {len(thunks)}")
        return fn(*(t() for t in thunks))

    def operand(self, op: tuple, dot):
        kind = op[0]
        if kind in ("str", "num", "bool"):
            return op[1]
        if kind == "nil":
            raise GoTemplateError("nil is not a command")
        if kind == "ident":
            return self.command([op], dot, _MISSING)
        base, fields = op
        value = dot if base[0] == "dot" else self.lookup(base[1])[1] if base[0] == "var" else self.pipe(base[1], dot)
        for name in fields:
            value = _field(value, name)
        return value


_MISSING = object()


def _field(value, name: str):
    if isinstance(value, Struct):
        if name not in value:
            raise GoTemplateError(f"can't evaluate field {name} in a message")
        return value[name]
    if isinstance(value, dict):
        return value.get(name)  # Ollama parses with missingkey=zero: a missing key is nil
    if value is None:
        raise GoTemplateError(f"nil pointer evaluating .{name}")
    raise GoTemplateError(f"can't evaluate field {name} in a {_go_type(value)}")


def _to_go(v):
    """Python data as the renderer holds it: strings become bytes (Go strings)."""
    if isinstance(v, str):
        return v.encode()
    if isinstance(v, Struct):
        return Struct({k: _to_go(x) for k, x in v.items()})
    if isinstance(v, dict):
        return {k: _to_go(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_to_go(x) for x in v]
    return v


@dataclass
class GoTemplate:
    """A parsed template; `render(data)` executes it as Go's text/template would."""

    source: str
    nodes: list[_Node]
    defines: dict[str, list[_Node]]

    def render(self, data) -> str:
        ex = _Exec(self.defines)
        data = _to_go(data)
        ex.vars.append(["$", data])
        ex.walk(self.nodes, data)
        try:
            return ex.out.decode()
        except UnicodeDecodeError as e:
            raise GoTemplateError(f"the output is not valid UTF-8 ({e})") from None


def parse(source: str) -> GoTemplate:
    """Parse a template; GoTemplateError for syntax outside the subset or that Go would reject."""
    parser = _Parser(source)
    nodes = parser.parse()
    return GoTemplate(source, nodes, parser.defines)


def render(source: str, data) -> str:
    return parse(source).render(data)


# --- Ollama's data ---------------------------------------------------------------------------------------

_MESSAGE_FIELDS = ("Role", "Content", "Thinking", "Images", "ToolCalls", "ToolName", "ToolCallID")


def ollama_data(messages: list[dict], system: str | None = None) -> dict:
    """The data Ollama executes a `.Messages` template with for a chat request.

    `system`: the Modelfile's SYSTEM, which Ollama puts first as a system message when the request does not start
    with one. Consecutive messages of one role (tool results apart) are merged with a blank line, and `.System` is
    every system message joined the same way, as template/template.go's collate does.
    """
    msgs = [dict(m) for m in messages]
    if system and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": system})
    collated: list[dict] = []
    for m in msgs:
        if collated and collated[-1]["role"] == m["role"] and m["role"] != "tool":
            collated[-1]["content"] += "\n\n" + m["content"]
        else:
            collated.append(dict(m))  # a copy: `.System` joins the contents as they were
    structs = [Struct({"Role": m["role"], "Content": m["content"], "Thinking": "", "Images": [], "ToolCalls": [],
                       "ToolName": "", "ToolCallID": ""}) for m in collated]
    return {"System": "\n\n".join(m["content"] for m in msgs if m["role"] == "system"), "Messages": structs,
            "Tools": None, "Response": "", "Think": False, "ThinkLevel": "", "IsThinkSet": False}
