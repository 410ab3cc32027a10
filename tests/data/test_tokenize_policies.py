"""Mask strategies, per-message train flags, over-length policies and zero-supervision drops."""

from __future__ import annotations

import random

import pytest
from helpers import random_conversation, supervised_spans

from data.tokenize import DroppedSample, tokenize_batch, tokenize_conversation

CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "first question " * 5},
    {"role": "assistant", "content": "first answer " * 5},
    {"role": "user", "content": "second question " * 5},
    {"role": "assistant", "content": "second answer " * 5},
    {"role": "user", "content": "third question " * 5},
    {"role": "assistant", "content": "third answer " * 5},
]


@pytest.fixture
def tok(tokenizers):
    return tokenizers["smollm2"]


def decoded_spans(tok, ex):
    return [tok.decode(s) for s in supervised_spans(ex["input_ids"], ex["labels"])]


def test_mask_last_supervises_only_the_final_reply(tok):
    spans = decoded_spans(tok, tokenize_conversation(CONV, tok, "chatml", mask="last"))
    assert spans == [CONV[-1]["content"] + "<|im_end|>"]


def test_mask_all_supervises_every_token(tok):
    ex = tokenize_conversation(CONV, tok, "chatml", mask="all")
    assert ex["labels"] == ex["input_ids"]


def test_train_flags_override_the_mask(tok):
    conv = [dict(m) for m in CONV]
    conv[2]["train"] = False  # an assistant reply we must not learn
    conv[3]["train"] = True  # a user turn we do want to learn
    spans = decoded_spans(tok, tokenize_conversation(conv, tok, "chatml"))
    assert spans == [conv[3]["content"], conv[4]["content"] + "<|im_end|>", conv[6]["content"] + "<|im_end|>"]


def test_truncate_keeps_whole_leading_turns_then_cuts(tok):
    full = tokenize_conversation(CONV, tok, "chatml")
    limit = len(full["input_ids"]) - 10  # cuts inside the final reply
    ex = tokenize_conversation(CONV, tok, "chatml", max_length=limit)
    assert ex["truncated"] and len(ex["input_ids"]) == limit
    assert ex["input_ids"] == full["input_ids"][:limit] and ex["labels"] == full["labels"][:limit]


def test_truncate_removes_a_cut_turn_that_carries_no_loss(tok):
    full = tokenize_conversation(CONV, tok, "chatml")
    spans = decoded_spans(tok, full)
    # limit that ends inside the third user question: that partial prompt is useless and is removed
    third_q = tok.encode("third question", add_special_tokens=False)
    ids = full["input_ids"]
    start = next(i for i in range(len(ids)) if ids[i:i + len(third_q)] == third_q)
    ex = tokenize_conversation(CONV, tok, "chatml", max_length=start + 3)
    assert len(ex["input_ids"]) < start
    assert decoded_spans(tok, ex) == spans[:2]


def test_zero_supervised_after_truncation_is_dropped_with_a_reason(tok):
    with pytest.raises(DroppedSample, match="no supervised tokens after truncation"):
        tokenize_conversation(CONV, tok, "chatml", max_length=30, mask="last")


def test_drop_policy(tok):
    with pytest.raises(DroppedSample, match="too long"):
        tokenize_conversation(CONV, tok, "chatml", max_length=20, overflow="drop")
    assert tokenize_conversation(CONV, tok, "chatml", max_length=10_000, overflow="drop")["input_ids"]


def test_split_keeps_every_reply_at_turn_boundaries(tok):
    full = tokenize_conversation(CONV, tok, "chatml")
    limit = len(full["input_ids"]) // 2
    (res,) = tokenize_batch([CONV], tok, "chatml", max_length=limit, overflow="split")
    assert res.split_into >= 2 and not res.dropped
    for ex in res.samples:
        assert len(ex.input_ids) <= limit
        # every part starts with the system prompt and a user turn
        assert tok.decode(ex.input_ids).startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n")
    spans = [tok.decode(s) for ex in res.samples for s in supervised_spans(ex.input_ids, ex.labels)]
    assert spans == [m["content"] + "<|im_end|>" for m in CONV if m["role"] == "assistant"]


def test_split_truncates_a_single_exchange_longer_than_the_limit(tok):
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "long answer " * 50}]
    (res,) = tokenize_batch([conv], tok, "chatml", max_length=40, overflow="split")
    assert len(res.samples) == 1 and res.truncated == 1 and len(res.samples[0].input_ids) == 40


def test_batch_equals_one_by_one(tokenizers):
    tok = tokenizers["llama-spm"]
    rng = random.Random(11)
    convs = [random_conversation(rng) for _ in range(20)]
    batch = tokenize_batch(convs, tok, "llama-2", max_length=120, overflow="split")
    for conv, res in zip(convs, batch):
        (single,) = tokenize_batch([conv], tok, "llama-2", max_length=120, overflow="split")
        assert [e.input_ids for e in res.samples] == [e.input_ids for e in single.samples]
        assert [e.labels for e in res.samples] == [e.labels for e in single.samples]


def test_bad_arguments_name_the_flag(tok):
    with pytest.raises(ValueError, match="--mask"):
        tokenize_conversation(CONV, tok, "chatml", mask="assistants")
    with pytest.raises(ValueError, match="--truncation"):
        tokenize_batch([CONV], tok, "chatml", overflow="cut")
    with pytest.raises(ValueError, match="unknown template"):
        tokenize_conversation(CONV, tok, "chatm")
