"""Sequence parallelism (train/sequence_parallel.py + train/attention.py's Ulysses exchange) on real gloo ranks:
SP=2 on 2 ranks and SP=2 × DP=2 on 4 ranks give the per-step losses and gradients of one process on the same
rows (fp32, rtol 1e-4), packed and padded, full and LoRA, with gradient checkpointing, GQA and KV heads that do
not divide; and train.py with SP under FSDP2 trains, evaluates and saves like one process (ZeRO-3 with SP, and
resuming across SP degrees: test_resume_anywhere.py)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from helpers import DEMO, common, losses, metric, run, run_gloo_ranks

from train.attention import register, set_sequence_parallel_group
from train.collate import collate_packed, collate_padded, num_supervised
from train.loop import token_loss_sum
from train.sequence_parallel import SequenceParallel, check_heads, init_sequence_parallel, shard_batch

STEPS = 2
LR = 0.5
# (name, kv heads, LoRA, gradient checkpointing, packed); 1 KV head takes the KV-repeat path
CASES = [("full-packed-gc-kv1", 1, False, True, True), ("lora-packed", 2, True, False, True),
         ("full-padded", 2, False, False, False)]


def _model(kv_heads: int, lora: bool, gc: bool):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, max_position_embeddings=512)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=register())
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        from helpers import randomize_lora_b
        from peft import LoraConfig, get_peft_model

        if gc:
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
        randomize_lora_b(model, 1, 0.05)
    return model.train()


def _micro_batches(step: int, group: int) -> list[list[dict]]:
    """Group `group`'s micro-batch at `step`: samples of random lengths (so rows are not multiples of 2)."""
    g = torch.Generator().manual_seed(1000 * step + group)
    samples = []
    for _ in range(3):
        n = int(torch.randint(7, 41, (1,), generator=g))
        ids = torch.randint(1, 256, (n,), generator=g).tolist()
        cut = int(torch.randint(1, n - 2, (1,), generator=g))
        samples.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return samples


def _collate(samples, packed: bool, multiple: int):
    if packed:
        return collate_packed([samples[:2], samples[2:]], pad_id=0, varlen=True, multiple=multiple)
    return collate_padded(samples, pad_id=0, multiple=multiple)


def _train(model, batches_per_step, sp: SequenceParallel, world: int):
    """STEPS optimizer steps of plain SGD: the token-normalized loss of docs/design.md §3, gradients summed over
    ranks (what every backend's reduction × loss_scale computes). Returns per-step loss and gradients."""
    out = []
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for batches in batches_per_step:
        local = [shard_batch(b, sp) for b in batches]
        n_sup = torch.tensor(float(sum(num_supervised(b) for b in local)))
        loss_sum = torch.zeros((), dtype=torch.float64)
        for b in local:
            part = token_loss_sum(model, b, torch.device("cpu"), None)
            (part / n_sup.clamp(min=1) if world == 1 else part).backward()
            loss_sum += part.detach().double()
        if world > 1:
            dist.all_reduce(n_sup)
            dist.all_reduce(loss_sum)
            for _, p in params:
                dist.all_reduce(p.grad)
                p.grad /= n_sup
        out.append({"loss": float(loss_sum / n_sup), "grads": {n: p.grad.clone() for n, p in params}})
        with torch.no_grad():
            for _, p in params:
                p -= LR * p.grad
                p.grad = None
    return out


