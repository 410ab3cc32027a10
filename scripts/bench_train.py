"""Training throughput on CPU: packing vs dynamic padding vs FastChat-style pad-to-model_max_length.

    python scripts/bench_train.py [--models smollm2 tiny] [--steps 4] [--max_length 512]

For each model and batching mode, in a fresh process (so peak RSS is per mode), runs warm-up + N
optimizer steps of the real loop pieces (collator, token-normalized loss, AdamW; bf16 autocast where this
CPU computes bf16 natively, else fp32 — train/precision.py, as `--bf16 True` does) on the
embedded demo dataset and prints: tokens/s (non-pad), supervised tokens/s, useful-token fraction
(non-pad / processed), peak RSS, and MFU = model FLOPs on non-pad tokens / the matmul peak of the dtype
actually used, measured here (2048² products; both peaks are printed).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = ("packing", "dynamic", "pad_to_max")


def matmul_peak(dtype, n: int = 2048, reps: int = 10) -> float:
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def flops_per_token(config, n_params: int, seq: int) -> float:
    # 6N for the dense part (forward + backward) plus attention scores/values: 12 · layers · hidden · seq
    return 6 * n_params + 12 * config.num_hidden_layers * config.hidden_size * seq


def run_one(model_name: str, mode: str, steps: int, max_length: int, batch: int) -> dict:
    import torch

    from data.dataset import DataConfig, build_dataset
    from data.tokenizer import load_tokenizer
    from train.backends import Backend
    from train.collate import collate_packed, collate_padded
    from train.distributed import DistInfo
    from train.loop import accumulate_gradients
    from train.precision import resolve_precision
    from train.sampler import PlanConfig, plan_epoch

    torch.manual_seed(0)
    tok = load_tokenizer("asset:smollm2")
    ds, _, _ = build_dataset(ROOT / "data" / "demo" / "chattune_demo.jsonl", tok,
                             DataConfig(template="chatml", max_length=max_length), verbose=False)
    samples = ds.select_columns(["input_ids", "labels"]).to_list()
    if model_name == "smollm2":
        from train.modeling import load_causal_lm

        model = load_causal_lm("asset:smollm2")
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=768,
                                             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4))
    model.train()
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    precision = resolve_precision("true", False, info.device)
    plan = plan_epoch([len(s["input_ids"]) for s in samples], 0,
                      PlanConfig(batch_size=1 if mode == "packing" else batch, packing=mode == "packing",
                                 max_length=max_length, seed=0))
    if mode == "packing":
        batches = [collate_packed([[samples[i] for i in u] for u in mb], tok.pad_token_id, precision.compute_dtype) for mb in plan]
    else:
        pad_to = max_length if mode == "pad_to_max" else None
        batches = [collate_padded([samples[u[0]] for u in mb], tok.pad_token_id, pad_to) for mb in plan]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)  # what train/optim.py uses
    backend = Backend(info)
    n_params = sum(p.numel() for p in model.parameters())
    real = processed = sup = 0
    flops = 0.0
    elapsed = 0.0
    warmup = 2  # first steps allocate optimizer state and fault in memory
    for k, b in enumerate(batches[: steps + warmup]):
        t = time.perf_counter()
        _, n_sup = accumulate_gradients(model, [b], backend, info, precision.autocast_dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        if k < warmup:
            continue
        elapsed += dt
        n_real = int(b["num_tokens"])
        real += n_real
        processed += b["input_ids"].numel()
        sup += n_sup
        flops += n_real * flops_per_token(model.config, n_params, b["input_ids"].shape[1])
    return {"model": model_name, "mode": mode, "params": n_params, "tokens_per_s": real / elapsed,
            "supervised_tokens_per_s": sup / elapsed, "useful_fraction": real / processed,
            "achieved_flops": flops / elapsed, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "precision": precision.name, "steps": min(steps, len(batches) - warmup), "processed_tokens_per_step": processed / max(min(steps, len(batches) - warmup), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2", "tiny"], choices=["smollm2", "tiny"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8, help="samples per step for the padded modes (packing: 1 row)")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.steps, args.max_length, args.batch)))
        return
    import torch

    peak_bf16, peak_fp32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
    print(f"measured matmul peak ({torch.get_num_threads()} threads): bf16 {peak_bf16 / 1e9:.0f} GFLOP/s, "
          f"fp32 {peak_fp32 / 1e9:.0f} GFLOP/s")
    from train.precision import resolve_precision

    used = resolve_precision("true", False, torch.device("cpu"))
    peak = peak_bf16 if used.name == "bf16" else peak_fp32
    print(f"computing in {used.name} (--bf16 True on this CPU){'; ' + used.note if used.note else ''}")
    print(f"{'model':<9}{'mode':<12}{'tok/s':>9}{'sup tok/s':>11}{'useful':>8}{'tok/step':>10}{'peak RSS':>10}"
          f"{'MFU(' + used.name + ')':>11}")
    for model in args.models:
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--one", model, mode, "--steps", str(args.steps),
                                  "--max_length", str(args.max_length), "--batch", str(args.batch)],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                print(f"{model:<9}{mode:<12} failed: {out.stderr[-500:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{model:<9}{mode:<12}{r['tokens_per_s']:>9.0f}{r['supervised_tokens_per_s']:>11.0f}"
                  f"{r['useful_fraction']:>8.1%}{r['processed_tokens_per_step']:>10.0f}{r['peak_rss_mb']:>8.0f}MB"
                  f"{r['achieved_flops'] / peak:>11.1%}", flush=True)


if __name__ == "__main__":
    main()
