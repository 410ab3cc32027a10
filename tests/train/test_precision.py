"""Precision follows the hardware: bf16 only where it is native, fp32 on CPUs that emulate it, fp16 with loss
scaling for GPUs without bf16 (train/precision.py)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import common, losses, run

from train.config import ConfigError, parse_args
from train.precision import PrecisionError, resolve_precision

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)
AVX2_EPYC = frozenset({"avx", "avx2", "fma", "sse4_2"})
SAPPHIRE_RAPIDS = AVX2_EPYC | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


@pytest.mark.parametrize("bf16,fp16,device,flags,cuda_bf16,expected", [
    ("true", False, CPU, SAPPHIRE_RAPIDS, None, "bf16"),
    ("true", False, CPU, frozenset({"avx512_bf16"}), None, "bf16"),
    ("true", False, CPU, AVX2_EPYC, None, "fp32"),      # emulated bf16 is 10-20x slower: fp32, with a note
    ("force", False, CPU, AVX2_EPYC, None, "bf16"),
    ("false", False, CPU, SAPPHIRE_RAPIDS, None, "fp32"),
    ("false", True, CPU, AVX2_EPYC, None, "fp16"),
    ("true", False, CUDA, frozenset(), True, "bf16"),    # A100/H100
    ("false", True, CUDA, frozenset(), False, "fp16"),   # T4
])
def test_selection(bf16, fp16, device, flags, cuda_bf16, expected):
    chosen = resolve_precision(bf16, fp16, device, flags=flags, cuda_bf16=cuda_bf16, env={})
    assert chosen.name == expected
    assert chosen.loss_scaling == (expected == "fp16")
    assert chosen.autocast_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[expected]
    fell_back = bf16 == "true" and expected == "fp32"
    assert ("no native bf16" in chosen.note) == fell_back and (chosen.note.count("\n") == 0)


@pytest.mark.parametrize("env,expected", [
    ({}, "bf16"),
    ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, "fp32"),
    ({"ONEDNN_MAX_CPU_ISA": "avx512_core"}, "fp32"),       # AVX-512 without its BF16 extension
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, "bf16"),
    ({"ATEN_CPU_CAPABILITY": "avx2"}, "fp32"),
    ({"ATEN_CPU_CAPABILITY": "avx512"}, "bf16"),
])
def test_isa_caps_count_as_no_native_bf16(env, expected):
    """A fast CPU capped to AVX2 (how users, and our timing runs, emulate the slow kind) emulates bf16 too."""
    chosen = resolve_precision("true", False, CPU, flags=SAPPHIRE_RAPIDS, env=env)
    assert chosen.name == expected
    assert (expected == "fp32") == any(f"{k}=" in chosen.note for k in env)


def test_gpu_without_bf16_points_to_fp16():
    with pytest.raises(PrecisionError, match=r"--bf16 True: this GPU has no bf16 support; use --fp16 True"):
        resolve_precision("true", False, CUDA, cuda_bf16=False)


def test_flags():
    base = ["--model_name_or_path", "m", "--data_path", "d", "--output_dir", "o"]
    assert parse_args(base + ["--bf16", "force"]).bf16 == "force"
    assert parse_args(base + ["--bf16", "True"]).bf16 == "true" and parse_args(base).bf16 == "false"
    assert parse_args(base + ["--fp16", "True", "--q_lora", "True"]).fp16
    with pytest.raises(ConfigError, match="--fp16 and --bf16 are alternatives"):
        parse_args(base + ["--fp16", "True", "--bf16", "True"])


@pytest.mark.slow
@pytest.mark.parametrize("mode,nproc", [("full", 2), ("lora", None), ("qlora", None)],
                         ids=["full-fsdp2", "lora", "qlora"])
def test_fp16_training_on_cpu_learns_and_saves(mode, nproc, tiny_llama, tmp_path):
    """fp16 autocast + dynamic loss scaling end to end (FSDP2 through ShardedGradScaler, which agrees on
    overflows across ranks): losses finite and falling, the loss scale checkpointed, a loadable output."""
    out = tmp_path / mode
    extra = {"full": {"learning_rate": 1e-3, "fsdp": "full_shard auto_wrap"},
             "lora": {"lora": True, "lora_dropout": 0.0, "learning_rate": 3e-3},
             "qlora": {"q_lora": True, "lora_dropout": 0.0, "learning_rate": 3e-3}}[mode]
    run("train.py", common(tiny_llama, out, fp16=True, max_steps=10, per_device_train_batch_size=4 // (nproc or 1),
                           save_steps=5, **extra), nproc=nproc)
    ls = losses(out)
    assert len(ls) == 10 and all(v == v and abs(v) < 1e4 for v in ls.values())
    assert ls[10] < ls[1]
    state = json.loads((out / "checkpoint-10" / "trainer_state.json").read_text())
    assert state["grad_scaler"]["scale"] > 0  # the loss scale is checkpointed (exact resume)
    record = json.loads((out / "chattune.json").read_text())
    assert record["precision"] == "fp16"
    assert (out / ("model.safetensors" if mode == "full" else "adapter_model.safetensors")).is_file()


def test_deepspeed_fp16_on_cpu_is_refused_in_one_line():
    from train.backend_select import make_backend
    from train.distributed import DistInfo
    from train.precision import Precision

    cfg = parse_args(["--model_name_or_path", "m", "--data_path", "d", "--output_dir", "o", "--fp16", "True",
                      "--deepspeed", "ds_configs/zero2.json"])
    with pytest.raises(PrecisionError, match="--fp16 with --deepspeed needs a GPU"):
        make_backend(DistInfo(0, 1, 0, CPU), cfg, Precision("fp16"), 64)
