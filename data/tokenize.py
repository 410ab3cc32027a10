"""Render + tokenize conversations into `(input_ids, labels)`, supervision decided by construction.

Pipeline for one conversation (all pure functions of their inputs):
  pieces = render_pieces(messages, template)          # data/templates.py
  runs   = text between template special tokens       # content is never parsed for specials
  ids    = RunEncoder.encode_runs(runs) + special ids  # data/tokenizer.py, proven equal to whole-string ids
  labels = ids where the token overlaps a supervised piece (assistant content + its end-of-turn), else -100

A token that straddles a piece boundary (SentencePiece's `▁reply` takes the template's space) is
supervised when it overlaps supervised text, so every character of a reply is learned and only
whitespace of the template can ride along. Labels are *not* shifted here; the collator does that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Literal

from data.flags import flag_name
from data.pieces import PLAIN_KINDS
from data.samples import REASONING_HISTORY, plan_samples
from data.templates import (
    HEADER,
    TEMPLATE_NAMES,
    Piece,
    TemplateError,
    jinja_chat_template,
    render_pieces,
    render_text,
)
from data.tokenizer import run_encoder

IGNORE_INDEX = -100
MASKS = ("assistant", "last", "all")
OVERFLOW_POLICIES = ("truncate", "drop", "split")
REASONING_POLICIES = ("train", "mask", "drop")
Mask = Literal["assistant", "last", "all"]
Overflow = Literal["truncate", "drop", "split"]
Reasoning = Literal["train", "mask", "drop"]


class DroppedSample(ValueError):
    """A conversation produced no trainable sample; `reason` says why (it is counted, never silent)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    token_msg: list[int]  # message index owning each token (HEADER for template-only text)
    truncated: bool = False
    token_kind: list[str] | None = None  # piece kind of each token (tokenize_batch(kinds=True) only)

    def as_dict(self) -> dict:
        return {"input_ids": self.input_ids, "labels": self.labels}


@dataclass
class ConversationResult:
    samples: list[Encoded]
    dropped: list[str]  # reasons, one per sample (or whole conversation) that was dropped
    truncated: int = 0
    split_into: int = 1
    expanded_into: int = 1  # samples the inference-context rule made of it (data/samples.py)
    inexact_turns: int = 0  # supervised turns left as context (--reasoning_history exact)


