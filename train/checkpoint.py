"""Checkpoints that survive a crash and resume anywhere: `OUT/checkpoint-STEP/`.

One `Checkpointer` owns saving (synchronous or in the background), publishing, rotation, finding
the newest complete checkpoint and loading it; the training loop only asks it to save.

Contents of `checkpoint-STEP/`:
  dcp/                   weights + optimizer state in the portable layout (train/portable_state.py):
                         any backend, any world size can load it
  scheduler.pt           the LR schedule (torch.load with weights_only=True)
  rng_state_rank{R}.pt   each rank's RNG streams (restored when the world size is unchanged)
  trainer_state.json     step, data position (in units: samples, or packed rows), the run facts a
                         resume must keep (global batch, data plan), log of what wrote it
  manifest.json          every other file and its size; written last

Crash safety. Everything is written into `.tmp-checkpoint-STEP/`; every file is fsynced by the rank
that wrote it (DCP's writer with `sync_files`), then the manifest, then the directory, and only then is
the directory renamed to `checkpoint-STEP` and the parent directory fsynced. A checkpoint counts as
complete when it has that name and every file of its manifest exists with its recorded size, so a
process killed at any moment leaves the previous checkpoint as the newest complete one. Old
checkpoints (`--save_total_limit`) are renamed to `.trash-…` before they are deleted, so a half-deleted
one never looks complete. A failed write (disk full) is one line on every rank, the temp dir is removed
and the previous checkpoint is untouched.

Async saves (`--async_save True`): the state is copied to host memory (pinned on CUDA) while the
step loop waits, then DCP writes it from a background thread on a process group of its own (gloo),
and rank 0 publishes it when the write completes. The next save, and the end of training, wait for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import threading
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from train.distributed import DistInfo, all_reduce_max
from train.portable_state import DCP_DIR, IncompatibleCheckpoint

FORMAT_VERSION = 2
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message is one line and names what is intact."""


def is_complete(path: Path) -> bool:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return all((path / rel).stat().st_size == size for rel, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under output_dir, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found) if is_complete(p)]


def resolve_resume(value: str | None, output_dir: str) -> Path | None:
    """`--resume_from_checkpoint`: None/False → fresh; True → the newest complete checkpoint in
    output_dir (error if none); auto → the newest if any, else fresh; else that checkpoint."""
    low = str(value).lower() if value is not None else ""
    if low in ("", "false", "none"):
        return None
    if low in ("true", "auto"):
        found = list_checkpoints(output_dir)
        if found:
            return found[-1]
        if low == "auto":
            return None
        raise FileNotFoundError(f"--resume_from_checkpoint True: no complete checkpoint-N under {output_dir}")
    path = Path(value)
    if (path / STATE_FILE).is_file() and not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: written by an older chattune (no {MANIFEST}); "
                                "it cannot be resumed by this version")
    if not is_complete(path):
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: not a complete checkpoint (its {MANIFEST} is "
                                "missing or names files that are missing or truncated)")
    return path


def lengths_fingerprint(lengths) -> str:
    return hashlib.sha1(np.asarray(lengths, dtype=np.int64).tobytes()).hexdigest()[:16]


# What a resume must keep, with the flags that set it (checked in this order; the first difference is reported).
RUN_FACTS = {
    "mode": "the fine-tuning mode (full / lora / qlora)",
    "global_batch": "world size × --per_device_train_batch_size × --gradient_accumulation_steps",
    "packing": "--packing",
    "rows": "--model_max_length (it sets how samples are packed into rows)",
    "group_by_length": "--group_by_length",
    "seed": "--seed (it sets the data order)",
    "data": "the training data (--data_path and its preprocessing)",
}


def check_run_facts(path: Path, saved: dict, now: dict) -> None:
    differ = [k for k in RUN_FACTS if k in saved and k in now and saved[k] != now[k]]
    if differ:
        k = differ[0]
        more = f" (and {len(differ) - 1} more: {', '.join(differ[1:])})" if len(differ) > 1 else ""
        raise IncompatibleCheckpoint(f"--resume_from_checkpoint {path}: {RUN_FACTS[k]} differs: {saved[k]} in the "
                                     f"checkpoint, {now[k]} now{more}; resume with the same, or start fresh")


def check_resumable(path: Path, run_facts: dict) -> dict:
    """The trainer state of a checkpoint this run can resume (format and run facts), before anything is loaded:
    a resume that cannot be honoured fails in seconds, not after the model is built."""
    state = json.loads((path / STATE_FILE).read_text())
    if state.get("format_version") != FORMAT_VERSION:
        raise IncompatibleCheckpoint(f"--resume_from_checkpoint {path}: checkpoint format "
                                     f"{state.get('format_version', 1)}, this chattune reads {FORMAT_VERSION}")
    check_run_facts(path, state.get("run", {}), run_facts)
    return state


