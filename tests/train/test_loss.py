"""The chunked loss (train/loss.py) equals the plain one in value and gradients, full and LoRA, packed."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import train.loss as chunked
from train.collate import collate_packed
from train.loop import token_loss_sum

CPU = torch.device("cpu")


def _batch():
    g = torch.Generator().manual_seed(0)
    rows = []
    for r in range(2):
        row = []
        for k in (23, 40, 17 + r):
            ids = torch.randint(10, 40000, (k,), generator=g).tolist()
            row.append({"input_ids": ids, "labels": [-100] * (k // 3) + ids[k // 3:]})
        rows.append(row)
    return collate_packed(rows, pad_id=0)


def _model(path, lora: bool):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                                 init_lora_weights=False))  # non-zero B: gradients everywhere
    return model


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_chunked_loss_equals_plain_value_and_gradients(lora, tiny_llama, monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 4 * 49152 * 7)  # 7-token chunks: many chunks, a ragged last one
    batch = _batch()
    plain, fast = _model(tiny_llama, lora), _model(tiny_llama, lora)
    assert chunked.install(fast)
    loss_plain = token_loss_sum(plain, batch, CPU, None)
    loss_fast = token_loss_sum(fast, batch, CPU, None)
    torch.testing.assert_close(loss_fast, loss_plain, rtol=1e-5, atol=0)
    loss_plain.backward()
    loss_fast.backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    assert grads and grads.keys() == {n for n, p in fast.named_parameters() if p.grad is not None}
    for name, p in fast.named_parameters():
        if p.grad is not None:
            # rtol 1e-5 of the tensor's scale: chunks sum in another order than one big matmul
            scale = float(grads[name].abs().max())
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_head_is_plain_outside_a_loss_and_without_supervised_tokens(tiny_llama):
    model = _model(tiny_llama, lora=False)
    assert chunked.install(model)
    ids = torch.tensor([[1, 200, 3000, 45]])
    assert model(ids).logits.shape == (1, 4, model.config.vocab_size)  # generation is unaffected
    with chunked.targets(torch.full((1, 4), -100)):
        zero = model(ids).logits
    assert zero.dim() == 0 and float(zero) == 0.0
    zero.backward()
    assert model.lm_head.weight.grad is not None  # every rank reaches the head in backward


def test_models_that_post_process_logits_keep_the_plain_loss():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tiny = Gemma2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=16, final_logit_softcapping=30.0)
    assert not chunked.install(Gemma2ForCausalLM(tiny))
