"""Long rows: per-rank peak memory and time per token at SP=1 and SP=2, and the longest row under a budget.

    python scripts/bench_long_context.py [--lengths 4096 8192 16384 32768] [--sp 1 2] [--layers 28]
        [--budget_gb 6] [--tiled_mlp] [--json R]

A random Llama (hidden 1024, 8 heads, 4 KV heads, SwiGLU 4096, 32k vocab, tied embeddings: ~470M parameters at
28 layers) trains with LoRA (r 8, all linear layers) and gradient checkpointing on one row of L tokens, one
sample (attention over the whole row: the costly case), every token supervised: one optimizer step, fp32, gloo.
SP=N runs N processes (`torchrun`), each holding L/N positions (train/sequence_parallel.py, Ulysses attention in
train/attention.py); SP=1 is one process. For every (SP, L) a fresh process group reports each rank's peak RSS
(VmHWM) and the step time; "activation memory" is the peak minus the peak of the same run at 256 tokens (the
model, LoRA, optimizer and framework). The longest row under `--budget_gb` per rank is extrapolated from the
two longest measured rows (memory grows linearly in L: per-sample attention keeps no L² scores) and then run
once to check it fits. Goals (issue 23): at 16k, SP=2's activation memory ≤ 0.55 × SP=1's; SP=2's longest row
≥ 1.8 × SP=1's; the same loss.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train.host_memory import hwm_mb

ROOT = Path(__file__).resolve().parent.parent

BASELINE = 256


def worker(args) -> int:
    """One (SP, L) measurement inside torchrun (or alone for SP=1)."""
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from train.attention import register
    from train.collate import collate_packed, num_supervised
    from train.distributed import DistInfo
    from train.host_memory import return_large_frees_to_os
    from train.long_rows import tile_mlps
    from train.loop import token_loss_sum
    from train.loss import install as install_chunked_loss
    from train.sequence_parallel import init_sequence_parallel, shard_batch

    return_large_frees_to_os()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    sp = init_sequence_parallel(DistInfo(rank, world, rank, torch.device("cpu")), world)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      max_position_embeddings=max(args.length, 4096), tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=register())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    if args.tiled_mlp:
        tile_mlps(model, args.hidden)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    install_chunked_loss(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab, (args.length,), generator=g).tolist()
    batch = shard_batch(collate_packed([[{"input_ids": ids, "labels": ids}]], 0, varlen=True, multiple=sp.size), sp)
    n_sup = torch.tensor(float(num_supervised(batch)))
    if world > 1:
        dist.all_reduce(n_sup)
    t = time.perf_counter()
    loss_sum = token_loss_sum(model, batch, torch.device("cpu"), None)
    (loss_sum / n_sup).backward()
    total = loss_sum.detach().double()
    if world > 1:
        dist.all_reduce(total)
        for p in params:
            dist.all_reduce(p.grad)
    optimizer.step()
    elapsed = time.perf_counter() - t
    record = {"rank": rank, "peak_mb": hwm_mb(), "step_s": elapsed, "loss": float(total / n_sup),
              "params": sum(p.numel() for p in model.parameters())}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(record))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def measure(args, sp: int, length: int, port: int) -> dict:
    """Peak per rank (max over the group's ranks), step time and loss of one (SP, L) run."""
    with tempfile.TemporaryDirectory() as out:
        worker_args = [str(Path(__file__).resolve()), "--worker", "--length", str(length), "--out", out,
                       "--layers", str(args.layers), "--hidden", str(args.hidden), "--heads", str(args.heads),
                       "--kv_heads", str(args.kv_heads), "--intermediate", str(args.intermediate), "--vocab",
                       str(args.vocab), *(["--tiled_mlp"] if args.tiled_mlp else [])]
        threads = max(1, (os.cpu_count() or 1) // sp)  # the same cores in total for every SP degree
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CHATTUNE_NO_PROGRESS": "1"}
        if sp == 1:
            cmd = [sys.executable, *worker_args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={sp}", f"--master_port={port}",
                   *worker_args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"SP={sp} L={length} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        ranks = [json.loads(f.read_text()) for f in sorted(Path(out).glob("rank*.json"))]
    return {"sp": sp, "length": length, "peak_mb": max(r["peak_mb"] for r in ranks),
            "step_s": max(r["step_s"] for r in ranks), "loss": ranks[0]["loss"], "params": ranks[0]["params"]}


def longest_row(rows: list[dict], budget_mb: float, multiple: int = 256) -> int:
    """The longest L (a multiple of 256) whose peak stays under the budget, by linear interpolation between the
    measured rows that bracket the budget (or extrapolation through the two longest when every row fits)."""
    rows = sorted(rows, key=lambda r: r["length"])
    over = next((i for i, r in enumerate(rows) if r["peak_mb"] > budget_mb), len(rows))
    if over == 0:
        raise RuntimeError(f"even {rows[0]['length']} tokens peak above the budget ({rows[0]['peak_mb']:,.0f} MB)")
    a, b = (rows[over - 1], rows[over]) if over < len(rows) else (rows[-2], rows[-1])
    slope = (b["peak_mb"] - a["peak_mb"]) / (b["length"] - a["length"])
    if slope <= 0:
        raise RuntimeError(f"peak memory did not grow from {a['length']} to {b['length']} tokens")
    return int((a["length"] + (budget_mb - a["peak_mb"]) / slope) // multiple * multiple)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--sp", type=int, nargs="+", default=[1, 2], help="sequence-parallel degrees to compare")
    ap.add_argument("--layers", type=int, default=28, help="decoder layers (28: ~470M parameters)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv_heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tiled_mlp", action="store_true", help="train with --tiled_mlp (tiles of hidden-size positions)")
    ap.add_argument("--budget_gb", type=float, default=None,
                    help="per-rank memory budget for the longest-row search (default: skip the search)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--from_json", help="take the sweep from this earlier --json output and run only the budget "
                                        "search")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import torch

    cpu = torch.backends.cpu.get_cpu_capability()
    print(f"random Llama: {args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.kv_heads} KV heads, "
          f"SwiGLU {args.intermediate}, vocab {args.vocab}; LoRA r8 all-linear, gradient checkpointing"
          f"{', tiled MLP' if args.tiled_mlp else ''}; fp32, one row = one sample; CPU capability {cpu}, "
          f"{os.cpu_count()} cores", flush=True)
    port = 29600 + os.getpid() % 1000
    results: dict[int, list[dict]] = {}
    if args.from_json:
        earlier = json.loads(Path(args.from_json).read_text())
        args.lengths = sorted(int(n) for n in earlier["lengths"])
        for sp in args.sp:
            results[sp] = [{**earlier["baseline"][f"sp{sp}"]}] + \
                [dict(earlier["lengths"][str(n)][f"sp{sp}"]) for n in args.lengths]
    for sp in args.sp if not args.from_json else []:
        results[sp] = []
        for length in [BASELINE, *args.lengths]:
            port += 1
            r = measure(args, sp, length, port)
            results[sp].append(r)
            print(f"SP={sp} L={length:6}: peak {r['peak_mb']:8,.0f} MB per rank, step {r['step_s']:7.1f} s "
                  f"({r['step_s'] / length * 1e3:.2f} ms/token), loss {r['loss']:.6f}", flush=True)
    print(f"\n{'L':>6} | " + " | ".join(f"SP={sp} peak MB | SP={sp} act. MB | SP={sp} ms/token" for sp in args.sp)
          + (" | act. ratio SP2/SP1 | loss |Δ|" if {1, 2} <= set(args.sp) else ""))
    summary: dict = {"lengths": {}, "params": results[args.sp[0]][0]["params"], "cpu": cpu,
                     "baseline": {f"sp{sp}": results[sp][0] for sp in args.sp}}
    for i, length in enumerate(args.lengths, start=1):
        cells, act = [], {}
        for sp in args.sp:
            r, base = results[sp][i], results[sp][0]
            act[sp] = r["peak_mb"] - base["peak_mb"]
            cells.append(f"{r['peak_mb']:,.0f} | {act[sp]:,.0f} | {r['step_s'] / length * 1e3:.2f}")
        line = f"{length:>6} | " + " | ".join(cells)
        entry = {f"sp{sp}": {**results[sp][i], "activation_mb": act[sp]} for sp in args.sp}
        if {1, 2} <= set(args.sp):
            ratio = act[2] / act[1]
            dloss = abs(results[2][i]["loss"] - results[1][i]["loss"])
            line += f" | {ratio:.2f} | {dloss:.1e}"
            entry.update(ratio=ratio, loss_diff=dloss)
        summary["lengths"][length] = entry
        print(line)
    if args.json:  # the sweep, before the (long) budget search
        Path(args.json).write_text(json.dumps(summary, indent=2))
    if args.budget_gb:
        budget = args.budget_gb * 1024
        summary["budget_gb"] = args.budget_gb
        fits = {}
        for sp in args.sp:
            guess = longest_row(results[sp][1:], budget)
            port += 1
            check = measure(args, sp, guess, port)
            fits[sp] = {"longest": guess, "checked_peak_mb": check["peak_mb"], "fits": check["peak_mb"] <= budget}
            print(f"SP={sp}: longest row under {args.budget_gb} GB per rank ≈ {guess:,} tokens (run: peak "
                  f"{check['peak_mb']:,.0f} MB, {'fits' if fits[sp]['fits'] else 'OVER the budget'})", flush=True)
        if {1, 2} <= set(fits):
            print(f"longest row SP=2 / SP=1 = {fits[2]['longest'] / fits[1]['longest']:.2f}")
        summary["longest"] = fits
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(main())
