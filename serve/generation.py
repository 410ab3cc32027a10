"""Token-by-token generation shared by the chat CLI, the HTTP server's batch engine and eval.

The per-request pieces are separate so that one request decoded alone (`stream_generate`) and one decoded in
a batch (serve/batching.py) go through the same code:
- `TokenSampler` — temperature, top-p, seeded sampling and a repetition penalty that counts the prompt's
  tokens as well as the reply's (as `generate`'s RepetitionPenaltyLogitsProcessor does);
- `IncrementalDecoder` — text deltas from a growing token list at a cost per token independent of the reply's
  length (it re-decodes only a short window), holding back incomplete UTF-8;
- `StopMatcher` — stop strings, checked only against the new tail; text that could still grow into a stop
  string is held back until ruled out, so no part of one is ever emitted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 512
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class GenerationResult:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "length"  # "stop" (end-of-turn token or stop string), "length", or "cancelled"
    parts: list[str] = field(default_factory=list, repr=False)  # the text so far, appended per delta

    @property
    def text(self) -> str:
        if len(self.parts) > 1:
            self.parts[:] = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""

    @text.setter
    def text(self, value: str) -> None:
        self.parts[:] = [value] if value else []


class TokenSampler:
    """Picks the next token from one row of logits with one request's parameters."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int):
        self.params = params
        self.gen = torch.Generator(device="cpu").manual_seed(params.seed) if params.seed is not None else None
        self.seen = None
        if params.repetition_penalty != 1.0:  # a vocabulary mask: constant cost per token, however long the reply
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            self.seen[[t for t in prompt_ids if 0 <= t < vocab_size]] = True

    def __call__(self, logits: torch.Tensor) -> int:
        p = self.params
        logits = logits.float()
        if self.seen is not None:
            seen = self.seen[: logits.shape[-1]]
            penalized = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(seen, penalized, logits)
        if p.temperature < 1e-5:
            token = int(torch.argmax(logits))
        else:
            probs = torch.softmax(logits / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < p.top_p  # always keeps the top token
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs * keep)
            token = int(torch.multinomial(probs, 1, generator=self.gen))
        if self.seen is not None and token < self.seen.shape[0]:
            self.seen[token] = True
        return token


class IncrementalDecoder:
    """Text of a growing token list, one delta per token, re-decoding only the tokens since the last complete
    character (the prefix/read-offset scheme of vLLM and TGI). The concatenated deltas equal decoding the whole list."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix = 0  # tokens[prefix:read] decode to text already returned
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.tokens.append(token)
        done = self._decode(self.tokens[self.prefix:self.read])
        text = self._decode(self.tokens[self.prefix:])
        if len(text) > len(done) and not text.endswith("\ufffd"):  # "\ufffd": a multi-byte character in progress
            self.prefix, self.read = self.read, len(self.tokens)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        """What is still held back at the end (an incomplete character decodes as U+FFFD, as a full decode does)."""
        done = self._decode(self.tokens[self.prefix:self.read])
        text = self._decode(self.tokens[self.prefix:])
        self.prefix = self.read = len(self.tokens)
        return text[len(done):]


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class StopMatcher:
    """Stop strings over streamed text. Only `pending` (held-back text, shorter than the longest stop string) plus
    the new delta is searched each time: a stop string can only start in text that was held back."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Text that is safe to emit now; sets `stopped` when a stop string was found (its text is dropped)."""
        window = self.pending + delta
        hits = [at for at in (window.find(s) for s in self.stops) if at >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return window[:min(hits)]
        keep = _held_back(window, self.stops)
        self.pending = window[len(window) - keep:] if keep else ""
        return window[:len(window) - keep]

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class RequestDecoder:
    """One request's token → text path: end-of-turn tokens, max tokens, detokenization, stop strings. The same for
    a request decoded alone and in a batch."""

    def __init__(self, tokenizer, prompt_ids: list[int], params: SamplingParams, stop_token_ids: set[int],
                 result: GenerationResult, vocab_size: int):
        params.validate()
        self.params, self.stop_token_ids, self.result = params, stop_token_ids, result
        self.sampler = TokenSampler(params, prompt_ids, vocab_size)
        self.text = IncrementalDecoder(tokenizer)
        self.stops = StopMatcher(params.stop)
        self.finished = False
        result.prompt_tokens = len(prompt_ids)

    def step(self, logits: torch.Tensor) -> tuple[int | None, str]:
        """Sample from this request's last-position logits: (token to feed next or None when finished, text delta)."""
        token = self.sampler(logits)
        if token in self.stop_token_ids:
            self.result.finish_reason = "stop"
            return None, self._finish()
        self.result.completion_tokens += 1
        out = self.stops.feed(self.text.push(token))
        if self.stops.stopped:
            self.result.finish_reason = "stop"
            return None, self._finish(out)
        if self.result.completion_tokens >= self.params.max_new_tokens:
            return None, self._finish(out)
        self._emit(out)
        return token, out

    def _emit(self, out: str) -> None:
        if out:
            self.result.parts.append(out)

    def _finish(self, out: str = "") -> str:
        if not self.stops.stopped:  # the turn ended (or ran out of tokens): what was held back is real text
            out += self.stops.feed(self.text.flush())
            if not self.stops.stopped:
                out += self.stops.flush()
        self._emit(out)
        self.finished = True
        return out

    def cancel(self) -> None:
        self.result.finish_reason = "cancelled"
        self.finished = True


def cache_kwarg(model) -> str:
    """The forward argument that takes the KV cache: `cache` in newer transformers 5.x (`past_key_values` is
    deprecated there), `past_key_values` before."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft forwards **kwargs
    try:
        return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


def returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def vocab_size_of(model) -> int:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None and emb.weight.dim() == 2:
        return int(emb.weight.shape[0])
    return int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0) or 1 << 20


@torch.no_grad()
def stream_generate(model, tokenizer, input_ids: list[int], params: SamplingParams, stop_token_ids: set[int],
                    result: GenerationResult | None = None) -> Iterator[str]:
    """Yield text deltas for one request decoded alone; fills `result` (text so far, token counts, finish reason)
    as it goes, so a caller interrupted mid-reply still holds what was shown."""
    result = result if result is not None else GenerationResult()
    request = RequestDecoder(tokenizer, input_ids, params, stop_token_ids, result, vocab_size_of(model))
    device = next(model.parameters()).device
    past, cache_arg = None, cache_kwarg(model)
    ids = torch.tensor([input_ids], device=device)
    while True:
        out = model(input_ids=ids, use_cache=True, **{cache_arg: past})
        past = returned_cache(out)
        token, delta = request.step(out.logits[0, -1].cpu())
        if delta:
            yield delta
        if token is None:
            return
        ids = torch.tensor([[token]], device=device)