# --- files --------------------------------------------------------------------------------------

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


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


def _reason(exc: BaseException, root: Path, need_bytes: int = 0) -> str:
    """The root cause of a failed write in a few words (DCP wraps each rank's error). torch's zip writer
    turns a failed write into "unexpected pos …", so without an OSError in the chain the usual causes are
    checked directly: the process's file size limit and the free space where the checkpoint goes."""
    seen = [exc]
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict):
        seen += [e for e in failures.values() if isinstance(e, BaseException)]
    while seen[-1].__cause__ is not None or seen[-1].__context__ is not None:
        seen.append(seen[-1].__cause__ or seen[-1].__context__)
    for e in seen:
        if isinstance(e, OSError) and e.strerror:
            return e.strerror + (f": {e.filename}" if e.filename else "")
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < need_bytes:
        return f"File too large: this process may write files of {limit / 2**20:,.0f} MB (ulimit -f), the checkpoint " \
               f"needs {need_bytes / 2**20:,.0f} MB"
    free = shutil.disk_usage(root).free
    if free < max(need_bytes, 1):
        return f"No space left on device: {free / 2**20:,.0f} MB free in {root}, the checkpoint needs " \
               f"{need_bytes / 2**20:,.0f} MB"
    text = str(seen[-1]) or str(exc)
    return f"{type(seen[-1]).__name__}: {text.splitlines()[0][:200]}" if text else type(seen[-1]).__name__


