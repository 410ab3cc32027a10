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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from data.templates import HEADER, Piece, render_pieces
from data.tokenizer import run_encoder

IGNORE_INDEX = -100
MASKS = ("assistant", "last", "all")
OVERFLOW_POLICIES = ("truncate", "drop", "split")
Mask = Literal["assistant", "last", "all"]
Overflow = Literal["truncate", "drop", "split"]


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

    def as_dict(self) -> dict:
        return {"input_ids": self.input_ids, "labels": self.labels}


@dataclass
class ConversationResult:
    samples: list[Encoded]
    dropped: list[str]  # reasons, one per sample (or whole conversation) that was dropped
    truncated: int = 0
    split_into: int = 1


def supervised_messages(messages: Sequence[dict], mask: Mask) -> set[int]:
    """Indices of messages that carry loss: by the mask strategy, overridden by a per-message `train`."""
    if mask not in MASKS:
        raise ValueError(f"--mask must be one of {', '.join(MASKS)}, got {mask!r}")
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if mask == "last":
        chosen = set(assistants[-1:])
    else:
        chosen = set(assistants) if mask == "assistant" else set(range(len(messages)))
    for i, m in enumerate(messages):
        if m.get("train") is True:
            chosen.add(i)
        elif m.get("train") is False:
            chosen.discard(i)
    return chosen


def _piece_supervised(piece: Piece, chosen: set[int], mask: Mask) -> bool:
    if mask == "all" and (piece.msg in chosen or piece.msg == HEADER):
        return True  # every token, template text included (unless a message opted out with train=false)
    return piece.kind in ("content", "eot") and piece.msg in chosen


def _encode_pieces_batch(batch: list[tuple[list[Piece], set[int]]], tokenizer, mask: Mask) -> list[Encoded]:
    """Tokenize many rendered conversations with two batched backend calls."""
    enc = run_encoder(tokenizer)
    # Per conversation: a list of items, each ("run", run_index, [(start, end, piece_idx)]) or ("special", id, piece_idx)
    layouts: list[list[tuple]] = []
    runs: list[tuple[str, bool]] = []
    for pieces, _ in batch:
        items: list[tuple] = []
        buf: list[str] = []
        spans: list[tuple[int, int, int]] = []
        pos = 0
        at_start = True

        def flush():
            nonlocal buf, spans, pos, at_start
            if buf:
                items.append(("run", len(runs), spans))
                runs.append(("".join(buf), at_start))
                at_start = False
            buf, spans, pos = [], [], 0

        for pi, piece in enumerate(pieces):
            parts = [(piece.text, None)] if piece.kind == "content" else enc.split_specials(piece.text)
            for text, special_id in parts:
                if special_id is None:
                    buf.append(text)
                    spans.append((pos, pos + len(text), pi))
                    pos += len(text)
                else:
                    flush()
                    items.append(("special", special_id, pi))
                    at_start = False
        flush()
        layouts.append(items)

    encoded_runs = enc.encode_runs(runs)
    out: list[Encoded] = []
    for (pieces, chosen), items in zip(batch, layouts):
        sup = [_piece_supervised(p, chosen, mask) for p in pieces]
        ids: list[int] = list(enc.prefix_ids)
        labels: list[int] = [IGNORE_INDEX] * len(ids)
        owner: list[int] = [HEADER] * len(ids)
        for item in items:
            if item[0] == "special":
                _, tid, pi = item
                ids.append(tid)
                labels.append(tid if sup[pi] else IGNORE_INDEX)
                owner.append(pieces[pi].msg)
                continue
            _, ri, spans = item
            run_ids, offsets = encoded_runs[ri]
            if not run_ids:
                continue
            run_ids_np = np.asarray(run_ids, dtype=np.int64)
            off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            starts = np.fromiter((a for a, _, _ in spans), dtype=np.int64, count=len(spans))
            lengths = np.fromiter((b - a for a, b, _ in spans), dtype=np.int64, count=len(spans))
            span_sup = np.fromiter((sup[pi] for _, _, pi in spans), dtype=np.int64, count=len(spans))
            span_msg = np.fromiter((pieces[pi].msg for _, _, pi in spans), dtype=np.int64, count=len(spans))
            # A token is supervised when any character it covers belongs to a supervised piece;
            # an empty span (a lone dummy prefix) takes the supervision of the piece at its position.
            char_sup = np.concatenate(([0], np.cumsum(np.repeat(span_sup, lengths))))
            s, e = off[:, 0], off[:, 1]
            covered = char_sup[e] - char_sup[s] > 0
            at = np.searchsorted(starts, s, side="right") - 1
            empty = e <= s
            tok_sup = np.where(empty, span_sup[np.clip(at, 0, None)] > 0, covered)
            last_char = np.where(empty, s, e - 1)
            tok_owner = span_msg[np.clip(np.searchsorted(starts, last_char, side="right") - 1, 0, None)]
            ids.extend(run_ids)
            labels.extend(np.where(tok_sup, run_ids_np, IGNORE_INDEX).tolist())
            owner.extend(tok_owner.tolist())
        ids.extend(enc.suffix_ids)
        labels.extend([IGNORE_INDEX] * len(enc.suffix_ids))
        owner.extend([HEADER] * len(enc.suffix_ids))
        out.append(Encoded(ids, labels, owner))
    return out


