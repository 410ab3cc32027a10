"""Deterministic, seeded, resumable, rank-sharded batching (with optional packing and length grouping).

An epoch's plan is a pure function of (sample lengths, seed, epoch, batch size, world size, rank,
packing, length grouping): the same inputs give the same micro-batches on every run, so a resumed
run only needs (epoch, micro-batch index) to continue exactly where it stopped.

Units are single samples, or with packing, bins of samples filled best-fit-decreasing up to
model_max_length. Units are shuffled per epoch; with length grouping, each window of 64 micro-batches
is sorted by length so batches hold similar lengths (less padding) while order stays random at the
window level. The micro-batch list is made a multiple of the world size by repeating from its start
(every sample is seen; a few are seen twice), and rank r takes micro-batches r, r+W, r+2W, ...
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def pack_best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of sample indices, each summing to <= capacity; longest samples placed first, each into
    the fullest bin it still fits (best fit). Deterministic: ties keep index order."""
    lengths = lengths.tolist() if hasattr(lengths, "tolist") else lengths  # Python ints index fast in the loop
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin index)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than the packing capacity {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            remaining, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (remaining - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
    return bins


@dataclass(frozen=True)
class PlanConfig:
    batch_size: int
    world_size: int = 1
    rank: int = 0
    seed: int = 42
    packing: bool = False
    max_length: int = 2048
    group_by_length: bool = False
    shuffle: bool = True


def plan_epoch(lengths: Sequence[int], epoch: int, cfg: PlanConfig) -> list[list[list[int]]]:
    """This rank's micro-batches for one epoch; each micro-batch is a list of units (lists of indices)."""
    lengths = lengths.tolist() if hasattr(lengths, "tolist") else lengths
    units = pack_best_fit_decreasing(lengths, cfg.max_length) if cfg.packing else [[i] for i in range(len(lengths))]
    if not units:
        return []
    if cfg.shuffle:
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        units = [units[i] for i in torch.randperm(len(units), generator=g).tolist()]
    if cfg.group_by_length:
        window = cfg.batch_size * cfg.world_size * 64  # depends only on the global micro-batch size
        unit_len = lambda u: sum(lengths[i] for i in u)  # noqa: E731
        units = [u for w in range(0, len(units), window) for u in sorted(units[w:w + window], key=unit_len, reverse=True)]
    batches = [units[i:i + cfg.batch_size] for i in range(0, len(units), cfg.batch_size)]
    n = len(batches)
    batches += [batches[i % n] for i in range(-n % cfg.world_size)]
    return batches[cfg.rank::cfg.world_size]


@dataclass
class SamplerState:
    epoch: int = 0
    micro_index: int = 0  # micro-batches of this epoch already consumed (same on every rank)

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "micro_index": self.micro_index}


class MicroBatchStream:
    """Iterates (epoch, index, micro-batch units) from a SamplerState, forever (epochs roll over)."""

    def __init__(self, lengths: Sequence[int], cfg: PlanConfig, state: SamplerState | None = None):
        self.lengths = lengths if hasattr(lengths, "tolist") else list(lengths)  # a NumPy column stays compact
        self.cfg = cfg
        self.state = state or SamplerState()
        self._plan_epoch = -1
        self._plan: list[list[list[int]]] = []
        self._per_epoch: int | None = None

    def micro_batches_per_epoch(self) -> int:
        if self._per_epoch is None:
            self._per_epoch = len(plan_epoch(self.lengths, 0, self.cfg))  # the same for every epoch
        return self._per_epoch

    def _plan_for(self, epoch: int) -> list[list[list[int]]]:
        if epoch != self._plan_epoch:
            self._plan = plan_epoch(self.lengths, epoch, self.cfg)
            self._plan_epoch = epoch
        return self._plan

    def next(self) -> tuple[int, list[list[int]]]:
        plan = self._plan_for(self.state.epoch)
        if self.state.micro_index >= len(plan):
            self.state = SamplerState(self.state.epoch + 1, 0)
            plan = self._plan_for(self.state.epoch)
        batch = plan[self.state.micro_index]
        epoch = self.state.epoch
        self.state = SamplerState(epoch, self.state.micro_index + 1)
        return epoch, batch


def units_consumed(state: SamplerState, world: int, batch: int) -> int:
    """Units (samples, or packed rows) of the epoch's global order consumed at `state`, with `world` ranks
    taking `batch` units per micro-batch each."""
    return state.micro_index * world * batch


def rescale_sampler_state(state: SamplerState, old_world: int, old_batch: int, new_world: int, new_batch: int) -> SamplerState:
    """Map a data position saved at one (world size, per-device batch) to another: the epoch plan's
    global order of units does not depend on either, so the position is `units consumed`."""
    if (old_world, old_batch) == (new_world, new_batch):
        return state
    units = units_consumed(state, old_world, old_batch)
    per_micro = new_world * new_batch
    if units % per_micro:
        raise ValueError(f"cannot resume at the exact data position: {units} units were consumed this epoch, not a "
                         f"multiple of world size × --per_device_train_batch_size = {per_micro}; keep the global "
                         "micro-batch size divisible")
    return SamplerState(state.epoch, units // per_micro)