def conversation_parts(conversation) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) of a conversation given as a messages list or as a record {"messages", "tools"?}."""
    if isinstance(conversation, dict):
        return list(conversation["messages"]), conversation.get("tools")
    return list(conversation), None


def apply_reasoning_policy(messages: list[dict], reasoning: str, flags: Mapping[str, str] | None = None) -> list[dict]:
    """--reasoning drop removes assistant reasoning before rendering; train/mask keep it (mask: no loss).
    `flags`: how the caller spells its options in messages (data/flags.py)."""
    if reasoning not in REASONING_POLICIES:
        raise ValueError(f"{flag_name('reasoning', flags)} must be one of {', '.join(REASONING_POLICIES)}, "
                         f"got {reasoning!r}")
    if reasoning != "drop" or not any("reasoning" in m for m in messages):
        return messages
    return [{k: v for k, v in m.items() if k != "reasoning"} for m in messages]


def supervised_messages(messages: Sequence[dict], mask: Mask, flags: Mapping[str, str] | None = None) -> set[int]:
    """Indices of messages that carry loss: by the mask strategy, overridden by a per-message `train`."""
    if mask not in MASKS:
        raise ValueError(f"{flag_name('mask', flags)} must be one of {', '.join(MASKS)}, got {mask!r}")
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if mask == "last":
        chosen = set(assistants[-1:])
    else:
        chosen = set(assistants) if mask == "assistant" else set(range(len(messages)))
    for i, m in enumerate(messages):
        if m["role"] == "tool" or m.get("train") is False:  # a tool's result is never the model's to learn
            chosen.discard(i)
        elif m.get("train") is True:
            chosen.add(i)
    return chosen


_BY_TURN = frozenset({"content", "eot", "call", "call_tag"})
_REASONING = frozenset({"reasoning", "reasoning_tag"})


def _piece_supervised(piece: Piece, chosen: set[int], mask: Mask, reasoning: str = "train") -> bool:
    if piece.kind in _REASONING:
        return reasoning == "train" and piece.msg in chosen
    if mask == "all" and (piece.msg in chosen or piece.msg == HEADER):
        return True  # every token, template text included (unless a message opted out with train=false)
    return piece.kind in _BY_TURN and piece.msg in chosen


def _encode_pieces_batch(batch: list[tuple[list[Piece], set[int]]], tokenizer, mask: Mask,
                         reasoning: str = "train", kinds: bool = False) -> list[Encoded]:
    """Tokenize many rendered conversations with two batched backend calls.

    Every text run of the batch is laid out in one global character space; each text piece is a span
    of it with a supervision flag and an owning message. A token is supervised when it overlaps a
    supervised span, and owned by the message of the last span it touches (`kinds`: also typed by that span's
    piece kind, for inspection and statistics).
    """
    enc = run_encoder(tokenizer)
    layouts: list[list[tuple]] = []  # per conversation: ("run", run_index) | ("special", id, supervised, msg)
    runs: list[tuple[str, bool]] = []
    run_span_counts: list[int] = []
    span_start: list[int] = []
    span_len: list[int] = []
    span_sup: list[bool] = []
    span_msg: list[int] = []
    span_kind: list[str] = []
    base = 0
    for pieces, chosen in batch:
        items: list[tuple] = []
        buf: list[str] = []
        at_start = True
        for piece in pieces:
            sup = _piece_supervised(piece, chosen, mask, reasoning)
            parts = [(piece.text, None)] if piece.kind in PLAIN_KINDS else enc.split_specials(piece.text)
            for text, special_id in parts:
                if special_id is None:
                    span_start.append(base)
                    span_len.append(len(text))
                    span_sup.append(sup)
                    span_msg.append(piece.msg)
                    span_kind.append(piece.kind)
                    buf.append(text)
                    base += len(text)
                    continue
                if buf:
                    items.append(("run", len(runs)))
                    runs.append(("".join(buf), at_start))
                    run_span_counts.append(len(buf))
                    buf = []
                items.append(("special", special_id, sup, piece.msg, piece.kind))
                at_start = False
        if buf:
            items.append(("run", len(runs)))
            runs.append(("".join(buf), at_start))
            run_span_counts.append(len(buf))
        layouts.append(items)
    run_bases = [0, *accumulate(len(t) for t, _ in runs)][:-1]  # where each run starts in the char space

    # Per run, each span's token range comes from the backend's char→token map (no per-token offsets
    # needed): first = token holding the span's first char; last = token holding its last char, or the
    # token just before the next span's first token when several tokens share a char (byte fallback).
    # A token is supervised when it overlaps a supervised span, and owned by the last span it touches.
    encodings = enc.encode_runs_raw(runs)
    run_ids: list[list[int]] = []
    run_labels: list[list[int]] = []
    run_owner: list[list[int]] = []
    run_kind: list[list[str]] = []
    k = 0  # index of the run's first span in the span lists
    for run_base, (text, _), encoding, n_spans in zip(run_bases, runs, encodings, run_span_counts):
        ids = encoding.ids
        n = len(ids)
        labels = [IGNORE_INDEX] * n
        owner = [HEADER] * n
        kind = ["template"] * n if kinds else None
        c2t = encoding.char_to_token
        length = len(text)
        for j in range(k, k + n_spans):
            a = span_start[j] - run_base
            b = a + span_len[j]
            if b <= a:
                continue
            first = c2t(a)
            last = n - 1 if b >= length else max(c2t(b - 1), c2t(b) - 1)
            if first is None:
                continue
            owner[first:last + 1] = [span_msg[j]] * (last + 1 - first)
            if kinds:
                kind[first:last + 1] = [span_kind[j]] * (last + 1 - first)
            if span_sup[j]:
                labels[first:last + 1] = ids[first:last + 1]
        k += n_spans
        run_ids.append(ids)
        run_labels.append(labels)
        run_owner.append(owner)
        run_kind.append(kind)

    out: list[Encoded] = []
    for (pieces, _), items in zip(batch, layouts):
        starts_with_prefix = bool(enc.prefix_text) and "".join(p.text for p in pieces[:4]).startswith(enc.prefix_text)
        ids: list[int] = [] if starts_with_prefix else list(enc.prefix_ids)
        labels: list[int] = [IGNORE_INDEX] * len(ids)
        owner: list[int] = [HEADER] * len(ids)
        kind: list[str] | None = ["template"] * len(ids) if kinds else None
        for item in items:
            if item[0] == "special":
                _, tid, sup, msg, piece_kind = item
                ids.append(tid)
                labels.append(tid if sup else IGNORE_INDEX)
                owner.append(msg)
                if kinds:
                    kind.append(piece_kind)
            else:
                ids.extend(run_ids[item[1]])
                labels.extend(run_labels[item[1]])
                owner.extend(run_owner[item[1]])
                if kinds:
                    kind.extend(run_kind[item[1]])
        ids.extend(enc.suffix_ids)
        labels.extend([IGNORE_INDEX] * len(enc.suffix_ids))
        owner.extend([HEADER] * len(enc.suffix_ids))
        if kinds:
            kind.extend(["template"] * len(enc.suffix_ids))
        out.append(Encoded(ids, labels, owner, token_kind=kind))
    return out


def _truncate(ex: Encoded, max_length: int) -> Encoded:
    """Keep whole leading turns that fit, then cut; a cut turn that carries no loss is removed entirely."""
    ids, labels, owner = ex.input_ids[:max_length], ex.labels[:max_length], ex.token_msg[:max_length]
    kind = ex.token_kind[:max_length] if ex.token_kind is not None else None
    cut_msg = ex.token_msg[max_length]
    if owner and owner[-1] == cut_msg and all(
        lab == IGNORE_INDEX for lab, o in zip(labels, owner) if o == cut_msg
    ):
        keep = len(owner)
        while keep and owner[keep - 1] == cut_msg:
            keep -= 1
        ids, labels, owner = ids[:keep], labels[:keep], owner[:keep]
        kind = kind[:keep] if kind is not None else None
    return Encoded(ids, labels, owner, truncated=True, token_kind=kind)


def _exchanges(messages: Sequence[dict]) -> tuple[list[int], list[list[int]]]:
    """System message indices and the exchanges after it: each starts at a user message and runs to the next one,
    so a tool call, its results and the reply that uses them always stay together."""
    head = [i for i, m in enumerate(messages) if m["role"] == "system"]
    groups: list[list[int]] = []
    for i, m in enumerate(messages):
        if m["role"] == "system":
            continue
        if m["role"] == "user" or not groups:
            groups.append([i])
        else:
            groups[-1].append(i)
    return head, groups


def plan_split(msgs: Sequence[dict], token_msg: list[int], max_length: int) -> list[list[int]]:
    """Message indices of each part when splitting an over-long conversation at exchange boundaries:
    greedy packing of whole exchanges (a user turn up to the next one, tool calls and results included), using
    the token counts of the full encoding; every part starts with the system prompt. No message is lost; an
    exchange longer than max_length on its own becomes a part by itself."""
    head, groups = _exchanges(msgs)
    counts = [0] * (len(msgs) + 1)
    for o in token_msg:
        counts[o] += 1  # HEADER (-1) lands in the last slot
    head_len = counts[-1] + sum(counts[i] for i in head)
    parts: list[list[int]] = []
    size = 0
    for g in groups:
        g_len = sum(counts[i] for i in g)
        if parts and size + g_len <= max_length:
            parts[-1].extend(g)
            size += g_len
        else:
            parts.append(list(g))
            size = head_len + g_len
    return [head + part for part in parts]


def split_conversations(conversations: Sequence, tokenizer, template: str,
                        max_length: int) -> list[tuple[list[list[dict]], int]]:
    """Each conversation as (parts that fit max_length tokens with the real template, its full length
    in tokens); split at exchange boundaries (see plan_split). One that fits comes back as one part."""
    convs = [conversation_parts(c) for c in conversations]

    def encode(batch):
        return _encode_pieces_batch([(render_pieces(m, template, tokenizer, tools=t), set()) for m, t in batch],
                                    tokenizer, "assistant")

    out = []
    for (msgs, tools), ex in zip(convs, encode(convs)):
        parts = [list(msgs)]
        if len(ex.input_ids) > max_length:
            parts = [[msgs[i] for i in idx] for idx in plan_split(msgs, ex.token_msg, max_length)]
            for _ in range(2):  # plan an over-long part again from its own counts (see tokenize_batch)
                lengths = encode([(p, tools) for p in parts])
                if all(len(e.input_ids) <= max_length or len(_exchanges(p)[1]) == 1 for p, e in zip(parts, lengths)):
                    break
                parts = [[p[i] for i in idx] if len(e.input_ids) > max_length else p
                         for p, e in zip(parts, lengths)
                         for idx in (plan_split(p, e.token_msg, max_length) if len(e.input_ids) > max_length
                                     else [range(len(p))])]
        out.append((parts, len(ex.input_ids)))
    return out


def _n_supervised(ex: Encoded) -> int:
    return len(ex.labels) - ex.labels.count(IGNORE_INDEX)


def _planned(msgs: list[dict], tools, chosen: set[int], template: str, tokenizer, history: str, res) -> list[tuple]:
    """(messages, tools, chosen) of each sample the inference-context rule makes of one conversation."""
    plans, inexact = plan_samples(msgs, tools, chosen, template, tokenizer, history)
    res.inexact_turns += inexact
    return [(msgs[:p.end + 1], tools, p.chosen) for p in plans]


def tokenize_batch(
    conversations: Sequence,
    tokenizer,
    template: str = "vicuna_v1.1",
    max_length: int | None = None,
    mask: Mask = "assistant",
    overflow: Overflow = "truncate",
    reasoning: Reasoning = "train",
    reasoning_history: str = "expand",
    kinds: bool = False,
    flags: Mapping[str, str] | None = None,
) -> list[ConversationResult]:
    """Tokenize many normalized conversations (messages lists, or records {"messages", "tools"?}); per
    conversation the kept samples and drop reasons. A conversation may become several samples: by the
    inference-context rule (data/samples.py) and by the `split` policy. `flags`: how the calling entry point
    spells the options its error messages name (data/flags.py; default: training's)."""
    def bad(option: str, choices: Sequence[str], got) -> ValueError:
        return ValueError(f"{flag_name(option, flags)} must be one of {', '.join(choices)}, got {got!r}")

    if overflow not in OVERFLOW_POLICIES:
        raise bad("truncation", OVERFLOW_POLICIES, overflow)
    if max_length is not None and max_length < 2:
        raise ValueError(f"{flag_name('max_length', flags)} must be >= 2, got {max_length}")
    if reasoning_history not in REASONING_HISTORY:
        raise bad("reasoning_history", REASONING_HISTORY, reasoning_history)
    if reasoning not in REASONING_POLICIES:
        raise bad("reasoning", REASONING_POLICIES, reasoning)
    if mask not in MASKS:
        raise bad("mask", MASKS, mask)
    if template not in TEMPLATE_NAMES:  # a wrong name is the run's error, not every record's
        raise TemplateError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATE_NAMES)}")
    if template == "tokenizer" and not getattr(tokenizer, "chat_template", None):
        raise TemplateError("template 'tokenizer' was chosen but the tokenizer has no chat_template")
    results: list[ConversationResult] = []
    jobs: list[tuple[int, list[dict], object, set[int]]] = []  # (conversation, messages, tools, chosen)
    for ci, conv in enumerate(conversations):
        res = ConversationResult([], [])
        results.append(res)
        msgs, tools = conversation_parts(conv)
        msgs = apply_reasoning_policy(msgs, reasoning)
        try:
            samples = _planned(msgs, tools, supervised_messages(msgs, mask), template, tokenizer, reasoning_history, res)
        except TemplateError as e:
            res.dropped.append(f"template: {e}")
            continue
        res.expanded_into = len(samples)
        jobs += [(ci, *s) for s in samples]

    def encode(batch):
        out = []
        for ci, sub, tools, chosen in batch:
            try:
                out.append((ci, sub, tools, chosen, render_pieces(sub, template, tokenizer, tools=tools)))
            except TemplateError as e:
                results[ci].dropped.append(f"template: {e}")
        encoded = _encode_pieces_batch([(pieces, chosen) for *_, chosen, pieces in out], tokenizer, mask, reasoning,
                                       kinds)
        return [(*job[:4], ex) for job, ex in zip(out, encoded)]

    split_jobs: list[tuple[int, list[dict], object, set[int]]] = []
    for ci, sub, tools, chosen, ex in encode(jobs):
        res = results[ci]
        if max_length is None or len(ex.input_ids) <= max_length:
            res.samples.append(ex)
        elif overflow == "drop":
            res.dropped.append(f"too long ({len(ex.input_ids)} tokens > max_length {max_length})")
        elif overflow == "truncate":
            res.samples.append(_truncate(ex, max_length))
            res.truncated += 1
        else:
            parts = plan_split(sub, ex.token_msg, max_length)
            res.split_into += len(parts) - 1
            for idx in parts:
                part = [sub[i] for i in idx]
                part_chosen = {j for j, i in enumerate(idx) if i in chosen}
                try:  # a part renders its own last turn: the rule may need more samples there
                    split_jobs += [(ci, *s) for s in _planned(part, tools, part_chosen, template, tokenizer,
                                                              reasoning_history, res)]
                except TemplateError as e:
                    res.dropped.append(f"template: {e}")
    for last_round in (False, False, True):  # parts are planned from the whole conversation's token counts; a
        # template that repeats text in every part (llama-3.1's tools in its first user turn) can leave one over:
        # it is planned again from its own counts
        again = []
        for ci, sub, tools, chosen, ex in encode(split_jobs):
            if len(ex.input_ids) > max_length and not last_round and len(_exchanges(sub)[1]) > 1:
                parts = plan_split(sub, ex.token_msg, max_length)
                results[ci].split_into += len(parts) - 1
                for idx in parts:
                    again += [(ci, *s) for s in _planned([sub[i] for i in idx], tools,
                                                         {j for j, i in enumerate(idx) if i in chosen}, template,
                                                         tokenizer, reasoning_history, results[ci])]
                continue
            if len(ex.input_ids) > max_length:
                ex = _truncate(ex, max_length)
                results[ci].truncated += 1
            results[ci].samples.append(ex)
        split_jobs = again

    for res in results:
        kept = []
        for ex in res.samples:
            if _n_supervised(ex) == 0:
                res.dropped.append("no supervised tokens" + (" after truncation" if ex.truncated else ""))
            else:
                kept.append(ex)
        res.samples = kept
    return results


