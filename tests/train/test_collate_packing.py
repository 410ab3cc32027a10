"""Label shift/padding in one place, and packed rows that equal the same samples run alone."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from train.collate import collate_packed, collate_padded, shift_labels
from train.loop import token_loss_sum

SAMPLES = [
    {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
    {"input_ids": [10, 11, 12], "labels": [-100, 11, 12]},
    {"input_ids": [13, 14, 15, 16, 17, 18, 19], "labels": [-100, -100, -100, 16, 17, 18, 19]},
]


def test_shift_and_dynamic_padding():
    assert shift_labels([-100, 7, 8]) == [7, 8, -100]
    batch = collate_padded(SAMPLES[:2], pad_id=0)
    assert batch["input_ids"].shape == (2, 5)  # longest in batch, never model_max_length
    assert batch["labels"][1].tolist() == [11, 12, -100, -100, -100]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0] and int(batch["num_tokens"]) == 8
    assert collate_padded(SAMPLES[:2], pad_id=0, pad_to=16)["input_ids"].shape == (2, 16)


def test_packed_labels_never_cross_samples():
    batch = collate_packed([SAMPLES[:2]], pad_id=0)
    assert batch["labels"][0].tolist() == [-100, 7, 8, 9, -100, 11, 12, -100]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    mask = batch["attention_mask"][0, 0] == 0
    assert mask[5, :5].sum() == 0 and mask[7, 5:8].all()  # sample 2 sees only itself, causally


def test_varlen_micro_batch_is_one_row_with_restarting_positions():
    """flash-attn 2 treats restarting position_ids as boundaries only for a batch of one row, so several
    packed rows become one (1, ΣL) row with no padding; labels and positions stay per sample."""
    rows = [[SAMPLES[0], SAMPLES[1]], [SAMPLES[2]]]
    batch = collate_packed(rows, pad_id=0, varlen=True)
    assert batch["input_ids"].shape == (1, 15) and "attention_mask" not in batch
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6]
    assert batch["labels"][0].tolist() == [-100, 7, 8, 9, -100, 11, 12, -100, -100, -100, 16, 17, 18, 19, -100]
    assert int(batch["num_tokens"]) == 15
    padded = collate_packed(rows, pad_id=0)  # sdpa/eager keep rows (and a block-diagonal mask)
    assert padded["input_ids"].shape == (2, 8) and padded["attention_mask"].shape == (2, 1, 8, 8)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_and_loss_equal_unpacked(attn, tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=attn).eval()
    rows = [[SAMPLES[0], SAMPLES[1]], [SAMPLES[2]]]
    packed = collate_packed(rows, pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                       position_ids=packed["position_ids"]).logits
        for idx, (row, start) in [(0, (0, 0)), (1, (0, 5)), (2, (1, 0))]:
            ids = torch.tensor([SAMPLES[idx]["input_ids"]])
            alone = model(input_ids=ids).logits[0]
            torch.testing.assert_close(logits[row, start:start + ids.shape[1]], alone, atol=1e-5, rtol=1e-4)
        packed_loss = token_loss_sum(model, packed, torch.device("cpu"), None)
        alone_loss = sum(token_loss_sum(model, collate_padded([s], pad_id=0), torch.device("cpu"), None) for s in SAMPLES)
        torch.testing.assert_close(packed_loss, alone_loss, atol=1e-4, rtol=1e-5)


def test_position_ids_alone_do_not_isolate_samples_on_sdpa(tiny_llama):
    """Why the 4D mask exists (docs/design.md §4): restarting position_ids is not enough without flash-attn."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    packed = collate_packed([SAMPLES[:2]], pad_id=0)
    with torch.no_grad():
        leaky = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0, 5:8]
        alone = model(input_ids=torch.tensor([SAMPLES[1]["input_ids"]])).logits[0]
    assert not torch.allclose(leaky, alone, atol=1e-3)


def test_bf16_mask_under_autocast(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    packed = collate_packed([SAMPLES[:2], [SAMPLES[2]]], pad_id=0, mask_dtype=torch.bfloat16)
    with torch.no_grad():
        loss = token_loss_sum(model, packed, torch.device("cpu"), torch.bfloat16)
    assert torch.isfinite(loss)
