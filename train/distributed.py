"""Distributed setup as a pair of functions (init_distributed / cleanup) plus print0.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them we run as a single process. CPU uses gloo,
CUDA uses nccl. `cleanup()` is meant for a `finally:` so processes always exit through a barrier and
destroy the process group (DeepSpeed/gloo otherwise occasionally abort at exit).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(need_process_group: bool = False) -> DistInfo:
    """`need_process_group`: create one even for a single process (FSDP2 shards over a device mesh)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if (world > 1 or need_process_group) and not dist.is_initialized():
        if world == 1:  # plain `python train.py`: a one-process group on loopback
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local_rank, device)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(value: float | int | torch.Tensor, device: torch.device) -> float:
    """Sum a number (or a one-element tensor, read once here) over ranks; identity when not distributed."""
    if torch.is_tensor(value):
        t = value.detach().to(device=device, dtype=torch.float64).reshape(1).clone()
    else:
        t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.item()


def all_reduce_max(value: float | int, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()
