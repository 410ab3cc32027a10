"""fp16 overflow, forced on CPU: Backend.optimizer_step skips the update and lowers the loss scale when the
scaled gradients overflow, and under FSDP2 ShardedGradScaler makes every rank skip together when only one
rank's gradients are not finite (train/backends.py, train/fsdp.py)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
from helpers import run_gloo_ranks

from train.backends import Backend
from train.distributed import DistInfo
from train.fsdp import FSDPBackend
from train.precision import Precision
from train.sharding_config import FSDPSettings

CPU = torch.device("cpu")


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_overflow_skips_the_step_and_lowers_the_scale_then_the_next_step_applies():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)  # fp32 master weights, as fp16 training keeps them
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    backend = Backend(DistInfo(0, 1, 0, CPU))
    initial = 2.0**127  # near fp32's max (2^128): any gradient of magnitude >= 2 overflows once scaled
    scaler = torch.amp.GradScaler("cpu", init_scale=initial)
    before = _params(model)

    loss = model(torch.full((4, 4), 8.0)).sum()  # d loss / d weight = 4 * 8 = 32 -> 2^132 scaled: inf
    scaler.scale(loss).backward()
    assert not all(torch.isfinite(p.grad).all() for p in model.parameters())  # the overflow did happen
    applied, grad_norm = backend.optimizer_step(model, optimizer, 1.0, math.isfinite(loss.item()), scaler)
    assert applied is False and not math.isfinite(grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    lowered = scaler.get_scale()
    assert lowered < initial and lowered == initial * 0.5  # GradScaler's default backoff_factor

    optimizer.zero_grad(set_to_none=True)
    loss = model(torch.full((4, 4), 1e-3)).sum() * 1e-3  # small gradients: finite at the lowered scale
    scaler.scale(loss).backward()
    applied, grad_norm = backend.optimizer_step(model, optimizer, 1.0, math.isfinite(loss.item()), scaler)
    assert applied is True
    # the norm is of the true (unscaled) gradients: weight grads 4e-6 each (12 of them), bias grads 4e-3 (3)
    assert math.isclose(grad_norm, math.sqrt(12 * 4e-6**2 + 3 * 4e-3**2), rel_tol=1e-4)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scaler.get_scale() == lowered  # no overflow: unchanged until growth_interval clean steps


def _overflow_worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        torch.manual_seed(0)  # the same weights and input on both ranks
        model = torch.nn.Linear(4, 4)
        fully_shard(model)  # parameters and gradients are DTensors sharded over the two ranks
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        backend = FSDPBackend(DistInfo(rank, 2, rank, CPU), FSDPSettings(), Precision("fp16"), is_peft=False)
        scaler = backend.make_grad_scaler()
        initial = scaler.get_scale()
        before = [p.to_local().clone() for p in model.parameters()]

        loss = model(torch.ones(2, 4)).sum()
        scaler.scale(loss).backward()
        local_finite_before = True
        for p in model.parameters():
            local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            if rank == 1:
                local.fill_(float("inf"))  # only rank 1's shard of the gradients overflows
            local_finite_before = local_finite_before and bool(torch.isfinite(local).all())
        applied, grad_norm = backend.optimizer_step(model, optimizer, 1.0, True, scaler)
        unchanged = all(torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters()))
        results[rank] = {"scaler": type(scaler).__name__, "local_finite": local_finite_before, "applied": applied,
                         "grad_norm": grad_norm, "unchanged": unchanged, "initial": initial,
                         "scale": scaler.get_scale()}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_scaler_makes_every_rank_skip_when_one_rank_overflows():
    results = run_gloo_ranks(_overflow_worker)
    r0, r1 = results[0], results[1]
    assert r0["scaler"] == r1["scaler"] == "ShardedGradScaler"
    assert r0["local_finite"] and not r1["local_finite"]  # rank 0's own gradients were finite
    for r in (r0, r1):
        assert r["applied"] is False and not math.isfinite(r["grad_norm"]), r
        assert r["unchanged"], r
        assert r["scale"] < r["initial"], r
    assert r0["scale"] == r1["scale"] == r0["initial"] * 0.5  # the same lowered scale on both ranks
