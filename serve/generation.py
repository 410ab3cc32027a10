"""Token-by-token generation shared by the chat CLI, the HTTP server and eval.

`stream_generate` runs the model with a KV cache, samples (temperature, top-p, repetition penalty,
seeded), and yields text deltas. It stops on the template's end-of-turn token ids and on stop
strings, and never yields part of a stop string: text that could still grow into one is held back
until it is ruled out. Incomplete UTF-8 (a byte-fallback token mid-character) is held back too.
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
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "length"  # "stop" (end-of-turn token or stop string) or "length"


def _next_token(logits: torch.Tensor, generated: list[int], p: SamplingParams, gen: torch.Generator | None) -> int:
    logits = logits.float()
    if p.repetition_penalty != 1.0 and generated:
        idx = torch.tensor(sorted(set(generated)), device=logits.device)
        picked = logits[idx]
        logits[idx] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
    if p.temperature < 1e-5:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < p.top_p  # always keeps the top token
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=gen))


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                best = max(best, k)
                break
    return best


@torch.no_grad()
def stream_generate(model, tokenizer, input_ids: list[int], params: SamplingParams, stop_token_ids: set[int],
                    result: GenerationResult | None = None) -> Iterator[str]:
    """Yield text deltas; fills `result` (text, token counts, finish reason) as it goes."""
    params.validate()
    result = result if result is not None else GenerationResult()
    result.prompt_tokens = len(input_ids)
    device = next(model.parameters()).device
    gen = None
    if params.seed is not None:
        gen = torch.Generator(device="cpu").manual_seed(params.seed)
    stops = [s for s in params.stop if s]
    generated: list[int] = []
    emitted = ""
    cut = False  # a stop string ended the text
    past = None
    ids = torch.tensor([input_ids], device=device)
    for _ in range(params.max_new_tokens):
        out = model(input_ids=ids, past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = _next_token(out.logits[0, -1].cpu(), generated, params, gen)
        if token in stop_token_ids:
            result.finish_reason = "stop"
            break
        generated.append(token)
        result.completion_tokens = len(generated)
        ids = torch.tensor([[token]], device=device)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        hit = min((text.find(s) for s in stops if s in text), default=-1)
        if hit >= 0:
            text, cut = text[:hit], True
            result.finish_reason = "stop"
            if len(text) > len(emitted):
                yield text[len(emitted):]
            emitted = text
            break
        safe_end = len(text) - _held_back(text, stops)
        if "\ufffd" in text[len(emitted):safe_end]:  # a multi-byte character is still being assembled
            safe_end = text.index("\ufffd", len(emitted))
        if safe_end > len(emitted):
            yield text[len(emitted):safe_end]
            emitted = text[:safe_end]
    if not cut:  # the turn ended (or ran out of tokens): what was held back is real text
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if len(text) > len(emitted):
            yield text[len(emitted):]
        emitted = text
    result.text = emitted
