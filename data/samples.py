"""The inference-context rule (docs/design.md §2): which samples a conversation becomes, and which turns each trains.

A supervised assistant turn is trained only where the ids before it are exactly what the template gives at
inference for the messages before it plus the generation prompt, and its own ids exactly what the template
renders for it as the last turn. Most templates render history as they render a last turn, so one sample (the
whole conversation) trains every turn. Templates that render history differently (Qwen3, QwQ and DeepSeek-R1
drop earlier turns' reasoning; Qwen3 also drops an earlier turn's empty think block) make such a turn *inexact* in
a longer rendering. `expand` (default) then gives it a sample ending at it; greedily from the last turn back,
each sample also trains every earlier turn that is exact in it, so the number of samples is the fewest. `exact`
keeps one sample and trains only the turns exact in it (the others stay as context, counted).
"""

from __future__ import annotations

from dataclasses import dataclass

from data.pieces import OUTPUT_KINDS, TemplateError
from data.templates import PREFIX_STABLE, render_pieces

REASONING_HISTORY = ("expand", "exact")


@dataclass
class SamplePlan:
    end: int  # the sample renders messages[:end + 1]
    chosen: set[int]  # messages supervised in it


def turn_span(messages: list[dict], template: str, tokenizer, tools) -> tuple[str, int, int]:
    """(rendering of messages with the last one as the last turn, where that turn's output starts, where its end
    of turn ends)."""
    if template == "tokenizer":
        from data.jinja_pieces import turn_span as jinja_turn_span

        return jinja_turn_span(messages, tokenizer, tools)
    t = len(messages) - 1
    pieces = render_pieces(messages, template, tokenizer, tools=tools)
    pos, g, e = 0, None, None
    for p in pieces:
        if p.msg == t and p.kind in OUTPUT_KINDS:
            g = pos if g is None else g
            e = pos + len(p.text)
        pos += len(p.text)
    if g is None:
        raise TemplateError(f"template {template!r} renders nothing for message {t}")
    return "".join(p.text for p in pieces), g, e


def plan_samples(messages: list[dict], tools, chosen: set[int], template: str, tokenizer,
                 history: str = "expand") -> tuple[list[SamplePlan], int]:
    """The samples of one conversation and the number of supervised turns left untrained (history="exact")."""
    if history not in REASONING_HISTORY:
        raise ValueError(f"reasoning_history must be one of {', '.join(REASONING_HISTORY)}, got {history!r}")
    last = len(messages) - 1
    turns = sorted(t for t in chosen if messages[t]["role"] == "assistant")
    if template in PREFIX_STABLE or not turns or template != "tokenizer" and turns == [last]:
        return [SamplePlan(last, set(chosen))], 0
    spans, untrainable = {}, 0
    for t in turns:
        try:
            spans[t] = turn_span(messages[:t + 1], template, tokenizer, tools)
        except TemplateError:  # e.g. a turn without reasoning under a template whose prompt always opens a think
            if t == last and len(turns) == 1:
                raise
            untrainable += 1  # block (QwQ): it stays as context, counted with the inexact turns
    turns = [t for t in turns if t in spans]
    if not turns:
        raise TemplateError("no turn of this conversation renders after the template's own generation prompt")
    others = {t for t in chosen if messages[t]["role"] != "assistant"}
    plans: list[SamplePlan] = []
    remaining = set(turns)
    end = last
    while True:
        text = spans[end][0] if end in spans else _text(messages, template, tokenizer, tools)
        covered = {t for t in remaining if text.startswith(spans[t][0][:spans[t][2]])}
        plans.append(SamplePlan(end, covered | (others if not plans else set())))
        remaining -= covered
        if not remaining or history == "exact":
            return [p for p in plans if p.chosen], len(remaining) + untrainable
        end = max(remaining)


def _text(messages, template, tokenizer, tools) -> str:
    return "".join(p.text for p in render_pieces(messages, template, tokenizer, tools=tools))
