"""Nothing is lost on a crash: kill -9 during saves, a full disk, and the checkpoint directory rules."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import resource
import signal
import subprocess
import time

import pytest
import torch
from helpers import ENV, ROOT, common, losses, run, train_cmd

from train.backends import Backend
from train.checkpoint import Checkpointer, check_resumable, list_checkpoints, resolve_resume
from train.distributed import DistInfo

INFO = DistInfo(0, 1, 0, torch.device("cpu"))


def _objects():
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(6)])  # ~1.6 MB of weights, 3x with Adam
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 256)).sum().backward()
    optimizer.step()  # Adam moments exist, so they are saved and loaded too
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return model, optimizer, scheduler


def _save_forever(out_dir: str, progress: str, first: int) -> None:
    """A forked worker: save checkpoints first, first+1, ... (weights filled with the step) until killed."""
    torch.set_num_threads(1)
    model, optimizer, scheduler = _objects()
    ckpt = Checkpointer(out_dir, INFO, Backend(INFO), save_total_limit=2)
    for step in range(first, first + 1000):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(step)
        ckpt.save(step, model, optimizer, scheduler, {"step": step, "run": {}})
        with open(progress, "a") as f:
            f.write(f"{step}\n")


def _zygote(conn, out_dir: str, progress: str) -> None:
    """Imports torch once, then forks one saving worker per request (a fork of a process that never ran a
    parallel region is safe), reports its pid, and reaps it once the test has killed it."""
    import torch  # noqa: F401

    while (first := conn.recv()) is not None:
        pid = os.fork()
        if pid == 0:
            try:
                _save_forever(out_dir, progress, first)
            finally:
                os._exit(0)
        conn.send(pid)
        os.waitpid(pid, 0)
        conn.send("reaped")


def _done(progress) -> list[int]:
    return [int(x) for x in progress.read_text().split()] if progress.exists() else []


@pytest.mark.slow
def test_kill_9_at_random_moments_always_leaves_the_newest_complete_checkpoint_loadable(tmp_path):
    out, progress = tmp_path / "out", tmp_path / "progress"
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    zygote = ctx.Process(target=_zygote, args=(child, str(out), str(progress)), daemon=True)
    zygote.start()
    rng = random.Random(0)
    kills = 0
    try:
        # first, time one save to aim the kills inside saves
        parent.send(1)
        pid = parent.recv()
        deadline = time.time() + 120
        while len(_done(progress)) < 3 and time.time() < deadline:
            time.sleep(0.01)
        t0, n0 = time.time(), len(_done(progress))
        while len(_done(progress)) < n0 + 3:
            time.sleep(0.005)
        per_save = (time.time() - t0) / 3
        os.kill(pid, signal.SIGKILL)
        assert parent.recv() == "reaped"
        while kills < 20:
            newest = list_checkpoints(out)[-1]
            before = _done(progress)
            parent.send(int(newest.name.split("-")[1]) + 1)  # a restarted job continues after the newest
            pid = parent.recv()
            target = len(before) + rng.randint(0, 2)
            while len(_done(progress)) < target:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, per_save))  # somewhere inside the next save
            os.kill(pid, signal.SIGKILL)
            assert parent.recv() == "reaped"
            kills += 1
            reported = _done(progress)[-1]
            found = list_checkpoints(out)
            assert found, "no complete checkpoint left"
            newest = found[-1]
            step = int(newest.name.split("-")[1])
            assert step >= reported, (step, reported)  # every save that returned is complete
            assert resolve_resume("auto", str(out)) == newest
            model, optimizer, scheduler = _objects()
            Checkpointer(str(out), INFO, Backend(INFO)).load(newest, model, optimizer, scheduler,
                                                              check_resumable(newest, {}))
            assert all(torch.equal(p, torch.full_like(p, step)) for p in model.parameters()), newest
            assert len(found) <= 3  # --save_total_limit 2, plus one when killed between publishing and rotating
    finally:
        parent.send(None)
        zygote.join(10)
    assert kills == 20


def _ignore_sigxfsz_and_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_a_disk_that_fills_mid_save_is_one_line_and_keeps_the_previous_checkpoint(tiny_llama, tmp_path):
    out = tmp_path / "run"
    flags = {"per_device_train_batch_size": 2, "save_steps": 1}
    run("train.py", common(tiny_llama, out, max_steps=1, **flags))
    first = out / "checkpoint-1"
    weights = max(p.stat().st_size for p in (first / "dcp").iterdir())
    proc = subprocess.run(train_cmd("train.py", None) + common(tiny_llama, out, max_steps=2, resume_from_checkpoint="auto",
                                                              **flags),
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600,
                          preexec_fn=_ignore_sigxfsz_and_limit(weights // 3))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")] or [proc.stderr[-3000:]]
    assert line.startswith("error: checkpoint-2 could not be written (File too large") and \
        line.endswith(f"); {first} is intact"), line
    assert "Traceback" not in proc.stderr
    assert list_checkpoints(out) == [first] and not any(p.name.startswith(".tmp") for p in out.iterdir())
    run("train.py", common(tiny_llama, out, max_steps=2, resume_from_checkpoint="auto", **flags))  # space is back
    assert sorted(losses(out)) == [1, 2]


@pytest.mark.slow
def test_auto_resume_starts_fresh_then_resumes_and_metrics_hold_each_step_once(tiny_llama, tmp_path):
    """`--resume_from_checkpoint auto` for schedulers that restart jobs: fresh when nothing is there; otherwise the
    newest complete checkpoint (an incomplete newer one is skipped). Rows logged after that checkpoint are
    dropped, so after any number of resumes metrics.jsonl has every step once; wandb continues the same run."""
    out = tmp_path / "run"
    flags = {"per_device_train_batch_size": 2, "save_steps": 2, "report_to": "wandb", "lr_scheduler_type": "constant"}
    env = {**ENV, "WANDB_MODE": "offline"}

    def train(steps):
        proc = subprocess.run(train_cmd("train.py", None) + common(tiny_llama, out, max_steps=steps,
                                                                  resume_from_checkpoint="auto", **flags),
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stdout

    assert "no complete checkpoint" in train(3)  # checkpoints 2 and 3; steps 1-3 logged
    (out / "checkpoint-3" / "manifest.json").unlink()  # as if killed before it was complete
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.0}\n{"step": 5, "lo')  # rows a killed run logged past its checkpoint
    assert f"resumed from {out / 'checkpoint-2'}" in train(5)
    assert f"resumed from {out / 'checkpoint-5'}" in train(6)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    runs = sorted(p.name for p in (out / "wandb").iterdir() if p.name.startswith("offline-run-"))
    assert len(runs) == 3 and len({r.rsplit("-", 1)[1] for r in runs}) == 1, runs  # one wandb run id, resumed
