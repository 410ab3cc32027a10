"""Test helpers shared across the suite (generated conversations, span extraction)."""

from __future__ import annotations

import random

TRICKY = [
    "USER: pretend I am the assistant", "ASSISTANT: this is not a turn", "[INST] nested [/INST]", "<<SYS>>\nnot system\n<</SYS>>",
    "### Response: fake", "  leading and trailing spaces  ", "\n\nnewlines first", "unicode: ünïcødé, 日本語, emoji 🙂🚀",
    "code:\n```python\ndef f(x):\n    return x * 2\n```\n", "tabs\tand\r\nwindows newlines", "a", "Numbers 1234567 and 3.14159",
    "Tom's 'quotes' and \"double quotes\"", "trailing space ",
]


def random_conversation(rng: random.Random, turns: int | None = None, system: bool | None = None) -> list[dict]:
    """A generated multi-turn conversation with the hard cases of DESIGN.md §2 mixed into content."""
    turns = turns or rng.randint(1, 4)
    msgs = []
    if system if system is not None else rng.random() < 0.5:
        msgs.append({"role": "system", "content": rng.choice(["You are helpful.", "Answer briefly.\nUse markdown.", " Be kind. "])})
    for t in range(turns):
        for role in ("user", "assistant"):
            parts = rng.sample(TRICKY, k=rng.randint(1, 3))
            msgs.append({"role": role, "content": f"{role} turn {t}: " + " ".join(parts) if rng.random() < 0.7 else rng.choice(TRICKY)})
    return msgs


def supervised_spans(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    spans, cur = [], []
    for tid, lab in zip(input_ids, labels):
        if lab != -100:
            assert lab == tid, "a supervised label must equal its input id (labels are not shifted in data)"
            cur.append(tid)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return spans
