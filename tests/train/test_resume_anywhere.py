"""Checkpoints resume on another world size and another backend, exactly (issue: resume anywhere).

A chain of runs passes one output directory along: each run resumes the previous run's newest checkpoint
(`--resume_from_checkpoint auto`), trains one more step on a different world size and/or backend, and
saves. Every step's loss must equal an uninterrupted single-process run's (fp32, rtol 1e-4), and so must
the final weights: nothing trained twice or skipped, optimizer moments and the schedule carried over.
The LR schedule is constant so each hop may set its own --max_steps; the schedule's continuation at
equal --max_steps is checked in test_train_e2e.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import common, losses, run
from safetensors.torch import load_file

RTOL = 1e-4
GLOBAL = {"gradient_accumulation_steps": 2, "lr_scheduler_type": "constant", "save_steps": 1000}


def _hop_flags(backend: str, nproc: int, zero3: str, sp: int = 1) -> dict:
    flags = {"per_device_train_batch_size": 2 * sp // nproc, **GLOBAL}  # global batch 4 on every hop
    if sp > 1:  # a group of `sp` ranks shares each row: data parallelism over nproc / sp groups
        flags["sequence_parallel_size"] = sp
    if nproc == 2:
        flags["async_save"] = True  # written by a background thread on its own process group; the exit waits for it
    if backend == "fsdp":
        flags["fsdp"] = "full_shard auto_wrap"
    elif backend == "zero2":
        flags["deepspeed"] = "ds_configs/zero2.json"
    elif backend == "zero3":
        flags["deepspeed"] = zero3  # every parameter partitioned, as at real sizes
    return flags


# the full chain also extends RoPE (--rope_scaling): every hop trains the scaled positions, and the export says so
MODE_FLAGS = {"full": {"rope_scaling": '{"rope_type": "yarn", "factor": 2}'},
              "lora": {"lora": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "learning_rate": 3e-3}}
# (backend, processes, sequence-parallel size) per hop. full: single → ZeRO-2 (1→2), ZeRO-2 → FSDP2 (2→1),
# FSDP2 → ZeRO-3 with SP=2 (1→2, one group of 2 ranks), ZeRO-3 SP=2 → FSDP2 without SP. lora: single → FSDP2 with
# SP=2 (1→2), FSDP2 SP=2 → single (2→1), single → ZeRO-3 (1→2). Every backend resumes another's checkpoint, and
# each chain ends on a sharded backend, so its final export (gathered one tensor at a time) is compared too:
# FSDP2's full model and ZeRO-3's adapter. Two-process hops save with --async_save.
CHAINS = {
    "full": [("single", 1, 1), ("zero2", 2, 1), ("fsdp", 1, 1), ("zero3", 2, 2), ("fsdp", 2, 1)],
    "lora": [("single", 1, 1), ("fsdp", 2, 2), ("single", 1, 1), ("zero3", 2, 1)],
}


def _final_weights(out, mode: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / ("model.safetensors" if mode == "full" else "adapter_model.safetensors")))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_a_chain_of_world_sizes_and_backends_equals_one_uninterrupted_run(mode, tiny_llama, zero3_all_partitioned,
                                                                          tmp_path):
    chain = CHAINS[mode]
    ref = tmp_path / "uninterrupted"
    run("train.py", common(tiny_llama, ref, max_steps=len(chain), save_dtype="fp32", save_strategy="no",
                           **_hop_flags("single", 1, ""), **MODE_FLAGS[mode]))
    out = tmp_path / "chain"
    for step, (backend, nproc, sp) in enumerate(chain, start=1):
        proc = run("train.py", common(tiny_llama, out, max_steps=step, save_dtype="fp32", resume_from_checkpoint="auto",
                                      **_hop_flags(backend, nproc, zero3_all_partitioned, sp), **MODE_FLAGS[mode]),
                   nproc=nproc if backend != "single" else None)
        if step > 1:
            assert f"resumed from {out / f'checkpoint-{step - 1}'}" in proc.stdout, proc.stdout[-2000:]
        state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
        assert (state["world_size"], state["backend"]) == (nproc, {"zero2": "deepspeed", "zero3": "deepspeed"}.get(backend, backend))
    want, got = losses(ref), losses(out)
    assert sorted(got) == list(range(1, len(chain) + 1))  # metrics.jsonl: each step exactly once
    for s in want:
        assert abs(want[s] - got[s]) <= RTOL * abs(want[s]), (mode, s, chain[s - 1], want[s], got[s])
    a, b = _final_weights(ref, mode), _final_weights(out, mode)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4)
    if mode == "full":
        rope = json.loads((out / "config.json").read_text())["rope_parameters"]
        assert rope["rope_type"] == "yarn" and rope["factor"] == 2


@pytest.mark.slow
def test_a_resume_that_cannot_be_honoured_is_one_line(tiny_llama, tokenizers, tmp_path, capfd):
    """Another global batch, another mode: one line naming what differs, before the model is built; another
    model (one more layer): one line naming a weight. The refused resumes run train.py's entry point in this
    process."""
    from helpers import make_tiny_llama

    from train.train import main

    deeper = make_tiny_llama(tmp_path / "deeper", tokenizers["smollm2"], layers=3)

    out = tmp_path / "run"
    run("train.py", common(tiny_llama, out, max_steps=1, **_hop_flags("single", 1, "")))
    cases = [(tiny_llama, {"per_device_train_batch_size": 1}, ["--per_device_train_batch_size", "4 in the checkpoint, 2 now"]),
             (tiny_llama, MODE_FLAGS["lora"], ["fine-tuning mode", "full in the checkpoint, lora now"]),
             (deeper, {}, ["written for a different model", "layers.2."])]
    capfd.readouterr()
    for model, over, expected in cases:
        code = main(common(model, out, max_steps=2, resume_from_checkpoint="True",
                           **{**_hop_flags("single", 1, ""), **over}))
        captured = capfd.readouterr()
        assert code == 1, captured.err[-2000:]
        (line,) = [x for x in captured.err.splitlines() if x.startswith("error:")]
        assert all(e in line for e in expected), line
        assert "Traceback" not in captured.err
        assert ("[model]" in captured.out) == (model == deeper), captured.out  # run facts are checked before loading
