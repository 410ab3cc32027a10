"""Batched decoding of concurrent requests with per-request KV caches (continuous batching).

One engine thread owns the model. Each step it admits waiting requests (up to `max_batch` running), prefills
the newcomers together in one left-padded forward, splices their KV caches into the running batch (left-padded,
with an attention mask and per-row positions), then runs one forward for all running rows and lets each request sample, detokenize and
check its stop conditions on its own row (serve/generation.RequestDecoder: the same code as decoding alone).
A finished or cancelled request leaves the batch at the next step; the others never wait for it.

transformers' own continuous batching (`init_continuous_batching`) is built around paged attention, global
sampling settings and no per-request seed or repetition penalty, and does not take peft or bitsandbytes
models; so the batching here is our own, over the model's ordinary forward and `DynamicCache`.
Models whose cache is not a plain per-layer key/value list (sliding-window layers) decode one request at a time.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from serve.generation import (
    GenerationResult,
    RequestDecoder,
    SamplingParams,
    cache_kwarg,
    returned_cache,
    vocab_size_of,
)

Emit = Callable[[str, object], None]  # ("delta", str) | ("done", GenerationResult) | ("error", str)


@dataclass
class Ticket:
    """A submitted generation. `cancel()` is safe from any thread; the request leaves within one decode step."""

    ids: list[int]
    params: SamplingParams
    stop_token_ids: set[int]
    emit: Emit
    result: GenerationResult = field(default_factory=GenerationResult)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Row:
    ticket: Ticket
    decoder: RequestDecoder
    next_token: int
    position: int  # position id of next_token


class BatchEngine:
    def __init__(self, model, tokenizer, max_batch: int = 8):
        from transformers.cache_utils import DynamicLayer

        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.device = next(model.parameters()).device
        self.vocab = vocab_size_of(model)
        self._cache_arg = cache_kwarg(model)
        self._plain_layer = DynamicLayer
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._rows: list[_Row] = []
        self._cache = None  # DynamicCache of the running rows, (B, heads, T, dim) per layer, left-padded
        self._mask: torch.Tensor | None = None  # (B, T) 1 where a cached position is real
        self._wake = threading.Condition()
        self._stopping = False
        self.batchable = True  # False once a model's cache turns out not to be splicable
        self.steps = 0  # decode forwards run (tests and benchmarks read it)
        self._thread = threading.Thread(target=self._loop, name="chattune-batch-engine", daemon=True)
        self._thread.start()

    # --- any thread ------------------------------------------------------------------------------------
    def submit(self, ids: list[int], params: SamplingParams, stop_token_ids: set[int], emit: Emit) -> Ticket:
        params.validate()
        ticket = Ticket(list(ids), params, set(stop_token_ids), emit)
        with self._wake:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            self._waiting.append(ticket)
            self._wake.notify()
        return ticket

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel everything still queued or running and end the engine thread."""
        with self._wake:
            self._stopping = True
            for t in self._waiting:
                t.cancel()
            for r in self._rows:
                r.ticket.cancel()
            self._wake.notify()
        self._thread.join(timeout)

    # --- engine thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._rows and not self._waiting and not self._stopping:
                    self._wake.wait()
                if self._stopping and not self._rows and not self._waiting:
                    return
                room = self.max_batch - len(self._rows) if self.batchable else (0 if self._rows else 1)
                newcomers = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            try:
                if newcomers:
                    self._admit(newcomers)
                self._drop_finished()
                if self._rows:
                    self._decode_step()
                    self._drop_finished()
            except Exception as e:  # a failing forward must not leave clients waiting forever
                for r in self._rows:
                    self._fail(r.ticket, f"generation failed: {type(e).__name__}: {e}")
                self._rows, self._cache, self._mask = [], None, None

    def _fail(self, ticket: Ticket, message: str) -> None:
        ticket.result.finish_reason = "error"
        ticket.emit("error", message)

    @torch.no_grad()
    def _admit(self, tickets: list[Ticket]) -> None:
        """Prefill the newcomers together (one left-padded forward), sample their first tokens, and splice the
        ones that go on into the running batch."""
        live, decoders = [], []
        for ticket in tickets:
            if ticket.cancelled.is_set():
                ticket.result.finish_reason = "cancelled"
                ticket.emit("done", ticket.result)
                continue
            try:
                decoders.append(RequestDecoder(self.tokenizer, ticket.ids, ticket.params, ticket.stop_token_ids,
                                               ticket.result, self.vocab))
                live.append(ticket)
            except Exception as e:
                self._fail(ticket, f"generation failed: {type(e).__name__}: {e}")
        if not live:
            return
        width = max(len(t.ids) for t in live)
        ids = torch.zeros(len(live), width, dtype=torch.long)
        mask = torch.zeros(len(live), width, dtype=torch.long)
        for i, t in enumerate(live):
            ids[i, width - len(t.ids):] = torch.tensor(t.ids)
            mask[i, width - len(t.ids):] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        except Exception as e:
            for t in live:
                self._fail(t, f"generation failed: {type(e).__name__}: {e}")
            return
        cache = returned_cache(out)
        if not all(type(layer) is self._plain_layer for layer in cache.layers):
            self.batchable = False
        logits = out.logits[:, -1].float().cpu()
        rows, keep = [], []
        for i, (t, decoder) in enumerate(zip(live, decoders)):
            token = _step(t, decoder, logits[i])
            if token is not None:
                rows.append(_Row(t, decoder, token, len(t.ids)))
                keep.append(i)
        if rows:
            self._splice(rows, cache, mask if len(keep) == len(live) else _keep_rows(cache, mask, keep, self.device))

    def _splice(self, rows: list[_Row], cache, mask: torch.Tensor) -> None:
        """Add prefilled requests' cache (and its padding mask) to the running batch, left-padding the shorter side."""
        if self._cache is None:
            self._cache, self._mask, self._rows = cache, mask, rows
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)], dim=0)
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)], dim=0)
        self._mask = torch.cat([_left_pad(self._mask, width, dim=1), _left_pad(mask, width, dim=1)], dim=0)
        self._rows += rows

    @torch.no_grad()
    def _decode_step(self) -> None:
        ids = torch.tensor([[r.next_token] for r in self._rows], device=self.device)
        positions = torch.tensor([[r.position] for r in self._rows], device=self.device)
        mask = torch.cat([self._mask, torch.ones(len(self._rows), 1, dtype=torch.long, device=self.device)], dim=1)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self._cache_arg: self._cache})
        self.steps += 1
        self._cache, self._mask = returned_cache(out), mask
        logits = out.logits[:, -1].float().cpu()
        for i, r in enumerate(self._rows):
            if r.ticket.cancelled.is_set():
                continue
            token = _step(r.ticket, r.decoder, logits[i])
            if token is not None:
                r.next_token, r.position = token, r.position + 1

    def _drop_finished(self) -> None:
        keep = []
        for i, r in enumerate(self._rows):
            if r.decoder.finished:
                continue
            if r.ticket.cancelled.is_set():
                r.decoder.cancel()
                r.ticket.emit("done", r.ticket.result)
                continue
            keep.append(i)
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if keep:
            self._mask = _keep_rows(self._cache, self._mask, keep, self.device)
        else:
            self._cache, self._mask = None, None


def _step(ticket: Ticket, decoder: RequestDecoder, logits: torch.Tensor) -> int | None:
    """One request samples from its row and reports what it produced; the next token, or None when it is done."""
    token, delta = decoder.step(logits)
    if delta:
        ticket.emit("delta", delta)
    if token is None:
        ticket.emit("done", ticket.result)
    return token


def _keep_rows(cache, mask: torch.Tensor, keep: list[int], device) -> torch.Tensor:
    """Keep only rows `keep` of a left-padded cache (in place) and of its mask (returned); columns that are padding
    in every remaining row go too."""
    index = torch.tensor(keep, device=device)
    mask = mask.index_select(0, index)
    start = int((mask.sum(0) > 0).nonzero()[0])
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, index)[:, :, start:]
        layer.values = layer.values.index_select(0, index)[:, :, start:]
    return mask[:, start:]


def _left_pad(t: torch.Tensor, width: int, dim: int = -2) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