def tokenize_conversation(
    messages: Sequence[dict],
    tokenizer,
    template: str = "vicuna_v1.1",
    max_length: int | None = None,
    mask: Mask = "assistant",
    overflow: Literal["truncate", "drop"] = "truncate",
    reasoning: Reasoning = "train",
) -> dict:
    """[contract] One conversation → {"input_ids", "labels"} (equal length; -100 where no loss).

    `messages` may also be a record {"messages", "tools"}. Raises DroppedSample when the policy drops it or nothing
    is left to learn. For `overflow="split"`, and for templates that make one conversation several samples (see
    data/samples.py; this returns the first, the whole conversation), use `tokenize_batch`.
    """
    if overflow == "split":
        raise ValueError("overflow='split' yields several samples; use data.tokenize.tokenize_batch")
    (res,) = tokenize_batch([messages], tokenizer, template, max_length, mask, overflow, reasoning)
    if not res.samples:
        raise DroppedSample(res.dropped[0])
    ex = res.samples[0]
    return {"input_ids": ex.input_ids, "labels": ex.labels, "truncated": ex.truncated}


def encode_prompt(messages: Sequence[dict], tokenizer, template: str, tools: list[dict] | None = None,
                  thinking: bool | None = None) -> list[int]:
    """Ids of a conversation followed by the assistant's generation prompt, built exactly as in training."""
    pieces = render_pieces(list(messages), template, tokenizer, add_generation_prompt=True, tools=tools,
                           thinking=thinking)
    return _encode_pieces_batch([(pieces, set())], tokenizer, "assistant")[0].input_ids


