"""Resumable checkpoints: `OUT/checkpoint-STEP/`, written to a temp dir then renamed (atomic).

Contents: `model.safetensors` (full fine-tune: all weights, fp32, exact) or the PEFT adapter
(`adapter_model.safetensors` + `adapter_config.json`); `optimizer.pt`, `scheduler.pt`;
`rng_state_rank{R}.pt` per rank; `trainer_state.json` (step, sampler position, token counts, log
history). Only directories named `checkpoint-N` are ever resumed, so a half-written temp dir
(`.tmp-checkpoint-N`) never is. Tensors are loaded with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from train.distributed import DistInfo

STATE_FILE = "trainer_state.json"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CKPT_RE.match(p.name))
             and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(value: str | None, output_dir: str) -> Path | None:
    """`--resume_from_checkpoint`: None/False → fresh; True → latest in output_dir; else a path."""
    if value is None or str(value).lower() in ("", "false", "none"):
        return None
    if str(value).lower() == "true":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume_from_checkpoint True: no complete checkpoint-N under {output_dir}")
        return found[-1]
    path = Path(value)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: not a complete checkpoint (no {STATE_FILE})")
    return path


def _rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def save_checkpoint(output_dir: str, step: int, model, optimizer, scheduler, state: dict, info: DistInfo,
                    backend, save_total_limit: int | None) -> Path:
    """Write checkpoint-STEP atomically. Model/optimizer go through the backend (rank 0 files for
    single/DDP, sharded DCP for FSDP); scheduler, trainer state and per-rank RNG are common."""
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = Path(output_dir) / f".tmp-checkpoint-{step}"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(info)
    torch.save(_rng_state(), tmp / f"rng_state_rank{info.rank}.pt")
    backend.save_state(tmp, model, optimizer)
    if info.is_main:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / STATE_FILE).write_text(json.dumps({**state, "world_size": info.world_size, "backend": backend.name},
                                                 indent=2))
    _barrier(info)
    if info.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if save_total_limit:
            for old in list_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier(info)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler, info: DistInfo, backend) -> dict:
    """Restore weights, optimizer, scheduler and this rank's RNG; returns the trainer state."""
    state = json.loads((path / STATE_FILE).read_text())
    saved_by = state.get("backend", "single")
    kind = {"fsdp": "fsdp", "deepspeed": "deepspeed"}  # single and ddp share one file layout
    if kind.get(saved_by, "plain") != kind.get(backend.name, "plain"):
        raise ValueError(f"--resume_from_checkpoint {path}: written by the {saved_by} backend, which stores "
                         f"weights differently from {backend.name}; resume with the same kind of backend")
    backend.load_state(path, model, optimizer)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    rng_file = path / f"rng_state_rank{info.rank}.pt"
    if rng_file.is_file() and state.get("world_size") == info.world_size:
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def save_model_files(directory: Path, model, optimizer, is_peft: bool) -> None:
    """Single-process/DDP checkpoint payload, written by rank 0: weights (or adapter) + optimizer."""
    if is_peft:
        model.save_pretrained(directory)  # adapter_model.safetensors + adapter_config.json
    else:
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        _save_dedup(tensors, directory / "model.safetensors")
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")


def load_model_files(directory: Path, model, optimizer, is_peft: bool) -> None:
    if is_peft:
        from peft import set_peft_model_state_dict

        weights = load_file(str(directory / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, weights)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"{directory}: adapter has keys the model lacks: {unexpected[:5]}")
    else:
        from safetensors import safe_open

        weights = load_file(str(directory / "model.safetensors"))
        with safe_open(str(directory / "model.safetensors"), "pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
        for alias, source in aliases.items():
            weights[alias] = weights[source]
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"{directory}: checkpoint does not match the model (missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]})")
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True))


def _save_dedup(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors refuses shared storage (tied embeddings): store each storage once, remember aliases."""
    seen: dict[tuple, str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for k, v in tensors.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            aliases[k] = seen[key]
        else:
            seen[key] = k
            unique[k] = v.clone() if v.untyped_storage().nbytes() != v.numel() * v.element_size() else v
    save_file(unique, str(path), metadata={"aliases": json.dumps(aliases)})
