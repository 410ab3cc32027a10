"""End to end through the real entry points (python and torchrun with gloo) on a tiny random Llama. Every backend
(DDP through train_mem.py and train_lora.py included) against one process: test_sharded_e2e.py."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import pytest
import torch
from helpers import DEMO, ENV, ROOT, common, losses, run, train_cmd
from safetensors.torch import load_file


@pytest.mark.slow
def test_resume_continues_with_identical_losses(tiny_llama, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run("train.py", common(tiny_llama, straight, max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                           packing=True))
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    shutil.copytree(straight / "checkpoint-3", resumed / ".tmp-checkpoint-6")  # a partial save is never resumed
    (resumed / ".tmp-checkpoint-6" / "scheduler.pt").write_bytes(b"garbage")
    run("train.py", common(tiny_llama, resumed, max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                           packing=True, resume_from_checkpoint=True))
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == [4, 5, 6]
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]  # bit-identical on CPU
    wa, wb = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_finishes(tiny_llama, tmp_path):
    out = tmp_path / "sig"
    args = common(tiny_llama, out, max_steps=400, per_device_train_batch_size=2, save_strategy="no")
    proc = subprocess.Popen(train_cmd("train.py", None) + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, cwd=ROOT)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stdout[-2000:] + stderr[-3000:]
    assert "received SIGTERM" in stdout and "--resume_from_checkpoint True" in stdout
    (ckpt,) = [p for p in out.iterdir() if p.name.startswith("checkpoint-")]
    done = int(ckpt.name.split("-")[1])
    assert done == max(losses(out))  # the step in progress finished, and that is what was saved
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == done
    run("train.py", common(tiny_llama, out, max_steps=done + 2, per_device_train_batch_size=2, save_strategy="no",
                           resume_from_checkpoint=True))
    assert max(losses(out)) == done + 2 and (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_full_finetune_export_reloads_and_learns(tiny_llama, tmp_path):
    out = tmp_path / "full"
    run("train_mem.py", common(tiny_llama, out, max_steps=12, per_device_train_batch_size=4, bf16=True,
                               eval_data_path=DEMO, evaluation_strategy="steps", eval_steps=6, gradient_checkpointing=True),
        nproc=2)
    ls = losses(out)
    assert ls[12] < ls[1] - 0.5
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    assert len(evals) >= 2 and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert {v.dtype for v in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(out)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    record = json.loads((out / "chattune.json").read_text())
    assert record["template"] == "chatml" and record["mode"] == "full" and record["flags"]["bf16"] == "true"
    from train.precision import resolve_precision

    assert record["precision"] == resolve_precision("true", False, torch.device("cpu")).name  # what it computed in
    assert json.loads((out / "data_report.json").read_text())["kept"] == 257


@pytest.mark.slow
def test_nonfinite_loss_stops_before_the_update(tiny_llama, tmp_path):
    out = tmp_path / "nan"
    proc = run("train.py", common(tiny_llama, out, max_steps=6, per_device_train_batch_size=2, optim="sgd",
                                  learning_rate=1e12, max_grad_norm=0, save_steps=1), check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "non-finite" in proc.stderr and "stopped before the optimizer update" in proc.stderr
    ckpts = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert ckpts and f"Last checkpoint: {out / ckpts[-1]}" in proc.stderr


@pytest.mark.slow
def test_trackers_retention_and_skipped_nonfinite_steps(tiny_llama, tmp_path):
    out = tmp_path / "track"
    env = {**ENV, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run(train_cmd("train.py", None) + common(
        tiny_llama, out, max_steps=4, per_device_train_batch_size=2, save_steps=1, save_total_limit=2, report_to="all"),
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-3", "checkpoint-4"]
    assert list((out / "runs").glob("events.out.tfevents.*"))  # tensorboard
    assert list((out / "wandb").glob("offline-run-*"))  # wandb, offline
    nan = tmp_path / "skip"
    proc = run("train.py", common(tiny_llama, nan, max_steps=8, per_device_train_batch_size=2, optim="sgd",
                                  learning_rate=1e12, max_grad_norm=0, max_nonfinite_skips=2, save_strategy="no"),
               check=False)
    assert proc.returncode == 1
    assert "skipped (1/2)" in proc.stdout and "skipped (2/2)" in proc.stdout and "non-finite" in proc.stderr