def export_chat_template(template: str, tokenizer) -> str:
    """The Jinja `chat_template` an exported tokenizer carries: `apply_chat_template(tokenize=True)` (what vLLM, TGI
    and llama.cpp call, with `add_special_tokens=False`) then gives exactly `encode_prompt`'s ids.

    Training's ids are the tokenizer's own for the rendered text *with* its automatic prefix (Llama's BOS), unless
    the text already starts with it (Llama-3's `<|begin_of_text|>`). So the exported template emits that prefix too.
    SentencePiece tokenizers also put a word-boundary `▁` before text that does not start with a space, but not
    after a special token; for them the template adds that space itself whenever the text does not begin with one.
    """
    source = jinja_chat_template(template, tokenizer)
    enc = run_encoder(tokenizer)
    probe = render_text([{"role": "user", "content": "x"}], template, tokenizer, add_generation_prompt=True)
    if not enc.prefix_ids or probe.startswith(enc.prefix_text):
        return source
    head = "{{- bos_token -}}" if enc.prefix_ids == [tokenizer.bos_token_id] else "{{- " + repr(enc.prefix_text) + " -}}"
    n = len(enc.prefix_ids)
    plain = tokenizer("x", add_special_tokens=False).input_ids
    joined = tokenizer(enc.prefix_text + "x", add_special_tokens=False).input_ids
    spaced = tokenizer(enc.prefix_text + " x", add_special_tokens=False).input_ids
    if joined[n:] == plain or spaced[n:] != plain:
        return head + source
    starts_spaced = {role: _starts_with_space(template, tokenizer, role) for role in ("system", "user")}
    return ("{%- if messages[0]['role'] == 'system' -%}{%- set lead_space = " + starts_spaced["system"] + " -%}"
            "{%- else -%}{%- set lead_space = " + starts_spaced["user"] + " -%}{%- endif -%}"
            + head + "{%- if not lead_space -%}{{ ' ' }}{%- endif -%}" + source)


