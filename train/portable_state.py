"""The resumable training state in one layout for every backend, so a checkpoint moves between them.

A checkpoint's weights and optimizer state are a `torch.distributed.checkpoint` (DCP) of

    {"model": {FQN: tensor}, "optim": {FQN: {"step": t, "exp_avg": t, "exp_avg_sq": t, ...}}}

keyed by the unwrapped model's parameter names (the Hugging Face / peft names), never by a wrapper's
flat buffers or a rank's partition. DCP stores each tensor with its global shape and reshards on
load, so what 2 FSDP2 ranks wrote loads into 1 process, into 3 ranks, or into DeepSpeed, and back.
LoRA runs store only the trainable (adapter) tensors; the frozen base comes from the model itself.

Single/DDP and FSDP2 produce this with torch's `get_model_state_dict` / `get_optimizer_state_dict`
(plain tensors or DTensor shards). DeepSpeed keeps parameters and optimizer states in flat fp32
partitions; train/deepspeed_backend.py reads and writes them one parameter at a time through
DeepSpeed's public `safe_get_full_*` / `safe_set_full_*` API and hands DCP a DTensor shard per
rank, so no rank ever holds the whole state. The optimizer's param_groups (learning rate, betas)
are not stored: they follow from the run's flags, and the learning rate from the scheduler.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

DCP_DIR = "dcp"
# DCP warns on every single-process save or load (also from its async writer thread) that it assumes one
# process, which is what was asked for
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def _options(is_peft: bool) -> StateDictOptions:
    return StateDictOptions(ignore_frozen_params=is_peft, strict=not is_peft)


def _torch_state(model, optimizer, is_peft: bool) -> tuple[dict, list]:
    """(the portable state, the optimizer's param_groups keyed by FQN) of a plain, DDP-unwrapped or FSDP2 model."""
    options = _options(is_peft)
    weights = get_model_state_dict(model, options=options)
    if is_peft:  # a tied frozen weight (lm_head = embeddings) escapes ignore_frozen_params
        trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
        weights = {k: v for k, v in weights.items() if k in trainable}
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    return {"model": weights, "optim": optim["state"]}, optim["param_groups"]


def torch_state(model, optimizer, is_peft: bool) -> dict:
    return _torch_state(model, optimizer, is_peft)[0]


def load_torch_state(directory: Path, model, optimizer, is_peft: bool) -> None:
    target, groups = _torch_state(model, optimizer, is_peft)  # groups: this run's own (see the module docstring)
    check_matches(directory, target)
    dcp.load(target, checkpoint_id=str(directory / DCP_DIR), no_dist=not dist.is_initialized())
    options = _options(is_peft)
    set_model_state_dict(model, target["model"], options=options)
    set_optimizer_state_dict(model, optimizer, {"state": target["optim"], "param_groups": groups}, options=options)


def flat_shapes(state: dict, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """DCP's flattened keys (`model.<fqn>`, `optim.<fqn>.<key>`) and global shapes of a portable state."""
    out: dict[str, tuple[int, ...]] = {}
    for k, v in state.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_shapes(v, key + "."))
        elif isinstance(v, torch.Tensor):
            out[key] = tuple(v.shape)
    return out


def _saved_metadata(directory: Path) -> dict:
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(directory / DCP_DIR)).read_metadata().state_dict_metadata


def saved_optimizer_keys(directory: Path) -> list[str]:
    """The per-parameter optimizer state tensors a checkpoint holds (e.g. exp_avg, exp_avg_sq), step aside."""
    keys = {k.rsplit(".", 1)[1] for k in _saved_metadata(directory) if k.startswith("optim.")}
    return sorted(keys - {"step"})


class IncompatibleCheckpoint(ValueError):
    pass


def check_matches(directory: Path, target: dict) -> None:
    """One line naming what differs when the checkpoint was written for another model, another LoRA
    setup or another optimizer (DCP itself would fail later with a message about planner items)."""
    saved = {k: tuple(getattr(m, "size", ())) for k, m in _saved_metadata(directory).items()}
    want = flat_shapes(target)
    missing = [k for k in want if k not in saved]
    wrong = [k for k in want if k in saved and saved[k] != want[k]]
    model_extra = [k for k in saved if k.startswith("model.") and k not in want]
    if not (missing or wrong or model_extra):
        return
    if wrong:
        k = wrong[0]
        detail = f"{len(wrong)} tensor(s) have another shape, e.g. {k.split('.', 1)[1]}: {list(saved[k])} in the " \
                 f"checkpoint, {list(want[k])} here"
    elif any(k.startswith("model.") for k in missing) or model_extra:
        miss = [k for k in missing if k.startswith("model.")]
        k = (miss or model_extra)[0]
        detail = (f"{len(miss)} weight(s) of this model are not in it, e.g. {k.split('.', 1)[1]}" if miss else
                  f"it holds {len(model_extra)} weight(s) this model lacks, e.g. {k.split('.', 1)[1]}")
    else:
        keys = sorted({k.rsplit(".", 1)[1] for k in missing})
        detail = f"its optimizer state lacks {', '.join(keys)} (written with another --optim?)"
    raise IncompatibleCheckpoint(f"--resume_from_checkpoint {directory}: written for a different model or setup: {detail}")
