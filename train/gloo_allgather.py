"""All-gather into the output tensor itself, for the gloo backend.

gloo's `all_gather_into_tensor` gathers into a flat buffer of its own as large as the output and then
copies that buffer over the output: every rank pays the gathered size twice for that moment. Under
ZeRO-3 the biggest gather is the (tied) embedding — at load, at the embedding and again at the LM head —
so on a 0.5B model the staging alone was +0.2 × the model's fp32 size on a rank that holds only its
partition (issue 11). NCCL writes into the output directly; this does the same on gloo with one
broadcast per rank straight into that rank's slice of the output (gloo broadcasts in place).

`use_for_deepspeed()` makes DeepSpeed's communication layer gather this way (its `all_gather_function`
hook, through which ZeRO's parameter gathers pass), `use_for_fsdp(model)` every FSDP2 unit
(`FSDPModule.set_custom_all_gather`), both only when the process group is gloo.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _is_gloo() -> bool:
    return dist.is_initialized() and dist.get_backend() == "gloo"


class _Works:
    """The broadcasts of one gather, waited on together (what DeepSpeed's gather handles call)."""

    def __init__(self, works: list):
        self._works = works

    def wait(self, timeout=None) -> bool:
        for work in self._works:
            work.wait()
        return True

    def is_completed(self) -> bool:
        return all(work.is_completed() for work in self._works)


def all_gather_into_tensor(output_tensor: torch.Tensor, input_tensor: torch.Tensor, group=None,
                           async_op: bool = False):
    """`torch.distributed.all_gather_into_tensor` (rank r's input lands in the r-th slice of the
    flattened output) without a temporary of the output's size."""
    world = dist.get_world_size(group)
    if not output_tensor.is_contiguous() or output_tensor.numel() != world * input_tensor.numel():
        raise ValueError(f"all_gather_into_tensor: output of {output_tensor.numel()} elements (contiguous: "
                         f"{output_tensor.is_contiguous()}) cannot hold {world} inputs of {input_tensor.numel()}")
    if input_tensor.numel() == 0:  # nothing to gather (split(0) would not give one slice per rank)
        return _Works([]) if async_op else None
    slices = output_tensor.view(-1).split(input_tensor.numel())
    mine = slices[dist.get_rank(group)]
    if mine.data_ptr() != input_tensor.data_ptr():  # ZeRO often passes a view of its own slice
        mine.copy_(input_tensor.reshape(-1))
    works = _Works([dist.broadcast(part, group=group, group_src=src, async_op=True)
                    for src, part in enumerate(slices)])
    if async_op:
        return works
    works.wait()
    return None


def use_for_deepspeed() -> bool:
    """Route DeepSpeed's all-gathers through `all_gather_into_tensor` when the process group is gloo.
    Call after `deepspeed.init_distributed()`; returns whether it did."""
    from deepspeed import comm

    backend = comm.comm.cdb
    if backend is None or not _is_gloo():
        return False
    if not hasattr(backend, "all_gather_function"):  # DeepSpeed renamed its hook: keep its own gather
        return False
    backend.all_gather_function = all_gather_into_tensor
    return True


class FSDPAllGather:
    """FSDP2's custom all-gather hook (`allocate` + `__call__`, the shape of its AllGather comm): gathers
    synchronously, because FSDP waits only on a c10d Work and treats `None` as an already finished gather."""

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, async_op: bool = False):
        return all_gather_into_tensor(output_tensor, input_tensor, group=group, async_op=False)


def use_for_fsdp(model) -> int:
    """Give every FSDP2 unit in `model` the in-place gather when the process group is gloo; returns
    how many units got it."""
    from torch.distributed.fsdp import FSDPModule

    if not _is_gloo():
        return 0
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_custom_all_gather(FSDPAllGather())
    return len(units)
