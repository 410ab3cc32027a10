"""Backends: how a model is wrapped, how gradients are synchronized, and how weights are gathered.

The recipe only talks to this interface, so FSDP2 and DeepSpeed plug in as further subclasses:
  prepare(model, optimizer) → wrapped model   | sync_context(last_micro) → context for one micro-batch
  backward(loss)                              | clip_and_norm(max_norm) → total grad norm (float)
  step(optimizer)                             | unwrap(model) → the HF/peft model
  loss_scale                                  | full_state_dict(model) → CPU state dict on rank 0
`loss_scale` undoes the averaging a backend applies to gradients: our loss is already divided by the
supervised-token count of the whole step on all ranks (DESIGN.md §3), so DDP's mean over ranks must
be multiplied back by the world size.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

from train.checkpoint import load_model_files, save_model_files
from train.distributed import DistInfo


class Backend:
    name = "single"

    def __init__(self, info: DistInfo, is_peft: bool = False):
        self.info = info
        self.is_peft = is_peft

    @property
    def loss_scale(self) -> float:
        return 1.0

    def prepare(self, model):
        return model

    def setup(self, model, make_optimizer):
        """Wrap the model, then build the optimizer over the wrapped (possibly sharded) parameters."""
        wrapped = self.prepare(model)
        return wrapped, make_optimizer(wrapped)

    def unwrap(self, model):
        return model

    def zero_grad(self, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def grad_norm_after_step(self) -> float | None:
        """Backends that clip inside their step (DeepSpeed) report the norm here."""
        return None

    def sync_context(self, model, last_micro: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_and_norm(self, model, max_norm: float) -> float:
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        return float(norm)

    def step(self, optimizer) -> None:
        optimizer.step()

    def full_state_dict(self, model) -> dict[str, torch.Tensor] | None:
        """Full model state on CPU (rank 0 only; other ranks get None)."""
        if not self.info.is_main:
            return None
        return {k: v.detach().cpu() for k, v in self.unwrap(model).state_dict().items()}

    def save_state(self, directory, model, optimizer) -> None:
        """Resumable weights + optimizer into a checkpoint dir (all ranks call; here rank 0 writes)."""
        if self.info.is_main:
            save_model_files(directory, self.unwrap(model), optimizer, self.is_peft)

    def load_state(self, directory, model, optimizer) -> None:
        load_model_files(directory, self.unwrap(model), optimizer, self.is_peft)


class DDPBackend(Backend):
    name = "ddp"

    @property
    def loss_scale(self) -> float:
        return float(self.info.world_size)

    def prepare(self, model):
        ids = [self.info.local_rank] if self.info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)

    def unwrap(self, model):
        return model.module if isinstance(model, DistributedDataParallel) else model

    def sync_context(self, model, last_micro: bool):
        # gradients are all-reduced once per optimizer step, on the last micro-batch
        return contextlib.nullcontext() if last_micro else model.no_sync()


def make_backend(info: DistInfo, cfg, hidden_size: int | None = None) -> Backend:
    if cfg.deepspeed:
        from train.deepspeed_backend import DeepSpeedBackend, fill_auto, load_ds_config

        return DeepSpeedBackend(info, fill_auto(load_ds_config(cfg.deepspeed), cfg, info.world_size, hidden_size),
                                cfg.is_peft)
    if cfg.fsdp:
        from train.fsdp import FSDPBackend, FSDPSettings

        settings = FSDPSettings.from_flags(cfg.fsdp, cfg.fsdp_transformer_layer_cls_to_wrap, cfg.fsdp_config)
        return FSDPBackend(info, settings, cfg.bf16, cfg.is_peft)
    return DDPBackend(info, cfg.is_peft) if info.distributed else Backend(info, cfg.is_peft)
