"""A model's own Jinja chat template (`--template tokenizer`), rendered as pieces.

The template is rendered twice: once with the real messages (and `tools=`), once with every piece of data — each
message's text, reasoning, tool-call name and arguments — replaced by a unique placeholder. The placeholder render
shows where each datum lands and the template text between them, which must then match the real render exactly
(the datum itself may come back as written, stripped or JSON-quoted, as templates do). Nothing is found by
searching the real text, and data is never parsed for special tokens.

Which part of an assistant turn the model writes follows from the inference-context rule (docs/design.md §2): the
template's rendering of the messages before the turn with the generation prompt (`enable_thinking` as the turn
needs: the longest prompt that the turn's rendering starts with) ends where the turn's output begins; the output
ends after its last special token (the end of turn). A turn counts as exact in a rendering when that rendering
starts with the turn's own last-turn rendering up to that end; templates that drop earlier turns' reasoning
(Qwen3, QwQ, DeepSeek-R1) make earlier turns inexact, and data/samples.py gives them samples of their own.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict

from data.agent_templates import INLINE_THINK, inline_reasoning_text, tojson
from data.pieces import HEADER, OUTPUT_KINDS, PLAIN_KINDS, Piece, TemplateError

_MARK = "\u2063"  # INVISIBLE SEPARATOR: not whitespace (survives strip/trim), kept raw by tojson
_FIELD_RE = re.compile(_MARK + r"([crna])(\d+)\.(\d+)" + _MARK)
_KIND = {"c": "content", "r": "reasoning", "n": "call", "a": "call"}
_CACHE: OrderedDict = OrderedDict()  # renders are reused: sample planning and piece building ask for the same ones
_LOCK = threading.Lock()


def native_reasoning(tokenizer) -> bool:
    """Does the template read `reasoning_content` (Qwen3)? Otherwise reasoning goes inline into the reply."""
    return "reasoning_content" in (tokenizer.chat_template or "")


def apply(tokenizer, messages: list[dict], add_generation_prompt: bool, tools=None, thinking=None) -> str:
    """The template's text for already-prepared messages (see `_prepare`), memoized."""
    key = (tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token, json.dumps(messages, sort_keys=True),
           add_generation_prompt, json.dumps(tools, sort_keys=True), thinking)
    with _LOCK:  # the server tokenizes in a thread pool
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **kwargs)
    except Exception as e:  # jinja raises many types (TemplateError, exceptions from raise_exception())
        raise TemplateError(f"the tokenizer's chat_template failed to render: {e}") from e
    with _LOCK:
        _CACHE[key] = text
        if len(_CACHE) > 512:
            _CACHE.popitem(last=False)
    return text


def _ph(kind: str, i: int, k: int = 0) -> str:
    return f"{_MARK}{kind}{i}.{k}{_MARK}"


def _prepare(messages: list[dict], native: bool, probe: bool) -> list[dict]:
    """Messages as a Jinja template reads them (OpenAI's field names); with `probe`, data become placeholders."""
    out = []
    for i, m in enumerate(messages):
        d: dict = {"role": m["role"]}
        if m["role"] == "assistant":
            content = m["content"] if native else inline_reasoning_text(m)
            if native and m.get("reasoning"):
                d["reasoning_content"] = _ph("r", i) if probe else m["reasoning"]
            if m.get("tool_calls"):
                d["tool_calls"] = [
                    {"id": c["id"], "type": "function",
                     "function": {"name": _ph("n", i, k) if probe else c["function"]["name"],
                                  "arguments": _ph("a", i, k) if probe else c["function"]["arguments"]}}
                    for k, c in enumerate(m["tool_calls"])]
        else:
            content = m["content"]
            if m["role"] == "tool":
                d.update({k: m[k] for k in ("tool_call_id", "name") if k in m})
        d["content"] = _ph("c", i) if probe and content else content
        out.append(d)
    return out


def render(messages: list[dict], tokenizer, add_generation_prompt: bool, tools=None, thinking=None) -> str:
    return apply(tokenizer, _prepare(messages, native_reasoning(tokenizer), False), add_generation_prompt, tools,
                 thinking)


def _variants(text: str) -> list[str]:
    return [text, text.strip(), text.lstrip("\n"), text.rstrip(), text.strip("\n")]


