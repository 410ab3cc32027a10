"""Backends: how a model is built and wrapped, how gradients are synchronized, how weights are gathered.

The recipe only talks to this interface, so FSDP2 (train/fsdp.py) and DeepSpeed
(train/deepspeed_backend.py) plug in as further subclasses; train/backend_select.py picks one:
  build_model(build) → model (meta/partitioned)   | sync_context(last_micro) → context for one micro-batch
  setup(model, make_optimizer) → wrapped, optim   | backward(loss)
  optimizer_step(...) → (applied, grad_norm)      | unwrap(model) → the HF/peft model
  export_tensors(model, trainable_only) → one gathered tensor at a time on rank 0
  loss_scale                                      | checkpoint_state / load_checkpoint_state → the portable
                                                    resumable state (train/portable_state.py)
`loss_scale` undoes the averaging a backend applies to gradients: our loss is already divided by the
supervised-token count of the whole step on all ranks (docs/design.md §3), so DDP's mean over ranks must
be multiplied back by the world size.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch.nn.parallel import DistributedDataParallel

from train.distributed import DistInfo
from train.portable_state import load_torch_state, torch_state


def persistent_buffers(module) -> list[tuple[str, torch.Tensor]]:
    """(name, buffer) for the buffers a state dict holds (not the non-persistent ones, e.g. rotary inv_freq)."""
    persistent = set(module.state_dict().keys())
    return [(n, b) for n, b in module.named_buffers() if n in persistent]


class Backend:
    name = "single"

    def __init__(self, info: DistInfo, is_peft: bool = False):
        self.info = info
        self.is_peft = is_peft

    @property
    def loss_scale(self) -> float:
        return 1.0

    def build_model(self, build):
        """`build(placement)` makes the model ("device" | "cpu" | "meta", see model_setup.build_model);
        sharded backends build it so that the full weights are materialized at most once (docs/design.md §3)."""
        return build("device")

    def prepare(self, model):
        return model

    def setup(self, model, make_optimizer):
        """Wrap the model, then build the optimizer over the wrapped (possibly sharded) parameters."""
        wrapped = self.prepare(model)
        return wrapped, make_optimizer(wrapped)

    def unwrap(self, model):
        return model

    def make_grad_scaler(self):
        """fp16's dynamic loss scaler (None where the backend scales the loss itself: DeepSpeed)."""
        return torch.amp.GradScaler(self.info.device.type)

    def zero_grad(self, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

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

    def optimizer_step(self, model, optimizer, max_norm: float, loss_is_finite: bool, scaler=None) -> tuple[bool, float]:
        """Clip and apply one update unless the loss or the gradients are not finite; returns (applied,
        grad norm before clipping). With fp16's `scaler`, gradients are unscaled first (the norm and the
        clipping see true gradients) and an overflow lowers the scale instead of updating."""
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = self.clip_and_norm(model, max_norm)
        applied = loss_is_finite and math.isfinite(grad_norm)
        if applied and scaler is not None:
            scaler.step(optimizer)  # unscaled already; steps unless it recorded an overflow
        elif applied:
            optimizer.step()
        if scaler is not None:
            scaler.update()
        return applied, grad_norm

    def release_training_state(self, model, optimizer) -> None:
        """After the last step and save: drop gradients and optimizer moments (3 S / N per rank for AdamW) so
        the export does not stack on top of them. Master weights stay: the export reads them."""
        optimizer.state.clear()
        for p in self.unwrap(model).parameters():
            p.grad = None

    # --- final export: one tensor at a time, so rank 0 never holds a second copy of the model ------------
    def export_entries(self, model, trainable_only: bool) -> list[tuple[str, torch.Tensor]]:
        """(name, this rank's tensor) for what the export holds: the trainable parameters (an adapter) or every
        parameter (a tied weight once, under its first name, as save_pretrained writes it) and persistent buffer."""
        module = self.unwrap(model)
        entries = [(n, p) for n, p in module.named_parameters() if p.requires_grad or not trainable_only]
        return entries if trainable_only else entries + persistent_buffers(module)

    def global_shape(self, tensor: torch.Tensor) -> torch.Size:
        return tensor.shape

    def gather_full(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The whole tensor on rank 0's CPU in its master precision (None elsewhere); every rank calls."""
        return tensor.detach().cpu() if self.info.is_main else None

    def export_tensors(self, model, trainable_only: bool):
        """Yields (name, tensor) on rank 0 and (name, None) elsewhere; every rank must exhaust it (collective)."""
        for name, tensor in self.export_entries(model, trainable_only):
            yield name, self.gather_full(tensor)

    def checkpoint_state(self, model, optimizer) -> dict:
        """The portable resumable state (every rank calls; sharded backends return their shards)."""
        return torch_state(self.unwrap(model), optimizer, self.is_peft)

    def load_checkpoint_state(self, directory, model, optimizer) -> None:
        load_torch_state(directory, self.unwrap(model), optimizer, self.is_peft)


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
