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


def make_tiny_llama(out_dir, tokenizer, seed: int = 0, layers: int = 2) -> str:
    """A tiny random Llama sized for the real tokenizer's vocab, saved with the tokenizer (hermetic)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)
