"""Sharded training at real sizes (DESIGN.md §3 scale rules), on 2 CPU ranks with gloo:

- load once, shard early: FSDP2 builds on the meta device and only rank 0 reads weights; ZeRO-3
  partitions at construction; the sharded model gives the single-process logits (rotary buffers included);
- eval never hangs when ranks hold different numbers of eval batches, and equals the single-process loss;
- ZeRO-3 with every parameter partitioned (`stage3_param_persistence_threshold: 0`) saves a real adapter
  and a real fp32 full model;
- DeepSpeed reports the real gradient norm and skips / stops on a non-finite step like the other backends;
- LoRA checkpoints hold no frozen weights and resume exactly.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import DEMO, ENV, ROOT, common, free_port, losses, metric, run, train_cmd
from safetensors import safe_open
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

pytestmark = pytest.mark.slow

PROBE = ROOT / "tests" / "train" / "sharded_load_probe.py"
LORA = {"lora": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "learning_rate": 3e-3}
TIMEOUT = 300  # a hung collective fails the test instead of the suite


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory) -> str:
    """5 held-out conversations: with eval batch 2 on 2 ranks, rank 0 runs 2 batches and rank 1 runs 1."""
    path = tmp_path_factory.mktemp("eval") / "eval5.jsonl"
    path.write_text("".join(open(DEMO).readlines()[:5]))
    return str(path)


def _probe(tiny_llama, tmp_path, flags: list[str]) -> list[dict]:
    out = tmp_path / "probe.json"
    args = ["--model_name_or_path", tiny_llama, "--data_path", DEMO, "--output_dir", str(tmp_path / "o"), *flags]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", str(PROBE),
           str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads((tmp_path / f"probe.json.rank{r}").read_text()) for r in (0, 1)]


def _single_logits(tiny_llama) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    sys.path.insert(0, str(PROBE.parent))
    from sharded_load_probe import INPUT

    with torch.no_grad():
        logits = model(input_ids=torch.tensor(INPUT)).logits
    return logits, model.model.rotary_emb.inv_freq


@pytest.mark.parametrize("name,flags", [
    ("fsdp_full", ["--fsdp", "full_shard auto_wrap"]),
    ("fsdp_lora", ["--fsdp", "full_shard auto_wrap", "--lora", "True"]),
    ("zero3_lora", ["--deepspeed", "ZERO3", "--lora", "True"]),
])
def test_sharded_load_reads_weights_once_and_gives_single_process_logits(name, flags, tiny_llama, tmp_path,
                                                                          zero3_all_partitioned):
    flags = [zero3_all_partitioned if f == "ZERO3" else f for f in flags]
    ranks = _probe(tiny_llama, tmp_path, flags)
    expected, inv_freq = _single_logits(tiny_llama)  # LoRA starts with B = 0: the base model's logits
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["logits"]), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(r["inv_freq"]), inv_freq, atol=0, rtol=0)
    if name.startswith("fsdp"):  # rank 0 reads the checkpoint once; rank 1 never does
        assert [r["from_pretrained_calls"] for r in ranks] == [1, 0]
        # tied embeddings stay one weight; LoRA keeps the frozen root whole on every rank, full FT shards it
        assert all(r["tied"] for r in ranks)
        assert {r["embedding_type"] for r in ranks} == {"Parameter" if name == "fsdp_lora" else "DTensor"}
    else:  # ZeRO-3: from_pretrained on each rank builds under zero.Init, so every weight is partitioned at once
        assert all(r["partitioned"] > 0 for r in ranks)
        # then LoRA's frozen root leaves ZeRO: one whole tied tensor on every rank (a buffer, not a ZeRO parameter)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(tiny_llama)
        assert all(r["tied"] and r["embedding_type"] == "Tensor" for r in ranks)
        assert all(r["embedding_numel"] == config.vocab_size * config.hidden_size for r in ranks)


@pytest.fixture(scope="module")
def single_lora(tiny_llama, eval_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single-lora")
    run("train.py", common(tiny_llama, out, **LORA, max_steps=3, per_device_train_batch_size=4, save_steps=2,
                           eval_data_path=eval_data, evaluation_strategy="steps", eval_steps=1,
                           per_device_eval_batch_size=2))
    return out


def _trainable_names(base, adapter_dir) -> set[str]:
    """The parameter names a LoRA run trains (peft's `...lora_A.default.weight`), from its saved adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir,
                                      is_trainable=True)
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _peft_logits(base, adapter_dir) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir).eval()
    with torch.no_grad():
        return model(torch.tensor([[1, 200, 3000, 45, 9, 77, 12000]])).logits