def _truncate(ex: Encoded, max_length: int) -> Encoded:
    """Keep whole leading turns that fit, then cut; a cut turn that carries no loss is removed entirely."""
    ids, labels, owner = ex.input_ids[:max_length], ex.labels[:max_length], ex.token_msg[:max_length]
    cut_msg = ex.token_msg[max_length]
    if owner and owner[-1] == cut_msg and all(
        lab == IGNORE_INDEX for lab, o in zip(labels, owner) if o == cut_msg
    ):
        keep = len(owner)
        while keep and owner[keep - 1] == cut_msg:
            keep -= 1
        ids, labels, owner = ids[:keep], labels[:keep], owner[:keep]
    return Encoded(ids, labels, owner, truncated=True)


def _exchanges(messages: Sequence[dict]) -> tuple[list[int], list[list[int]]]:
    """System message indices and the user→assistant exchanges (lists of message indices) after it."""
    head = [i for i, m in enumerate(messages) if m["role"] == "system"]
    groups: list[list[int]] = []
    for i, m in enumerate(messages):
        if m["role"] == "system":
            continue
        if m["role"] == "user" or not groups or messages[groups[-1][-1]]["role"] == "assistant":
            groups.append([i])
        else:
            groups[-1].append(i)
    return head, groups


def _n_supervised(ex: Encoded) -> int:
    return sum(1 for lab in ex.labels if lab != IGNORE_INDEX)


def tokenize_batch(
    conversations: Sequence[Sequence[dict]],
    tokenizer,
    template: str = "vicuna_v1.1",
    max_length: int | None = None,
    mask: Mask = "assistant",
    overflow: Overflow = "truncate",
) -> list[ConversationResult]:
    """Tokenize many normalized conversations; per conversation the kept samples and drop reasons."""
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"--truncation must be one of {', '.join(OVERFLOW_POLICIES)}, got {overflow!r}")
    if max_length is not None and max_length < 2:
        raise ValueError(f"--model_max_length must be >= 2, got {max_length}")
    jobs = [(render_pieces(list(msgs), template, tokenizer), supervised_messages(msgs, mask)) for msgs in conversations]
    full = _encode_pieces_batch(jobs, tokenizer, mask)

    results: list[ConversationResult] = []
    split_jobs: list[tuple[int, list[dict], set[int]]] = []
    for ci, (msgs, ex) in enumerate(zip(conversations, full)):
        res = ConversationResult([], [])
        results.append(res)
        if max_length is None or len(ex.input_ids) <= max_length:
            res.samples.append(ex)
        elif overflow == "drop":
            res.dropped.append(f"too long ({len(ex.input_ids)} tokens > max_length {max_length})")
            continue
        elif overflow == "truncate":
            res.samples.append(_truncate(ex, max_length))
            res.truncated = 1
        else:
            # Greedy packing of whole exchanges, using token counts from the full encoding, then each
            # part is re-rendered as its own conversation (with the system prompt) and re-tokenized.
            head, groups = _exchanges(msgs)
            counts = [0] * (len(msgs) + 1)
            for o in ex.token_msg:
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
            chosen_full = supervised_messages(msgs, mask)
            for part in parts:
                idx = head + part
                sub = [msgs[i] for i in idx]
                chosen = {j for j, i in enumerate(idx) if i in chosen_full}
                split_jobs.append((ci, sub, chosen))
            res.split_into = len(parts)
    if split_jobs:
        encoded = _encode_pieces_batch([(render_pieces(s, template, tokenizer), ch) for _, s, ch in split_jobs], tokenizer, mask)
        for (ci, _, _), ex in zip(split_jobs, encoded):
            if len(ex.input_ids) > max_length:
                ex = _truncate(ex, max_length)
                results[ci].truncated += 1
            results[ci].samples.append(ex)

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
) -> dict:
    """[contract] One conversation → {"input_ids", "labels"} (equal length; -100 where no loss).

    Raises DroppedSample when the policy drops it or nothing is left to learn. For `overflow="split"`,
    which yields several samples, use `tokenize_batch`.
    """
    if overflow == "split":
        raise ValueError("overflow='split' yields several samples; use data.tokenize.tokenize_batch")
    (res,) = tokenize_batch([messages], tokenizer, template, max_length, mask, overflow)
    if not res.samples:
        raise DroppedSample(res.dropped[0])
    ex = res.samples[0]
    return {"input_ids": ex.input_ids, "labels": ex.labels, "truncated": ex.truncated}
