"""FSDP2 loading helpers (train/fsdp.py) in one process; the 2-rank load is in test_sharded_scale.py."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from train.fsdp import _SourceTensors, _to_empty_keeping_ties


def _tied_model(path: str, device: str = "cpu"):
    if device == "meta":
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def test_to_empty_keeps_tied_weights_tied(tiny_llama):
    model = _tied_model(tiny_llama, "meta")
    _to_empty_keeping_ties(model, torch.device("cpu"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.device.type == "cpu"
    plain = _tied_model(tiny_llama, "meta")
    plain.to_empty(device="cpu")
    assert plain.lm_head.weight is not plain.model.embed_tokens.weight  # what the helper is for


def test_source_tensors_frees_each_weight_after_its_last_use(tiny_llama):
    model = _tied_model(tiny_llama)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    source = _SourceTensors(model)
    embed = model.model.embed_tokens.weight
    with source.full("model.embed_tokens.weight", torch.float32, torch.device("cpu")) as full:
        torch.testing.assert_close(full, expected["model.embed_tokens.weight"], rtol=0, atol=0)
    assert embed.numel() > 0  # lm_head.weight (tied) still to be sent
    with source.full("lm_head.weight", torch.bfloat16, torch.device("cpu")) as full:
        assert full.dtype == torch.bfloat16
    assert embed.numel() == 0
    for key in list(source.tensors):
        with source.full(key, torch.float32, torch.device("cpu")) as full:
            torch.testing.assert_close(full, expected[key], rtol=0, atol=0)
    assert all(p.numel() == 0 for p in model.parameters())
    assert all(b.numel() > 0 for b in model.buffers())  # buffers are broadcast afterwards
