"""What only a GPU can show: flash-attn packing, bf16 and fp16 training, real tokens/s and MFU.

    python scripts/check_gpu.py                       # on a CUDA machine: every check, then the figures
    python scripts/check_gpu.py --device cpu --attn sdpa --steps 3   # the same code paths on CPU, fp32 (smoke test)

Self-contained: a random Llama built from a config and random token ids (a GPU box may have neither our
assets nor a network). Checks, each printed as PASS/FAIL (exit 1 if any fails):
1. packing: per-sample loss sums of a packed micro-batch (several rows; with chattune's per-sample attention
   or flash-attn 2 flattened into one row with cu_seq_lens, train/collate.py) equal each sample run alone;
2. bf16 and fp16 (autocast + GradScaler) training: finite losses that fall on a repeated batch;
3. throughput: fwd+bwd tokens/s on packed rows and MFU = 6·N·tokens/s / the measured matmul peak of the dtype;
4. memory plan: two training steps of a full fine-tune (chattune's own model setup, optimizer and loss) on a
   `--seq`-token row, whose peak (torch.cuda.max_memory_allocated; on CPU the process's VmHWM) must be within
   15% of what the memory planner (train/plan.py) predicted for the same flags;
5. sequence parallelism (`--sp 2`, default on a machine with ≥ 2 GPUs; on CPU over gloo): the loss and
   gradients of one packed row split over 2 ranks (Ulysses, train/attention.py) equal one process's (fp32), and
   fwd+bwd tokens/s of one `--seq × --batch`-token row at SP=2 against one device.
Attention implementations: `chattune` (what `--packing` trains: flash-attn varlen in 16 bits where installed,
FlexAttention otherwise on CUDA, SDPA per sample on CPU), then flash_attention_2 / sdpa as transformers runs them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

from train.attention import NAME as CHATTUNE_ATTENTION
from train.attention import register
from train.collate import collate_packed, model_inputs

VARLEN = ("flash_attention_2", CHATTUNE_ATTENTION)  # implementations that take one flattened row with cu_seq_lens


def make_model(args, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=8192)
    model = LlamaForCausalLM(cfg).to(args.device)  # fp32 master weights, autocast computes in 16 bits
    model.config._attn_implementation = attn
    return model, cfg


def samples(n: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(16, 200, (1,), generator=g))
        ids = torch.randint(3, vocab, (k,), generator=g).tolist()
        prompt = int(torch.randint(1, k - 4, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def per_token_loss(model, batch: dict, device: str, dtype) -> torch.Tensor:
    inputs = model_inputs(batch, device)
    with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(**inputs, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].to(device).flatten(), ignore_index=-100,
                           reduction="none").view(batch["labels"].shape)


def check_packing(args, attn: str, dtype, name: str) -> bool:
    model, _ = make_model(args, attn)
    model.eval()
    data = samples(6, args.vocab)
    rows = [data[0:2], data[2:3], data[3:6]]  # a micro-batch of 3 packed rows
    mask_dtype = dtype or torch.float32
    varlen = attn in VARLEN
    with torch.no_grad():
        packed = collate_packed(rows, pad_id=0, mask_dtype=mask_dtype, varlen=varlen)
        losses = per_token_loss(model, packed, args.device, dtype)
        got = []
        if varlen:  # one row: samples back to back
            flat, pos = losses[0], 0
            for s in data:
                got.append(float(flat[pos:pos + len(s["input_ids"])].sum()))
                pos += len(s["input_ids"])
        else:
            for r, row in enumerate(rows):
                pos = 0
                for s in row:
                    got.append(float(losses[r, pos:pos + len(s["input_ids"])].sum()))
                    pos += len(s["input_ids"])
        alone = [float(per_token_loss(model, collate_packed([[s]], 0, mask_dtype, varlen), args.device, dtype).sum())
                 for s in data]
    rtol = 1e-4 if dtype is None else 3e-2
    worst = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(got, alone))
    ok = worst <= rtol
    print(f"{'PASS' if ok else 'FAIL'} packing ({attn}, {name}): per-sample loss sums packed vs alone, worst relative "
          f"difference {worst:.2e} (≤ {rtol:g})", flush=True)
    return ok


def check_training(args, attn: str, dtype, name: str) -> bool:
    model, _ = make_model(args, attn)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(args.device) if dtype == torch.float16 else None
    batch = collate_packed([samples(4, args.vocab, seed=1)], 0, dtype or torch.float32, attn in VARLEN)
    history = []
    for _ in range(args.steps):
        loss = per_token_loss(model, batch, args.device, dtype).sum() / (batch["labels"] != -100).sum().to(args.device)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        history.append(float(loss.detach()))
    ok = all(v == v and abs(v) < 1e4 for v in history) and history[-1] < history[0]
    print(f"{'PASS' if ok else 'FAIL'} training ({attn}, {name}{', GradScaler' if scaler else ''}): loss "
          f"{history[0]:.3f} → {history[-1]:.3f} in {args.steps} steps", flush=True)
    return ok


def matmul_peak(device: str, dtype, n: int = 4096, reps: int = 20) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _fwd_bwd_seconds(model, batch, device: str, steps: int, dtype=None, warmup: int = 1) -> float:
    """Seconds per forward + backward of `batch`, after `warmup` untimed ones."""
    for k in range(steps + warmup):
        if k == warmup:
            _sync(device)
            t = time.perf_counter()
        per_token_loss(model, batch, device, dtype).sum().backward()
        model.zero_grad(set_to_none=True)
    _sync(device)
    return (time.perf_counter() - t) / steps


def throughput(args, attn: str, dtype, name: str) -> None:
    model, _ = make_model(args, attn)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    rows = [[{"input_ids": list(range(3, 3 + args.seq)), "labels": list(range(3, 3 + args.seq))}]
            for _ in range(args.batch)]
    batch = collate_packed(rows, 0, dtype or torch.float32, attn in VARLEN)
    tok_s = int(batch["num_tokens"]) / _fwd_bwd_seconds(model, batch, args.device, args.steps, dtype, warmup=2)
    peak = matmul_peak(args.device, dtype or torch.float32, n=4096 if args.device == "cuda" else 1024)
    mfu = 6 * n_params * tok_s / peak
    print(f"     throughput ({attn}, {name}): {n_params / 1e6:.0f}M parameters, {tok_s:,.0f} tokens/s fwd+bwd, "
          f"matmul peak {peak / 1e9:,.0f} GFLOP/s, MFU {mfu:.1%}", flush=True)




def _sp_worker(rank: int, args, port: int, results) -> None:
    import torch.distributed as dist

    from train.distributed import DistInfo
    from train.loop import token_loss_sum
    from train.sequence_parallel import init_sequence_parallel, shard_batch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = f"cuda:{rank}" if args.device == "cuda" else "cpu"
    if args.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=rank, world_size=args.sp)
    try:
        sp = init_sequence_parallel(DistInfo(rank, args.sp, rank, torch.device(device)), args.sp)
        model, _ = make_model(argparse.Namespace(**{**vars(args), "device": device}), register())
        model.train()
        batch = shard_batch(collate_packed([samples(6, args.vocab, seed=2)], 0, varlen=True, multiple=args.sp), sp)
        loss = token_loss_sum(model, batch, torch.device(device), None)
        loss.backward()
        total = loss.detach().double()
        dist.all_reduce(total)
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        for g in grads.values():
            dist.all_reduce(g)
        model.zero_grad(set_to_none=True)
        long_row = [[{"input_ids": list(range(3, 3 + args.seq * args.batch)),
                      "labels": list(range(3, 3 + args.seq * args.batch))}]]
        seconds = _fwd_bwd_seconds(model, shard_batch(collate_packed(long_row, 0, varlen=True, multiple=args.sp), sp),
                                   device, max(1, args.steps // 2))
        results[rank] = {"loss": float(total), "grads": {n: g.cpu() for n, g in grads.items()}, "seconds": seconds}
    finally:
        dist.destroy_process_group()


def check_sequence_parallel(args) -> bool:
    """SP=args.sp over that many processes against one process: the same loss and gradients (fp32), and tokens/s."""
    import torch.multiprocessing as mp

    from train.attention import set_sequence_parallel_group
    from train.loop import token_loss_sum

    with mp.Manager() as manager:
        results = manager.dict()
        port = 29500 + os.getpid() % 1000
        mp.spawn(_sp_worker, args=(args, port, results), nprocs=args.sp, join=True)
        got = results[0]
    set_sequence_parallel_group(None)
    model, _ = make_model(args, register())
    model.train()
    batch = collate_packed([samples(6, args.vocab, seed=2)], 0, varlen=True)
    loss = token_loss_sum(model, batch, torch.device(args.device), None)
    loss.backward()
    rel_loss = abs(got["loss"] - float(loss.detach())) / abs(float(loss.detach()))
    worst = max(float((got["grads"][n] - p.grad.cpu()).abs().max() / p.grad.abs().max().clamp(min=1e-12).cpu())
                for n, p in model.named_parameters())
    model.zero_grad(set_to_none=True)
    tokens = args.seq * args.batch
    long_row = collate_packed([[{"input_ids": list(range(3, 3 + tokens)), "labels": list(range(3, 3 + tokens))}]], 0,
                              varlen=True)
    one = _fwd_bwd_seconds(model, long_row, args.device, max(1, args.steps // 2))
    ok = rel_loss <= 1e-4 and worst <= 1e-3
    print(f"{'PASS' if ok else 'FAIL'} sequence parallel (SP={args.sp}, fp32): loss relative difference {rel_loss:.1e} "
          f"(≤ 1e-4), worst gradient difference {worst:.1e} of each tensor's largest (≤ 1e-3)", flush=True)
    print(f"     sequence parallel throughput, one row of {tokens:,} tokens fwd+bwd: 1 device {tokens / one:,.0f} "
          f"tokens/s; SP={args.sp} {tokens / got['seconds']:,.0f} tokens/s "
          f"({tokens / got['seconds'] / args.sp:,.0f} per device)", flush=True)
    return ok


def check_plan(args) -> bool:
    """The memory planner against this device: plan a full fine-tune of a random Llama saved with args' shape,
    run two optimizer steps with the training code (build_model, make_optimizer, token_loss_sum), compare peaks."""
    import tempfile

    from transformers import LlamaForCausalLM

    from train.collate import collate_padded
    from train.distributed import DistInfo
    from train.host_memory import hwm_mb, reset_hwm
    from train.loop import token_loss_sum
    from train.model_setup import build_model
    from train.optim import make_optimizer
    from train.plan import TOLERANCE, _plan_cfg, plan
    from train.precision import resolve_precision

    with tempfile.TemporaryDirectory() as tmp:
        _, config = make_model(args, "sdpa")
        LlamaForCausalLM(config).save_pretrained(tmp)
        cfg = _plan_cfg(["--model_name_or_path", tmp, "--model_max_length", str(args.seq), "--bf16",
                         "True" if args.device == "cuda" else "False", "--gradient_checkpointing", "True"])
        planned = plan(cfg, 1, args.device)
        device = torch.device(args.device)
        precision = resolve_precision(cfg.bf16, cfg.fp16, device)
        if args.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_hwm()
        model = build_model(cfg, DistInfo(0, 1, 0, device), "device", precision)
        optimizer = make_optimizer(cfg, model)
        ids = torch.randint(3, args.vocab, (args.seq,)).tolist()
        batch = collate_padded([{"input_ids": ids, "labels": ids}], pad_id=0)
        for _ in range(2):
            loss = token_loss_sum(model, batch, device, precision.autocast_dtype) / args.seq
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            measured, what = torch.cuda.max_memory_allocated() / 2**20, "max_memory_allocated"
            predicted = planned["device_allocated_mb"]["loading"]
        else:
            measured, what = hwm_mb(), "VmHWM"
            predicted = planned["peak_mb"]["loading"]["host"]
        del model, optimizer
    error = measured / predicted - 1
    ok = abs(error) <= TOLERANCE
    print(f"{'PASS' if ok else 'FAIL'} memory plan ({precision.name}, {args.seq} tokens, full fine-tune, checkpointing): "
          f"{what} {measured:,.0f} MB, planned {predicted:,.0f} MB ({error:+.1%}; bound ±{TOLERANCE:.0%})")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--attn", default=None, help="attention implementation (default: flash_attention_2 on CUDA "
                                                 "when installed, else sdpa)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048, help="tokens per packed row in the throughput run")
    ap.add_argument("--batch", type=int, default=4, help="packed rows per micro-batch in the throughput run")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sp", type=int, default=None, help="sequence-parallel check over N processes (default: 2 on a "
                                                         "machine with >= 2 GPUs, else off; on CPU it runs over gloo)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; run on a GPU machine, or --device cpu --attn sdpa for a smoke test",
              file=sys.stderr)
        return 2
    from train.modeling import flash_attn_available

    register()
    attns = [args.attn] if args.attn else \
        [CHATTUNE_ATTENTION, *(["flash_attention_2"] if flash_attn_available() else []), "sdpa"]
    if args.sp is None:
        args.sp = 2 if args.device == "cuda" and torch.cuda.device_count() >= 2 else 0
    if args.device == "cuda":
        print(f"device: {torch.cuda.get_device_name()} (bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}); "
              f"torch {torch.__version__}; flash-attn {'installed' if flash_attn_available() else 'not installed'}")
    dtypes = [("fp32", None)] if args.device == "cpu" else []
    if args.device == "cuda" and torch.cuda.is_bf16_supported():
        dtypes.append(("bf16", torch.bfloat16))
    if args.device == "cuda":
        dtypes.append(("fp16", torch.float16))
    ok = check_plan(args)
    for attn in attns:
        for name, dtype in dtypes:
            if attn == "flash_attention_2" and dtype is None:
                continue  # flash-attn computes in 16-bit only
            ok &= check_packing(args, attn, dtype, name)
            ok &= check_training(args, attn, dtype, name)
            throughput(args, attn, dtype, name)
    if args.sp and args.sp > 1:
        ok &= check_sequence_parallel(args)
    elif args.device == "cuda":
        print(f"SKIP sequence parallel: needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(main())
