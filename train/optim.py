"""Optimizer (`--optim`) and LR schedule (`--lr_scheduler_type`, via transformers)."""

from __future__ import annotations

import math

import torch

from train.config import TrainConfig


def param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(cfg: TrainConfig, model) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optim in ("adamw_torch", "adamw_hf", "adamw_torch_fused"):
        # The fused kernel exists for CPU and CUDA and is ~8x faster than foreach on CPU (measured on
        # SmolLM2's 135M parameters: 0.08 s vs 0.6 s per step); same update rule.
        params = [p for g in groups for p in g["params"]]
        from torch.distributed.tensor import DTensor

        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") and not isinstance(p, DTensor)
                    for p in params)
        if cfg.optim == "adamw_torch_fused" and not fused:
            raise ValueError("--optim adamw_torch_fused needs floating-point parameters on CPU or CUDA")
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_epsilon,
                                 fused=True if fused else None)
    if cfg.optim == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate)
    if cfg.optim == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=cfg.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False)
    import bitsandbytes as bnb  # adamw_bnb_8bit, paged_adamw_8bit, paged_adamw_32bit

    if not torch.cuda.is_available():
        raise ValueError(f"--optim {cfg.optim} (bitsandbytes) needs CUDA; use adamw_torch on CPU")
    cls = {"adamw_bnb_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[cfg.optim]
    return cls(groups, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_epsilon)


def make_scheduler(cfg: TrainConfig, optimizer, total_steps: int):
    from transformers import get_scheduler

    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    return get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
