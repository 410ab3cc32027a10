"""FSDP2 backend (`torch.distributed.fsdp.fully_shard`), FastChat's `--fsdp` flags mapped onto it.

`--fsdp "full_shard auto_wrap [offload]"` shards parameters, gradients and optimizer state and
reshards after forward; `"shard_grad_op auto_wrap"` keeps parameters gathered between forward and
backward (ZeRO-2-like). Each decoder layer (`--fsdp_transformer_layer_cls_to_wrap`, default: detected
from the model) is its own unit, then the root. bf16 uses `MixedPrecisionPolicy` (fp32 gradient
reduction unless `reduce_dtype` says otherwise); `offload` uses `CPUOffloadPolicy` (no pinned memory on
CPU).

Load once, shard early (docs/design.md §3): every rank builds the model on the meta device and shards it;
only rank 0 loads the real weights, which are scattered tensor by tensor into the ranks' shards.
Non-persistent buffers (rotary `inv_freq`) are in no state dict and hold garbage after `to_empty()`,
so every buffer is broadcast from rank 0's loaded model too. QLoRA is the exception: bitsandbytes quantizes tensor by tensor while
loading, so each rank builds its own 4-bit model (~1/8 of the fp32 size) and FSDP shards that.

Final weights are all-gathered one tensor at a time (for LoRA only the trainable ones) and streamed
to the export file on rank 0 (train/export.py), so no rank ever holds a second copy of the model. Resumable checkpoints
are the DTensor shards in the portable layout (train/portable_state.py, the base class's methods):
frozen weights excluded for LoRA, loadable by any world size and backend.
"""

from __future__ import annotations

import collections
import contextlib

import torch
import torch.distributed as dist
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from train import gloo_allgather
from train.backends import Backend
from train.distributed import DistInfo
from train.host_memory import page_out
from train.layers import decoder_layer_classes, replicated_frozen_params
from train.precision import Precision
from train.sharding_config import FSDPSettings


def _to_empty_keeping_ties(model, device: torch.device) -> None:
    """`Module.to_empty`, then tie again what was tied: it gives every module its own new Parameter
    for a plain (not sharded) meta weight, so tied embeddings would silently become two weights."""
    groups: dict[int, list[tuple[torch.nn.Module, str]]] = collections.defaultdict(list)
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                groups[id(param)].append((module, name))
    model.to_empty(device=device)
    for (first, first_name), *aliases in groups.values():
        for module, name in aliases:
            setattr(module, name, getattr(first, first_name))


class _SourceTensors:
    """Rank 0's loaded model as the state-dict tensors still to be sent. `full(key)` lends one out;
    after its last use (tied weights have several keys) the source parameter is dropped and its pages
    leave rank 0's resident memory (train/host_memory.page_out: freeing alone does not, the weights
    being views of the memory-mapped checkpoint)."""

    def __init__(self, source):
        persistent = set(source.state_dict().keys())
        self.tensors = {n: t for n, t in [*source.named_parameters(remove_duplicate=False),
                                          *source.named_buffers(remove_duplicate=False)] if n in persistent}
        self.uses = collections.Counter(id(t) for t in self.tensors.values())

    @contextlib.contextmanager
    def full(self, key: str, dtype: torch.dtype, device: torch.device):
        tensor = self.tensors.pop(key)
        yield tensor.detach().to(device=device, dtype=dtype)
        self.uses[id(tensor)] -= 1
        if self.uses[id(tensor)] == 0 and isinstance(tensor, torch.nn.Parameter):  # buffers are broadcast later
            storage = tensor.untyped_storage()
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
            page_out(storage)


class FSDPBackend(Backend):
    name = "fsdp"

    def __init__(self, info: DistInfo, settings: FSDPSettings, precision: Precision, is_peft: bool,
                 quantized: bool = False):
        super().__init__(info, is_peft)
        self.settings = settings
        self.precision = precision
        self.quantized = quantized
        self._source = None  # rank 0's loaded model while the shards are filled from it

    @property
    def loss_scale(self) -> float:
        return float(self.info.world_size)  # FSDP averages gradients over ranks

    def build_model(self, build):
        if self.quantized:
            return build("device")
        if self.info.is_main:
            self._source = build("cpu")  # read once, kept in host memory, scattered tensor by tensor
        return build("meta")

    def prepare(self, model):
        kwargs: dict = {"reshard_after_forward": self.settings.reshard_after_forward}
        if self.precision.autocast_dtype is not None:
            compute = self.precision.compute_dtype
            reduce = compute if self.settings.reduce_dtype == "bf16" and compute == torch.bfloat16 else torch.float32
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=reduce)
        if self.settings.offload:
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=self.info.device.type == "cuda")
        classes = decoder_layer_classes(model, self.settings.layer_classes)
        units = [m for m in model.modules() if isinstance(m, classes)]
        for unit in units:
            fully_shard(unit, **kwargs)
        fully_shard(model, ignored_params=replicated_frozen_params(model, units) or None, **kwargs)
        gloo_allgather.use_for_fsdp(model)  # gloo's own all-gather stages the whole output in a copy
        if not self.quantized:
            self._fill_shards_from_rank0(model)
        return model

    @torch.no_grad()
    def _fill_shards_from_rank0(self, model) -> None:
        """Allocate this rank's shards, then scatter rank 0's loaded weights into them one tensor at a
        time, then broadcast every buffer: non-persistent ones (rotary `inv_freq`) are garbage after
        `to_empty()`. A rank holds its shards plus one full tensor in flight, never a second copy of
        its shards (`set_model_state_dict(broadcast_from_rank0=True)` keeps one until the end); rank 0
        frees each source tensor once it is scattered, so it never holds the source and all its shards."""
        shard_device = torch.device("cpu") if self.settings.offload else self.info.device
        _to_empty_keeping_ties(model, shard_device)
        for param in model.parameters():  # replicated weights are computed with, so they live on the device
            if not isinstance(param, DTensor) and param.device != self.info.device:
                param.data = param.data.to(self.info.device)
        source = _SourceTensors(self._source) if self.info.is_main else None
        filled: set[int] = set()
        for key, local in model.state_dict().items():
            lend = source.full(key, local.dtype, local.device) if source is not None else contextlib.nullcontext()
            with lend as full:
                if isinstance(local, DTensor):  # scatter: each rank receives only its own chunk
                    if full is None:  # never touched: only rank 0's data is sent
                        full = torch.empty(local.shape, dtype=local.dtype, device=shard_device)
                    shard = distribute_tensor(full, local.device_mesh, local.placements, src_data_rank=0)
                    local.to_local().copy_(shard.to_local())
                    del shard
                elif local.data_ptr() not in filled:  # replicated (tied weights: once), received in place
                    if full is not None:
                        local.copy_(full)
                    dist.broadcast(local, src=0)
                    filled.add(local.data_ptr())
                del full
        source_buffers = dict(self._source.named_buffers()) if source is not None else {}
        for name, buf in model.named_buffers():
            if self.info.is_main:
                buf.copy_(source_buffers[name])
            dist.broadcast(buf, src=0)
        self._source = None

    def make_grad_scaler(self):
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device=self.info.device.type)  # agrees on overflow across ranks

    def sync_context(self, model, last_micro: bool):
        model.set_requires_gradient_sync(last_micro)
        return super().sync_context(model, last_micro)

    def clip_and_norm(self, model, max_norm: float) -> float:
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        return float(norm)

    @torch.no_grad()
    def gather_full(self, tensor):
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor  # all-gather this one tensor
        return full.detach().cpu() if self.info.is_main else None
