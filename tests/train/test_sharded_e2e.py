"""Sharded backends against the single-process reference: same per-step losses, same exported model."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import DEMO, ENV, ROOT, common, free_port, losses, run
from safetensors.torch import load_file

STEPS = 5
# (name, script, nproc, extra flags). Tolerances: fp32 everywhere, so only reduction order differs.
BACKENDS = [
    ("ddp", "train.py", 2, {}),
    ("fsdp_full_shard", "train_mem.py", 2, {"fsdp": "full_shard auto_wrap", "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}),
    ("fsdp_offload", "train.py", 2, {"fsdp": "full_shard auto_wrap offload"}),
    ("fsdp_shard_grad_op", "train.py", 2, {"fsdp": "shard_grad_op auto_wrap"}),
    ("zero2", "train.py", 2, {"deepspeed": "ds_configs/zero2.json"}),
    ("zero2_offload", "train.py", 2, {"deepspeed": "ds_configs/zero2_offload.json"}),
    ("zero3", "train_mem.py", 2, {"deepspeed": "ds_configs/zero3.json"}),
    ("zero3_offload", "train.py", 2, {"deepspeed": "ds_configs/zero3_offload.json"}),
]
LOSS_RTOL = 2e-4
LOGIT_ATOL = 2e-4


def _flags(mode: str, nproc: int) -> dict:
    # global micro-batch 4 samples and GA 2 in every configuration
    flags = {"max_steps": STEPS, "per_device_train_batch_size": 4 // nproc, "gradient_accumulation_steps": 2,
             "save_steps": 100}
    if mode in ("lora", "qlora"):  # no dropout: its masks depend on the per-device batch shape
        flags.update(lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=3e-3, q_lora=mode == "qlora")
    return flags


@pytest.fixture(scope="module")
def reference(tiny_llama, tmp_path_factory):
    out = {}
    for mode in ("full", "lora", "qlora"):
        d = tmp_path_factory.mktemp(f"single-{mode}")
        run("train.py", common(tiny_llama, d, **_flags(mode, 1)))
        out[mode] = d
    return out


def _logits(out_dir, mode: str, base: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    if mode in ("lora", "qlora"):  # the base comes from the adapter's own config, as a user loads it
        from peft import AutoPeftModelForCausalLM

        assert json.loads((out_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == base
        model = AutoPeftModelForCausalLM.from_pretrained(out_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([[1, 200, 3000, 45, 9, 77, 12000]])).logits


# Full fine-tuning on every backend; LoRA where its save path differs (DDP's plain state, ZeRO-2's partitioned
# optimizer). Offload and shard_grad_op change how optimizer state and gradients are placed, which the full runs
# cover; their LoRA runs added minutes, not coverage. FSDP2 and ZeRO-3 (every parameter partitioned), full and LoRA,
# are compared with a single process step by step by the resume chains of test_resume_anywhere.py (which also
# compare FSDP2's full export and ZeRO-3's adapter export, and resume ZeRO-2); ZeRO-3's full export and both backends' adapters are
# compared in test_sharded_scale.py; train_mem.py under FSDP2 runs in the FastChat test below.
LORA_BACKENDS = ("ddp", "zero2")
COVERED_BY_RESUME_CHAINS = {("fsdp_full_shard", "full"), ("zero3", "full")}
# DDP runs through FastChat's other two entry points: train_mem.py (full) and train_lora.py (LoRA)
FASTCHAT_SCRIPT = {("ddp", "full"): "train_mem.py", ("ddp", "lora"): "train_lora.py"}
MATRIX = [(b[0], FASTCHAT_SCRIPT.get((b[0], mode), b[1]), *b[2:], mode)
          for mode in ("full", "lora") for b in BACKENDS
          if (b[0], mode) not in COVERED_BY_RESUME_CHAINS and (mode == "full" or b[0] in LORA_BACKENDS)]


@pytest.mark.slow
@pytest.mark.parametrize("name,script,nproc,extra,mode", MATRIX, ids=[f"{m[0]}-{m[4]}" for m in MATRIX])
def test_backend_matches_single_process(name, script, nproc, extra, mode, reference, tiny_llama, tmp_path):
    out = tmp_path / name
    run(script, common(tiny_llama, out, **_flags(mode, nproc), **extra), nproc=nproc)
    ref, got = losses(reference[mode]), losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert abs(ref[step] - got[step]) <= LOSS_RTOL * abs(ref[step]), (name, mode, step, ref[step], got[step])
    if mode != "full":  # the real trained adapter: equal to the single-process one, and not its zero init
        assert not (out / "model.safetensors").exists()
        saved = load_file(str(out / "adapter_model.safetensors"))
        expected = load_file(str(reference[mode] / "adapter_model.safetensors"))
        assert saved.keys() == expected.keys()
        for k in saved:
            torch.testing.assert_close(saved[k].float(), expected[k].float(), atol=1e-4, rtol=1e-3)
        assert all(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
        assert json.loads((out / "chattune.json").read_text())["mode"] == mode
    torch.testing.assert_close(_logits(out, mode, tiny_llama), _logits(reference[mode], mode, tiny_llama),
                               atol=LOGIT_ATOL * 50 if mode == "full" else LOGIT_ATOL, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("name,script,nproc,extra", [BACKENDS[1], BACKENDS[6]], ids=["fsdp_full_shard", "zero3"])
def test_qlora_backend_matches_single_process(name, script, nproc, extra, reference, tiny_llama, tmp_path,
                                              zero3_all_partitioned):
    """QLoRA (4-bit NF4 base) under FSDP2 (4-bit storage in the compute dtype, so FSDP can flatten it) and ZeRO-3
    with every adapter tensor partitioned (each rank loads the 4-bit base; the adapter is gathered collectively from
    the fp32 master copies). QLoRA under ZeRO-2 runs in the FastChat-command test below; DDP has no QLoRA-specific
    path."""
    if name == "zero3":
        extra = {"deepspeed": zero3_all_partitioned}
    test_backend_matches_single_process(name, script, nproc, extra, "qlora", reference, tiny_llama, tmp_path)


@pytest.mark.slow
def test_fastchat_vicuna_fsdp_command_runs_unchanged(tiny_llama, tmp_path):
    """FastChat's README/train_vicuna_7b.sh command with only model, data and sizes changed."""
    out = tmp_path / "vicuna"
    args = [
        "--model_name_or_path", tiny_llama, "--data_path", DEMO, "--bf16", "True", "--output_dir", str(out),
        "--num_train_epochs", "1", "--max_steps", "3", "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "2", "--gradient_accumulation_steps", "2", "--evaluation_strategy", "no",
        "--save_strategy", "steps", "--save_steps", "1200", "--save_total_limit", "10", "--learning_rate", "2e-5",
        "--weight_decay", "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1",
        "--fsdp", "full_shard auto_wrap", "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
        "--tf32", "True", "--model_max_length", "128", "--gradient_checkpointing", "True", "--lazy_preprocess", "True",
    ]
    run("train_mem.py", args, nproc=2)
    assert (out / "model.safetensors").is_file() and sorted(losses(out)) == [1, 2, 3]
    assert json.loads((out / "chattune.json").read_text())["template"] == "vicuna_v1.1"


@pytest.mark.slow
def test_fastchat_qlora_deepspeed_command_runs_unchanged(tiny_llama, tmp_path):
    """FastChat's documented `deepspeed train_lora.py ... --q_lora True --deepspeed <zero2>` command, through the
    deepspeed launcher, with only model, data and sizes changed."""
    import subprocess
    import sys

    out = tmp_path / "fastchat-qlora"
    args = [
        "--model_name_or_path", tiny_llama, "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.05",
        "--data_path", DEMO, "--bf16", "True", "--output_dir", str(out), "--num_train_epochs", "3", "--max_steps", "2",
        "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1", "--gradient_accumulation_steps", "1",
        "--evaluation_strategy", "no", "--save_strategy", "steps", "--save_steps", "1200", "--save_total_limit", "100",
        "--learning_rate", "2e-5", "--weight_decay", "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine",
        "--logging_steps", "1", "--tf32", "True", "--model_max_length", "128", "--q_lora", "True",
        "--deepspeed", "ds_configs/zero2.json",
    ]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / "train" / "train_lora.py")] + args
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(losses(out)) == [1, 2] and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "chattune.json").read_text())["mode"] == "qlora"