def _spawned(rank: int, port: int, results, world: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from train.distributed import DistInfo

        sp = init_sequence_parallel(DistInfo(rank, world, rank, torch.device("cpu")), 2)
        got = {"deepspeed": _matches_deepspeed_ulysses(sp.group)} if world == 2 else {}
        for name, kv, lora, gc, packed in CASES if world == 2 else CASES[1:2]:
            model = _model(kv, lora, gc)
            steps = [[_collate(_micro_batches(s, sp.dp_rank), packed, sp.size)] for s in range(STEPS)]
            got[name] = _train(model, steps, sp, world)
        results[rank] = got
    finally:
        dist.destroy_process_group()


def _matches_deepspeed_ulysses(group) -> bool:
    """Our exchange against DeepSpeed-Ulysses' own (`deepspeed.sequence.layer._SeqAllToAll`, its [batch, seq,
    heads, dim] layout): the same forward for both directions, and the same gradient back."""
    from deepspeed.sequence.layer import _SeqAllToAll

    from train.deepspeed_backend import init_deepspeed_distributed

    init_deepspeed_distributed(dist_backend="gloo")  # DeepSpeed's comm layer over the process group already made

    from train.attention import all_to_all

    torch.manual_seed(dist.get_rank())
    x = torch.randn(2, 8, 6, 4, requires_grad=True)  # (batch, heads, local seq, dim)
    ours = all_to_all(x, 1, 2, group)  # → (batch, heads/2, seq, dim)
    theirs = _SeqAllToAll.apply(group, x.transpose(1, 2), 2, 1, 0).transpose(1, 2)
    back_ours = all_to_all(ours, 2, 1, group)
    back_theirs = _SeqAllToAll.apply(group, theirs.transpose(1, 2), 1, 2, 0).transpose(1, 2)
    weight = torch.randn_like(ours)
    g_ours, = torch.autograd.grad((ours * weight).sum(), x)
    g_theirs, = torch.autograd.grad((theirs * weight).sum(), x)
    return (ours.shape == (2, 4, 12, 4) and torch.equal(ours, theirs) and torch.equal(back_ours, x)
            and torch.equal(back_theirs, x) and torch.equal(g_ours, g_theirs))


def _spawned2(rank, port, results):
    _spawned(rank, port, results, 2)


def _spawned4(rank, port, results):
    _spawned(rank, port, results, 4)


def _reference(name: str, groups: int):
    kv, lora, gc, packed = next(c[1:] for c in CASES if c[0] == name)
    set_sequence_parallel_group(None)
    model = _model(kv, lora, gc)
    steps = [[_collate(_micro_batches(s, g), packed, 1) for g in range(groups)] for s in range(STEPS)]
    return _train(model, steps, SequenceParallel(), 1)


def _assert_same(got, ref, what):
    for step, (g, r) in enumerate(zip(got, ref)):
        assert abs(g["loss"] - r["loss"]) <= 1e-4 * abs(r["loss"]), (what, step, g["loss"], r["loss"])
        assert g["grads"].keys() == r["grads"].keys()
        for n in r["grads"]:
            assert r["grads"][n].abs().sum() > 0, (what, n)  # a gradient that reaches every trained tensor
            torch.testing.assert_close(g["grads"][n], r["grads"][n], rtol=1e-4, atol=1e-7, msg=f"{what} step {step} {n}")


@pytest.mark.slow
def test_sp2_on_two_ranks_equals_one_process():
    results = run_gloo_ranks(_spawned2, nprocs=2)
    assert results[0]["deepspeed"] and results[1]["deepspeed"]  # the exchange is DeepSpeed-Ulysses' exchange
    for name, *_ in CASES:
        ref = _reference(name, 1)
        for rank in (0, 1):
            _assert_same(results[rank][name], ref, f"{name} rank {rank}")


@pytest.mark.slow
def test_sp2_times_dp2_on_four_ranks_equals_one_process():
    results = run_gloo_ranks(_spawned4, nprocs=4)
    ref = _reference("lora-packed", 2)
    for rank in range(4):
        _assert_same(results[rank]["lora-packed"], ref, f"lora-packed rank {rank}")


def test_shard_batch_keeps_shifted_labels_global_positions_and_counts_each_token_once():
    samples = _micro_batches(0, 0)
    total = sum(len(s["input_ids"]) for s in samples)
    full = collate_packed([samples], pad_id=0, varlen=True, multiple=2)
    halves = [shard_batch(full, SequenceParallel(2, r, 0, 1)) for r in (0, 1)]
    per = full["input_ids"].shape[1] // 2
    for r, half in enumerate(halves):
        assert half["input_ids"].shape == (1, per)
        for key in ("input_ids", "labels", "position_ids"):
            assert torch.equal(half[key][0], full[key][0, r * per:(r + 1) * per])
        assert torch.equal(half["cu_seq_lens_q"], full["cu_seq_lens_q"])  # attention sees the whole row's samples
    # the label at rank 0's last position is rank 1's first token: shifted before the split
    first = len(samples[0]["input_ids"])
    if first > per:
        assert int(halves[0]["labels"][0, -1]) in (-100, int(halves[1]["input_ids"][0, 0]))
    assert sum(int(h["num_tokens"]) for h in halves) == total
    padded = collate_padded(samples, pad_id=0, multiple=2)
    parts = [shard_batch(padded, SequenceParallel(2, r, 0, 1)) for r in (0, 1)]
    assert sum(int(p["num_tokens"]) for p in parts) == total and "attention_mask" not in parts[0]
    with pytest.raises(ValueError, match="a row of 5 tokens does not split over --sequence_parallel_size 2"):
        shard_batch({"input_ids": torch.zeros(1, 5, dtype=torch.long)}, SequenceParallel(2, 0, 0, 1))


def test_heads_that_do_not_divide_are_refused_in_one_line():
    from transformers import LlamaConfig

    smollm2_like = LlamaConfig(num_attention_heads=9, num_key_value_heads=3, hidden_size=576)
    with pytest.raises(ValueError, match=r"--sequence_parallel_size 2: the model has 9 attention heads \(3 KV heads\)"):
        check_heads(smollm2_like, 2)
    check_heads(smollm2_like, 3)


# --- train.py end to end: FSDP2 and ZeRO-3 under SP, with eval and the final save ---------------------------
LORA = {"lora": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "learning_rate": 3e-3}


def _flags(**over):
    return {"max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "packing": True,
            "model_max_length": 128, "save_steps": 100, "eval_data_path": f"{DEMO}:count=16",
            "evaluation_strategy": "steps", "eval_steps": 2, **over}


@pytest.mark.slow
def test_train_py_with_sp2_matches_one_process(tiny_llama, tmp_path):
    """FSDP2 LoRA on packed rows with eval and the final save, SP=2 against one process. The single process tiles
    its MLPs (the SP run does not: equal losses show tiling is exact in training) and asks for activation
    offloading (a no-op on CPU that says so). ZeRO-3 with SP, full fine-tuning and resuming across SP degrees
    are in the resume chains of test_resume_anywhere.py."""
    ref = tmp_path / "single"
    proc = run("train.py", common(tiny_llama, ref, **_flags(**LORA, tiled_mlp=True, activation_offloading=True)))
    assert "--tiled_mlp: 2 MLPs run over tiles of 64 positions" in proc.stdout
    assert "--activation_offloading: activations already live in host memory on CPU" in proc.stdout
    out = tmp_path / "sp2"
    proc = run("train.py", common(tiny_llama, out, **_flags(**LORA, sequence_parallel_size=2, gradient_checkpointing=True,
                                                            fsdp="full_shard auto_wrap")), nproc=2)
    assert "sequence parallel: 1 group(s) of 2 ranks" in proc.stdout + proc.stderr
    want, got = losses(ref), losses(out)
    assert sorted(got) == [1, 2]
    for step in want:
        assert abs(want[step] - got[step]) <= 2e-4 * abs(want[step]), (step, want[step], got[step])
    (want_eval,), (got_eval,) = metric(ref, "eval_loss")[-1:], metric(out, "eval_loss")[-1:]
    assert abs(want_eval[1] - got_eval[1]) <= 2e-4 * want_eval[1]
    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter_model.safetensors"))
    expected = load_file(str(ref / "adapter_model.safetensors"))
    assert saved.keys() == expected.keys()
    for k in saved:
        torch.testing.assert_close(saved[k], expected[k], atol=2e-5, rtol=1e-3)