@pytest.mark.parametrize("backend", ["fsdp", "zero3"])
def test_lora_sharded_eval_adapter_and_lean_resumable_checkpoint(backend, single_lora, tiny_llama, eval_data,
                                                                 zero3_all_partitioned, tmp_path):
    extra = {"fsdp": "full_shard auto_wrap"} if backend == "fsdp" else {"deepspeed": zero3_all_partitioned}
    flags = dict(**LORA, max_steps=3, per_device_train_batch_size=2, save_steps=2, eval_data_path=eval_data,
                 evaluation_strategy="steps", eval_steps=1, per_device_eval_batch_size=2, **extra)
    out = tmp_path / "run"
    run("train.py", common(tiny_llama, out, **flags), nproc=2, timeout=TIMEOUT)

    # eval: ranks ran 2 and 1 batches, no hang, and the loss is the single-process one
    got, ref = metric(out, "eval_loss"), metric(single_lora, "eval_loss")
    assert [s for s, _ in got] == [s for s, _ in ref] and len(got) >= 3
    for (_, a), (_, b) in zip(got, ref):
        assert abs(a - b) <= 1e-4 * abs(b), (a, b)
    for (_, a), (_, b) in zip(metric(out, "grad_norm"), metric(single_lora, "grad_norm")):
        assert abs(a - b) <= 1e-3 * abs(b), (a, b)  # the real global norm (DeepSpeed used to report 0.0)

    # the adapter: every tensor present and non-empty, lora_B trained, equal to the single-process adapter
    saved = load_file(str(out / "adapter_model.safetensors"))
    expected = load_file(str(single_lora / "adapter_model.safetensors"))
    assert saved.keys() == expected.keys() and all(v.numel() > 0 for v in saved.values())
    assert all(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    for k in saved:
        torch.testing.assert_close(saved[k], expected[k], atol=1e-4, rtol=1e-3)  # Adam amplifies reduction-order noise
    torch.testing.assert_close(_peft_logits(tiny_llama, out), _peft_logits(tiny_llama, single_lora), atol=2e-4, rtol=1e-3)

    # the checkpoint holds the adapter and its optimizer state, not the frozen base: checked by its keys (a
    # size bound cannot tell, the tiny model's decoder weights are ~2% of it beside the embedding)
    saved_keys = set(FileSystemReader(str(out / "checkpoint-2" / "dcp")).read_metadata().state_dict_metadata)
    trainable = _trainable_names(tiny_llama, out)
    model_keys = {k for k in saved_keys if k.startswith("model.")}
    assert trainable and all("lora_" in n for n in trainable), sorted(trainable)[:5]
    assert all("lora_" in k for k in model_keys), sorted(k for k in model_keys if "lora_" not in k)[:5]
    assert model_keys == {f"model.{n}" for n in trainable}, sorted(model_keys ^ {f"model.{n}" for n in trainable})[:5]
    optim_params = {k[len("optim."):].rsplit(".", 1)[0] for k in saved_keys if k.startswith("optim.")}
    assert optim_params == trainable, sorted(optim_params ^ trainable)[:5]
    assert saved_keys == model_keys | {k for k in saved_keys if k.startswith("optim.")}, sorted(saved_keys)[:5]
    model_bytes = (ROOT / tiny_llama / "model.safetensors").stat().st_size
    ckpt_bytes = sum(f.stat().st_size for f in (out / "checkpoint-2").rglob("*") if f.is_file())
    assert ckpt_bytes < 0.1 * model_bytes, (ckpt_bytes, model_bytes)

    # and resuming from it is exact (FSDP2's lean checkpoint is resumed by the LoRA resume chain of
    # test_resume_anywhere.py; ZeRO-3's is resumed only here)
    if backend == "fsdp":
        return
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    run("train.py", common(tiny_llama, resumed, **flags, resume_from_checkpoint=True), nproc=2, timeout=TIMEOUT)
    assert abs(losses(resumed)[3] - losses(out)[3]) <= 1e-6 * abs(losses(out)[3])


def test_zero3_full_save_gathers_partitioned_weights_in_the_asked_dtype(tiny_llama, zero3_all_partitioned, tmp_path):
    flags = dict(max_steps=2, save_strategy="no", save_dtype="fp32")
    single, sharded = tmp_path / "single", tmp_path / "zero3"
    run("train.py", common(tiny_llama, single, per_device_train_batch_size=4, **flags))
    run("train.py", common(tiny_llama, sharded, per_device_train_batch_size=2, deepspeed=zero3_all_partitioned, **flags),
        nproc=2, timeout=TIMEOUT)
    with safe_open(str(sharded / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert dtypes == {"F32"} and all(0 not in s for s in shapes.values())
    a, b = load_file(str(single / "model.safetensors")), load_file(str(sharded / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3)


NAN_WRAPPER = """
import os, sys
sys.path[0] = {root!r}
import train.loop as loop
real, calls = loop.token_loss_sum, [0]
def poisoned(model, batch, device, bf16):
    out = real(model, batch, device, bf16)
    if model.training and os.environ.get("RANK", "0") == "0":
        calls[0] += 1
        if calls[0] == {at}:
            return out * float("nan")
    return out
loop.token_loss_sum = poisoned
from train.fast_exit import exit_fast
from train.train import main
exit_fast(main())
"""


def _run_with_nan(tmp_path, args: list[str], nproc: int | None, at: int = 2):
    wrapper = tmp_path / "nan_at_step.py"
    wrapper.write_text(NAN_WRAPPER.format(root=str(ROOT), at=at))
    cmd = train_cmd("train.py", nproc)
    cmd[-1] = str(wrapper)
    return subprocess.run(cmd + args, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=TIMEOUT)


def test_deepspeed_non_finite_step_is_skipped_then_stops_like_single_process(tiny_llama, tmp_path):
    flags = dict(max_steps=3, save_strategy="no")
    single = tmp_path / "single"
    proc = _run_with_nan(tmp_path, common(tiny_llama, single, per_device_train_batch_size=4, max_nonfinite_skips=1,
                                          **flags), None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    zero2 = tmp_path / "zero2"
    proc = _run_with_nan(tmp_path, common(tiny_llama, zero2, per_device_train_batch_size=2, max_nonfinite_skips=1,
                                          deepspeed="ds_configs/zero2.json", **flags), 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "non-finite loss (loss=nan" in proc.stdout and "skipped (1/1)" in proc.stdout
    a, b = losses(single), losses(zero2)
    assert sorted(b) == [1, 2, 3]  # the skipped step does not count; the one after it trains on new data
    for step in a:
        assert abs(a[step] - b[step]) <= 2e-4 * abs(a[step]), (step, a[step], b[step])
    for (_, x), (_, y) in zip(metric(single, "grad_norm"), metric(zero2, "grad_norm")):
        assert abs(x - y) <= 1e-3 * x and y > 0

    stopped = _run_with_nan(tmp_path, common(tiny_llama, tmp_path / "stop", per_device_train_batch_size=2,
                                             deepspeed="ds_configs/zero2.json", **flags), 2)
    assert stopped.returncode != 0
    assert "non-finite loss at step 2" in stopped.stderr and "no weights were changed" in stopped.stderr
    assert sorted(losses(tmp_path / "stop")) == [1]