def _starts_with_space(template: str, tokenizer, first_role: str) -> str:
    """A Jinja expression: does the rendered text begin with a space, for conversations opening with `first_role`?
    Fixed when the text opens with template text; for templates opening with the first message's content (a
    system prompt in vicuna/alpaca), that content followed by the template text after it decides."""
    msgs = ([{"role": "system", "content": "x"}] if first_role == "system" else []) + [{"role": "user", "content": "y"}]
    pieces = render_pieces(msgs, template, tokenizer, add_generation_prompt=True)
    if pieces[0].kind != "content" or pieces[0].msg != 0:
        return "true" if pieces[0].text.startswith(" ") else "false"
    after = pieces[1].text if len(pieces) > 1 else ""
    return "(messages[0]['content'] + " + repr(after) + ")[:1] == ' '"


def end_of_turn(tokenizer, template: str) -> tuple[set[int], list[str]]:
    """What ends an assistant turn for this template: control-token ids and plain stop strings
    (taken from the template's own end-of-turn piece, plus the tokenizer's EOS)."""
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    enc = run_encoder(tokenizer)
    ids: set[int] = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    strings: list[str] = []
    for piece in render_pieces(msgs, template, tokenizer):
        if piece.kind == "eot":
            for text, special_id in enc.split_specials(piece.text):
                if special_id is not None:
                    ids.add(special_id)
                elif text.strip():
                    strings.append(text.strip())
    return ids, strings