def _candidates(field: str, messages: list[dict], native: bool, quoted: bool) -> list[tuple[str, str]]:
    """(text, kind) the template may have written for a placeholder; a quoted placeholder was JSON-encoded."""
    kind, i, k = field[1], int(field[2:].split(".")[0]), int(field.split(".")[1][:-1])
    m = messages[i]
    if kind == "c":
        base = m["content"] if native or m["role"] != "assistant" else inline_reasoning_text(m)
        raw = _variants(base)
        if "</think>" in base:  # templates that cut earlier turns' reasoning out of the reply (DeepSeek-R1, QwQ)
            raw += _variants(base.split("</think>")[-1])
    elif kind == "r":
        raw = _variants(m["reasoning"])
    elif kind == "n":
        raw = [m["tool_calls"][k]["function"]["name"]]
    else:
        args = m["tool_calls"][k]["function"]["arguments"]
        raw = [tojson(args), tojson(args, indent=4), json.dumps(args)]
        return [(t, "call") for t in raw]  # the JSON itself (quoted placeholder: the template ran tojson)
    if quoted:
        return [(tojson(t), _KIND[kind]) for t in raw] + [(f'"{t}"', _KIND[kind]) for t in raw]
    return [(t, _KIND[kind]) for t in raw]


def _split_inline_think(text: str, i: int, m: dict) -> list[Piece]:
    """A reply written with its reasoning inline: think tags, reasoning and reply as separate pieces."""
    r = m.get("reasoning")
    if r and text.startswith(INLINE_THINK[0] + r + "\n</think>"):
        a, b = len(INLINE_THINK[0]), len(INLINE_THINK[0]) + len(r)
        c = text.index("</think>", b) + len("</think>")
        while c < len(text) and text[c] == "\n":
            c += 1
        out = [Piece(text[:a], i, "reasoning_tag"), Piece(r, i, "reasoning"), Piece(text[b:c], i, "reasoning_tag")]
        return out + ([Piece(text[c:], i, "content")] if text[c:] else [])
    return [Piece(text, i, "content")]


def _align(text: str, probe: str, messages: list[dict], native: bool) -> list[tuple[str, int, str]]:
    """(text, message, kind) segments of `text`; template segments get message -2 (owner decided later)."""
    segments: list[tuple[str, int, str]] = []
    fields = []
    last = 0
    for m in _FIELD_RE.finditer(probe):
        a, b = m.span()
        quoted = probe[a - 1:a] == '"' and probe[b:b + 1] == '"'
        if quoted:
            a, b = a - 1, b + 1
        fields.append((probe[last:a], m.group(), quoted))
        last = b
    tail = probe[last:]
    pos = 0
    for n, (between, field, quoted) in enumerate(fields):
        if not text.startswith(between, pos):
            raise TemplateError("the tokenizer's chat_template renders differently when the data change "
                                f"(near {text[pos:pos + 40]!r}); it cannot be split into pieces")
        if between:
            segments.append((between, -2, "template"))
        pos += len(between)
        i = int(field[2:].split(".")[0])
        nxt = fields[n + 1][0] if n + 1 < len(fields) else tail
        best = None
        for cand, kind in _candidates(field, messages, native, quoted):
            if text.startswith(cand, pos) and text.startswith(nxt, pos + len(cand)) and (best is None or len(cand) > len(best[0])):
                best = (cand, kind)
        if best is None:
            raise TemplateError(f"the tokenizer's chat_template altered the {_KIND[field[1]]} of message {i}; "
                                "use a built-in --template")
        segments.append((best[0], i, best[1]))
        pos += len(best[0])
    if text[pos:] != tail:
        raise TemplateError("the tokenizer's chat_template renders differently when the data change; "
                            "it cannot be split into pieces")
    if tail:
        segments.append((tail, -2, "template"))
    return segments


def _check_unplaced_data(messages: list[dict], tools, specials: re.Pattern | None) -> None:
    """Tool definitions, call ids and tool names reach a model's own template as they are (templates read their
    fields), so they are not placeholders: refuse one holding a special-token string, which would render as a
    control token (a forged turn) instead of text."""
    if specials is None:
        return
    data = [json.dumps(tools or [], ensure_ascii=False)]
    for m in messages:
        data += [c["id"] for c in m.get("tool_calls") or []] + [m.get(k) or "" for k in ("tool_call_id", "name")]
    for text in data:
        if found := specials.search(text):
            raise TemplateError(f"a tool definition, call id or tool name holds the special token {found.group()!r}, "
                                "which the model's own template would render as a control token")


def _first_special_end(text: str, specials: re.Pattern | None) -> int:
    m = specials.search(text) if specials else None
    if not m:
        return 0
    end = m.end()
    while end < len(text) and text[end] in "\n":
        end += 1
    return end


def _last_special_end(text: str, specials: re.Pattern | None) -> int:
    ends = [m.end() for m in specials.finditer(text)] if specials else []
    return ends[-1] if ends else len(text.rstrip())


def turn_span(messages: list[dict], tokenizer, tools=None) -> tuple[str, int, int]:
    """For the last message (an assistant turn): (its last-turn rendering, where its output starts, where its
    end of turn ends). The output starts after the longest generation prompt (any `enable_thinking`) for the
    messages before it that the rendering starts with."""
    from data.tokenizer import run_encoder

    full = render(messages, tokenizer, False, tools)
    prompts = {render(messages[:-1], tokenizer, True, tools, thinking) for thinking in (None, False, True)}
    starts = [len(p) for p in prompts if full.startswith(p)]
    if not starts:
        raise TemplateError(f"the tokenizer's chat_template renders message {len(messages) - 1} so that it does not "
                            "start with its own generation prompt; it cannot be trained in its inference context")
    g = max(starts)
    return full, g, g + _last_special_end(full[g:], run_encoder(tokenizer)._special_re)


