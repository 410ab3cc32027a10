"""QLoRA on CPU: adapters in every layer keep learning after an eval pass (bitsandbytes AVX512-BF16 bug)."""

from __future__ import annotations

import random

import torch

from train.backends import Backend
from train.collate import collate_padded
from train.config import parse_args
from train.distributed import DistInfo
from train.loop import accumulate_gradients, evaluate
from train.model_setup import build_model

INFO = DistInfo(0, 1, 0, torch.device("cpu"))


def _batch(seed):
    rng = random.Random(seed)
    samples = []
    for _ in range(4):
        ids = [rng.randint(10, 40000) for _ in range(24)]
        samples.append({"input_ids": ids, "labels": [-100] * 8 + ids[8:]})
    return samples


def test_lora_weights_in_every_layer_change_after_eval(tiny_llama, tmp_path):
    cfg = parse_args(["--model_name_or_path", tiny_llama, "--data_path", "x", "--output_dir", str(tmp_path),
                      "--q_lora", "True", "--bf16", "True", "--gradient_checkpointing", "True", "--learning_rate", "1e-2", "--lora_r", "4"])
    model = build_model(cfg, INFO)
    from bitsandbytes.nn import Linear4bit

    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert quantized and all(m.support_avx512bf16_for_cpu is False for m in quantized)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    backend = Backend(INFO)

    def grads_after_step(seed):
        accumulate_gradients(model, [collate_padded(_batch(seed), pad_id=0)], backend, INFO, torch.bfloat16)
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
        opt.zero_grad()
        return grads

    grads_after_step(0)  # after one update lora_B != 0, so every lora_A gets a gradient too
    evaluate(model, _batch(1), lambda rows: collate_padded([s for r in rows for s in r], pad_id=0), cfg, INFO)
    grads = grads_after_step(2)  # gradients (not parameter changes: AdamW momentum moves params anyway)
    layers = {n.split(".layers.")[1].split(".")[0] for n in grads}
    assert layers == {"0", "1"} and all("lora_" in n for n in grads)
    dead = [n for n, g in grads.items() if not g.abs().sum() > 0]
    assert not dead, f"LoRA parameters without gradient after an eval pass: {dead}"