class Checkpointer:
    def __init__(self, output_dir: str, info: DistInfo, backend, save_total_limit: int | None = None,
                 async_save: bool = False):
        self.root = Path(output_dir)
        self.info = info
        self.backend = backend
        self.save_total_limit = save_total_limit
        self.async_save = async_save
        self._pending: tuple[Future, Path, Path] | None = None
        self._publish_error: BaseException | None = None
        self._published = threading.Event()
        # DCP's background write runs collectives: never on the group the step loop is using
        self._pg = dist.new_group(backend="gloo") if async_save and info.distributed else None
        self._need_bytes = 0  # what this rank's part of the checkpoint being written takes on disk
        self._stager = None
        if async_save and torch.cuda.is_available():  # copy to pinned host buffers, reused from save to save
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            self._stager = DefaultStager(StagingOptions(use_pinned_memory=True, use_shared_memory=False,
                                                        use_async_staging=False, use_non_blocking_copy=True))

    # --- save -------------------------------------------------------------------------------------
    def save(self, step: int, model, optimizer, scheduler, trainer_state: dict) -> str:
        self.wait()
        final, tmp = self.root / f"checkpoint-{step}", self.root / f".tmp-checkpoint-{step}"
        error = None
        if self.info.is_main:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                for stale in self.root.iterdir():  # left by a crash: never resumed, removed here
                    if stale.name.startswith((".tmp-checkpoint-", ".trash-checkpoint-")):
                        shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir()
            except OSError as e:
                error = e
        self._agree(error, tmp, final)
        try:
            _torch_save(_rng_state(), tmp / f"rng_state_rank{self.info.rank}.pt")
            if self.info.is_main:
                _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
                state = {**trainer_state, "format_version": FORMAT_VERSION, "world_size": self.info.world_size,
                         "backend": self.backend.name}
                _write_bytes(tmp / STATE_FILE, json.dumps(state, indent=2).encode())
        except OSError as e:
            error = e
        self._agree(error, tmp, final)
        state = self.backend.checkpoint_state(model, optimizer)  # collective for sharded backends
        self._need_bytes = _local_bytes(state)
        from torch.distributed.checkpoint import FileSystemWriter

        writer = FileSystemWriter(str(tmp / DCP_DIR), sync_files=True)
        if self.async_save:
            self._published.clear()
            future = dcp_async_save(state, writer, self._pg, self.info.distributed, self._stager)
            del state
            if self.info.is_main:
                future.add_done_callback(lambda f: self._publish_async(f, tmp, final))
            self._pending = (future, tmp, final)
            return str(final)
        try:
            dcp_save(state, writer, self.info.distributed)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP raises on every rank alike; one line, stop
            error = e
        del state
        self._agree(error, tmp, final)
        if self.info.is_main:
            try:
                self._publish(tmp, final)
            except OSError as e:
                error = e
        self._agree(error, tmp, final)
        return str(final)

    def wait(self) -> None:
        """Block until the previous async save is written and published; raise if it failed."""
        if self._pending is None:
            return
        future, tmp, final = self._pending
        self._pending = None
        error = None
        try:
            future.result()
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - CheckpointException is a BaseException
            error = e
        if self.info.is_main:
            self._published.wait()
            error = error or self._publish_error
            self._publish_error = None
        self._agree(error, tmp, final)

    def close(self) -> None:
        """Wait for a save in flight, then release the pinned staging buffers."""
        try:
            self.wait()
        finally:
            if self._stager is not None:
                self._stager.close()
                self._stager = None

    def _publish_async(self, future: Future, tmp: Path, final: Path) -> None:
        try:
            if future.exception() is None:
                self._publish(tmp, final)
        except BaseException as e:  # noqa: BLE001 - reported by wait()
            self._publish_error = e
        finally:
            self._published.set()

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rank 0, after every rank's files are written: manifest, fsync, rename, fsync the parent, rotate."""
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        _write_bytes(tmp / MANIFEST, json.dumps({"files": files}, indent=1).encode())
        for d in [tmp, *[p for p in tmp.rglob("*") if p.is_dir()]]:
            _fsync(d)
        if final.exists():  # a checkpoint of the same step (a resumed run saving it again)
            old = final.with_name(f".trash-{final.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        _fsync(self.root)
        if self.save_total_limit:
            for stale in list_checkpoints(self.root)[:-self.save_total_limit]:
                trash = stale.with_name(f".trash-{stale.name}")
                os.replace(stale, trash)
                shutil.rmtree(trash, ignore_errors=True)
            _fsync(self.root)

    def _agree(self, error: BaseException | None, tmp: Path, final: Path) -> None:
        """Every rank learns whether any rank failed, so all stop together with the same line."""
        failed = all_reduce_max(1 if error is not None else 0, self.info.device) if self.info.distributed \
            else int(error is not None)
        need = self._need_bytes
        if not failed:
            return
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = [p for p in list_checkpoints(self.root) if p != final]
        kept = f"{previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        why = _reason(error, self.root, need) if error is not None else "another rank failed to write its part"
        raise CheckpointWriteError(f"{final.name} could not be written ({why}); {kept}")

    # --- load -------------------------------------------------------------------------------------
    def load(self, path: Path, model, optimizer, scheduler, state: dict) -> dict:
        """Restore weights, optimizer, schedule and (same world size) RNG from a checkpoint whose trainer
        `state` check_resumable returned (checked before the model was built); returns that state."""
        self.backend.load_checkpoint_state(path, model, optimizer)
        scheduler.load_state_dict(_fit_groups(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True),
                                              len(optimizer.param_groups)))
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr  # the schedule's current rate, whatever the optimizer's own groups held
        rng_file = path / f"rng_state_rank{self.info.rank}.pt"
        if rng_file.is_file() and state.get("world_size") == self.info.world_size:
            _set_rng_state(torch.load(rng_file, weights_only=True))
        return state


def _local_bytes(state) -> int:
    from torch.distributed.tensor import DTensor

    if isinstance(state, dict):
        return sum(_local_bytes(v) for v in state.values())
    if isinstance(state, DTensor):
        state = state.to_local()
    return state.numel() * state.element_size() if isinstance(state, torch.Tensor) else 0


def _fit_groups(scheduler_state: dict, groups: int) -> dict:
    """Backends group parameters differently (DeepSpeed's flat groups, torch's decay / no-decay), and the
    schedule keeps one entry per group. Every group follows the same schedule here (one --learning_rate),
    so the first entry serves them all."""
    for key in ("base_lrs", "_last_lr", "lr_lambdas"):
        value = scheduler_state.get(key)
        if isinstance(value, list) and value and len(value) != groups:
            scheduler_state[key] = [value[0]] * groups
    return scheduler_state


def dcp_save(state: dict, writer, distributed: bool) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(state, storage_writer=writer, no_dist=not distributed)


def dcp_async_save(state: dict, writer, process_group, distributed: bool, stager=None) -> Future:
    """On CPU the writer stages (copies) the state itself; on CUDA `stager` copies it into pinned memory."""
    import torch.distributed.checkpoint as dcp

    result = dcp.async_save(state, storage_writer=writer, process_group=process_group, no_dist=not distributed,
                            async_stager=stager)
    return getattr(result, "upload_completion", result)  # an AsyncSaveResponse with an async stager