def jinja_pieces(messages: list[dict], tokenizer, add_generation_prompt: bool, tools=None, thinking=None) -> list[Piece]:
    from data.tokenizer import run_encoder

    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("template 'tokenizer' was chosen but the tokenizer has no chat_template")
    native = native_reasoning(tokenizer)
    specials = run_encoder(tokenizer)._special_re
    _check_unplaced_data(messages, tools, specials)
    text = render(messages, tokenizer, add_generation_prompt, tools, thinking)
    probe = apply(tokenizer, _prepare(messages, native, True), add_generation_prompt, tools, thinking)
    segments = _align(text, probe, messages, native)

    # owners of template text: between two data of one message, that message; between two messages, the earlier
    # one up to its first special token (its end of turn), the later one after it; after the last datum, the
    # generation prompt (if any) belongs to no message
    owned: list[tuple[str, int, str]] = []
    data_at = [k for k, s in enumerate(segments) if s[1] >= 0]
    for k, (seg, msg, kind) in enumerate(segments):
        if msg >= 0:
            owned.append((seg, msg, kind))
            continue
        before = next((segments[j][1] for j in reversed(data_at) if j < k), None)
        after = next((segments[j][1] for j in data_at if j > k), None)
        if before is None or before == after:
            owned.append((seg, after if after is not None else HEADER, "template"))
            continue
        cut = _first_special_end(seg, specials) if after is not None or add_generation_prompt else len(seg)
        owned += [(seg[:cut], before, "template"), (seg[cut:], after if after is not None else HEADER, "template")]
    pieces = []
    for seg, msg, kind in owned:
        if not seg:
            continue
        m = messages[msg] if msg >= 0 else None
        if kind == "content" and m is not None and m["role"] == "assistant" and not native:
            pieces += _split_inline_think(seg, msg, m)
        else:
            pieces.append(Piece(seg, msg, kind))

    # the model's output of every assistant turn rendered exactly as its own last turn: what it writes, by kind
    for t, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            full, g, e = turn_span(messages[:t + 1], tokenizer, tools)
        except TemplateError:  # never trainable in its inference context: stays context (data/samples.py)
            continue
        if text.startswith(full[:e]):
            pieces = _mark_output(pieces, t, g, e)
    return pieces


def _mark_output(pieces: list[Piece], t: int, g: int, e: int) -> list[Piece]:
    """Pieces with [g, e) owned by turn t and its template text typed as the model's think tags, tool-call
    format or end of turn; pieces are split at g and e (a datum may not straddle them)."""
    out: list[Piece] = []
    pos = 0
    for p in pieces:
        a, b = pos, pos + len(p.text)
        pos = b
        cuts = sorted({a, b, *(x for x in (g, e) if a < x < b)})
        if len(cuts) > 2 and p.kind in PLAIN_KINDS:
            raise TemplateError(f"the generation prompt or end of turn of message {t} falls inside a message's text")
        for x, y in zip(cuts, cuts[1:]):
            if g <= x < e:
                out.append(Piece(p.text[x - a:y - a], t, "?" if p.kind == "template" else p.kind))
            elif p.msg == t and p.kind in OUTPUT_KINDS:  # the generation prompt already holds it (QwQ's `<think>`)
                if p.kind in PLAIN_KINDS and x < g:
                    raise TemplateError(f"the generation prompt of message {t} holds part of its text")
                out.append(Piece(p.text[x - a:y - a], p.msg, "template"))
            else:
                out.append(Piece(p.text[x - a:y - a], p.msg, p.kind))
    # type the template text inside the output by its neighbours among the turn's data
    k = 0
    while k < len(out):
        if out[k].kind != "?":
            k += 1
            continue
        prev = next((out[j].kind for j in range(k - 1, -1, -1) if out[j].msg == t and out[j].kind in PLAIN_KINDS), None)
        nxt = next((out[j].kind for j in range(k + 1, len(out)) if out[j].msg == t and out[j].kind in PLAIN_KINDS), None)
        text = out[k].text
        if nxt == "reasoning":
            kind = "reasoning_tag"
        elif prev == "reasoning" and nxt is not None and "</think>" in text:  # perhaps followed by a call's opening
            cut = text.find("</think>") + len("</think>")
            while cut < len(text) and text[cut] == "\n":
                cut += 1
            if text[cut:]:
                out.insert(k + 1, Piece(text[cut:], t, "?"))
            text, kind = text[:cut], "reasoning_tag"
        else:
            kind = "call_tag" if nxt is not None else "eot"
        out[k] = Piece(text, t, kind)
        k += 1
    return out
