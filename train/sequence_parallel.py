"""Sequence-parallel groups and the split of a batch along the sequence.

N consecutive ranks form an SP group that trains the same rows, each rank holding L/N of their positions;
data parallelism runs over the W/N groups (the sampler sees `dp_size` ranks). The collator builds the whole
batch on every rank of the group (labels already shifted, positions global, `cu_seq_lens` of the whole row)
and `shard_batch` keeps this rank's slice, so a label never depends on a neighbour's tokens. The loss needs no
change: each rank sums the token losses of its slice, the step's token count is all-reduced over every rank,
and the gradient reduction over all W ranks adds the slices' contributions (train/loop.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from train.attention import set_sequence_parallel_group
from train.distributed import DistInfo

SEQUENCE_KEYS = ("input_ids", "labels", "position_ids")  # (batch, length) entries split along the length


@dataclass(frozen=True)
class SequenceParallel:
    size: int = 1  # ranks per group (--sequence_parallel_size)
    rank: int = 0  # this rank's place in its group: it holds positions [rank·L/N, (rank+1)·L/N)
    dp_rank: int = 0  # which group: the data-parallel rank the sampler and eval shard by
    dp_size: int = 1
    group: Any = None

    @property
    def enabled(self) -> bool:
        return self.size > 1


def init_sequence_parallel(info: DistInfo, size: int) -> SequenceParallel:
    """Create the groups (every rank creates every group, as torch requires) and route attention through ours."""
    if size == 1:
        set_sequence_parallel_group(None)
        return SequenceParallel(dp_rank=info.rank, dp_size=info.world_size)
    if info.world_size % size:
        raise ValueError(f"--sequence_parallel_size {size} must divide the number of processes ({info.world_size})")
    groups = [dist.new_group(list(range(g * size, (g + 1) * size))) for g in range(info.world_size // size)]
    mine = groups[info.rank // size]
    set_sequence_parallel_group(mine)
    return SequenceParallel(size, info.rank % size, info.rank // size, info.world_size // size, mine)


def check_heads(config, size: int) -> None:
    """Ulysses gives each rank H/N query heads: refuse, in one line, a model whose heads N does not divide."""
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    if size > 1 and heads is not None and heads % size:
        raise ValueError(f"--sequence_parallel_size {size}: the model has {heads} attention heads ({kv} KV heads), "
                         f"which {size} does not divide; Ulysses attention splits the heads over the group "
                         "(ring attention is not built). Use a size that divides the head count")


def shard_batch(batch: dict, sp: SequenceParallel) -> dict:
    """This rank's slice of a collated batch. Real tokens are counted per slice (`num_tokens`), so sums over all
    ranks count each token once; the 2D padding mask is dropped (right padding under causal attention, see
    train/attention.py)."""
    if not sp.enabled:
        return batch
    length = batch["input_ids"].shape[1]
    if length % sp.size:
        raise ValueError(f"a row of {length} tokens does not split over --sequence_parallel_size {sp.size}")
    per = length // sp.size
    start, end = sp.rank * per, (sp.rank + 1) * per
    out = {k: v for k, v in batch.items() if k not in SEQUENCE_KEYS and k not in ("attention_mask", "num_tokens")}
    for key in SEQUENCE_KEYS:
        out[key] = batch[key][:, start:end].contiguous()
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        out["num_tokens"] = mask[:, start:end].sum()
    elif mask is not None:
        raise ValueError("sequence parallelism needs packed rows as one row with cu_seq_lens (varlen), not a 4D mask")
    else:  # a flattened packed row: its real tokens are a prefix
        out["num_tokens"] = torch.tensor(max(0, min(int(batch["num_tokens"]) - start, per)))
    return out
