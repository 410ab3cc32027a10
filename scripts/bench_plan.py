"""The memory planner's error, measured: predicted vs measured peak host memory per rank on CPU.

    python scripts/bench_plan.py [--models a b] [--lengths 128 1024] [--json R] [--measured CACHE.json]

Runs the real `train/train.py` (through `scripts/bench_memory.py`'s harness: torchrun, gloo, fp32, the
peak resident memory VmHWM of each rank after two optimizer steps) for every configuration of
2 model shapes × full/LoRA × single process / FSDP2 on 2 ranks / ZeRO-3 on 2 ranks × two row lengths, and
prints next to each rank's measured peak what `python -m train.plan` predicted for the same flags, the
error, and what two common rules would have said for the same run:

- the 24-bytes rule (4 weights + 4 gradients + 8 Adam + 8 "activations" per parameter, one rank),
- `accelerate estimate-memory` ("Training using Adam", fp32: 4 × the fp32 model size), computed with
  accelerate's own `estimate_training_usage` on the same meta model.

Rows are packed to `--model_max_length` and every token carries loss (`--mask all`): the worst micro-batch
those flags allow, which is what the planner plans for. Measurements are cached (`--measured`), so a
changed planner is re-scored without re-running training. The models are random Llamas:
  a: 0.2B, hidden 1024, 12 layers, 16 heads (MHA), SwiGLU 2816, tied embeddings (bench_memory's shape);
  b: 0.48B, hidden 1536, 16 layers, 12 heads / 4 KV heads, SwiGLU 4096, tied (issue 24's shape).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from scripts.bench_memory import BACKENDS, DEMO, MODES, make_model, run_case

MODELS = {"a": dict(params=0.2e9, hidden=1024, inter=2816, heads=16, kv_heads=16),
          "b": dict(params=0.48e9, hidden=1536, inter=4096, heads=12, kv_heads=4)}
RANKS = {"single": 1, "fsdp": 2, "zero3": 2}


def train_args(model: str, backend: str, mode: str, length: int, out: str = "/tmp/chattune-plan-out",
               extra: tuple[str, ...] = ()) -> list[str]:
    """The training flags of one configuration: the same list goes to train.plan and to train.py."""
    return ["--model_name_or_path", model, "--data_path", str(DEMO), "--output_dir", out, "--template", "chatml",
            "--model_max_length", str(length), "--packing", "True", "--mask", "all",
            "--per_device_train_batch_size", "1", "--max_steps", "2", "--save_strategy", "no",
            "--learning_rate", "1e-5", *BACKENDS.get(backend, []), *MODES[mode], *extra]



def predict(model: str, backend: str, mode: str, length: int, extra: tuple[str, ...] = ()) -> dict:
    from train.plan import plan_from_args

    return plan_from_args(train_args(model, backend, mode, length, extra=extra), world_size=RANKS[backend], device="cpu")


def rules_mb(model_dir: str) -> dict:
    """What the 24-bytes rule and accelerate's estimate-memory say for this model (MB, per rank)."""
    import torch
    from accelerate.commands.estimate import estimate_training_usage
    from accelerate.utils import calculate_maximum_sizes
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    n = sum(p.numel() for p in meta.parameters())
    total, _ = calculate_maximum_sizes(meta)
    return {"rule24_mb": 24 * n / 2**20, "accelerate_mb": max(estimate_training_usage(total, "float32").values()) / 2**20}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["a", "b"], choices=sorted(MODELS))
    ap.add_argument("--backends", nargs="+", default=["single", "fsdp", "zero3"], choices=sorted(RANKS))
    ap.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[128, 1024])
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "chattune-bench-plan"),
                    help="where the random models are kept")
    ap.add_argument("--measured", default=None,
                    help="JSON cache of measurements (default: CACHE/measured.json): configurations found there are "
                         "not run again")
    ap.add_argument("--measure_only", action="store_true", help="run what is missing from the cache; predict nothing")
    ap.add_argument("--overhead", action="store_true",
                    help="measure the framework overhead per backend (a tiny model's peak minus its model terms), "
                         "the constant train/plan.py's HOST_OVERHEAD_MB holds")
    ap.add_argument("--cached_only", action="store_true", help="score only the configurations already measured")
    ap.add_argument("--gradient_checkpointing", action="store_true", help="train (and plan) with checkpointing")
    ap.add_argument("--markdown", action="store_true", help="also print the table as markdown (the README's)")
    ap.add_argument("--phases", action="store_true", help="also print each phase's measured and planned peak")
    ap.add_argument("--json", help="also write the table as JSON here")
    args = ap.parse_args()

    from data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("asset:smollm2")
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    measured_file = Path(args.measured or cache / "measured.json")
    measured = json.loads(measured_file.read_text()) if measured_file.is_file() else {}
    models = {k: make_model(cache / f"model-{k}", tokenizer=tokenizer, **MODELS[k])[0] for k in args.models}
    port = 29900 + 50 * (os.getpid() % 20)
    if args.overhead:
        from scripts.tiny_model import make_tiny_llama

        tiny = cache / "tiny"
        if not (tiny / "config.json").is_file():
            make_tiny_llama(tiny, tokenizer)
        for backend in args.backends:  # the framework overhead: a tiny model's peak minus its few model terms
            name = f"tiny/{backend}/lora/128"
            if name not in measured:
                port += 1
                with tempfile.TemporaryDirectory() as tmp:
                    ranks = run_case(str(tiny), backend, "lora", RANKS[backend], port, Path(tmp),
                                     train_args(str(tiny), backend, "lora", 128, str(Path(tmp) / "out"))[6:])
                measured[name] = {str(r): v for r, v in ranks.items()}
                measured_file.write_text(json.dumps(measured, indent=1))
            plan = predict(str(tiny), backend, "lora", 128)
            for rank, m in sorted(measured[name].items()):
                role = "loading" if rank == "0" else "other"
                model_terms = plan["peak_mb"][role]["host"] - next(
                    t["mb"] for t in plan["terms"][role]["host"] if t["name"].startswith("framework"))
                print(f"framework overhead, {backend} rank {rank}: {m['step_mb'] - model_terms:,.0f} MB "
                      f"(tiny model's peak {m['step_mb']:,.0f} MB minus its planned model terms {model_terms:,.0f} MB)")
        return 0
    rows = []
    print("model backend mode   L   rank        predicted   measured   error   24-byte rule  accelerate")
    for key in args.models:
        rules = rules_mb(models[key])
        for backend in args.backends:
            for mode in args.modes:
                for length in args.lengths:
                    extra = ("--gradient_checkpointing", "True") if args.gradient_checkpointing else ()
                    name = f"{key}/{backend}/{mode}/{length}{'/gc' if extra else ''}"
                    if name not in measured and args.cached_only:
                        continue
                    if name not in measured:
                        port += 1
                        with tempfile.TemporaryDirectory() as tmp:
                            ranks = run_case(models[key], backend, mode, RANKS[backend], port, Path(tmp),
                                             train_args(models[key], backend, mode, length, str(Path(tmp) / "out"),
                                                        extra)[6:])
                        measured[name] = {str(r): v for r, v in ranks.items()}
                        measured_file.write_text(json.dumps(measured, indent=1))
                    if args.measure_only:
                        print(f"{name}: " + ", ".join(f"rank {r} {v['step_mb']:,.0f} MB" for r, v in measured[name].items()),
                              flush=True)
                        continue
                    plan = predict(models[key], backend, mode, length, extra)
                    for rank, m in sorted(measured[name].items()):
                        role = "loading" if rank == "0" else "other"
                        pred = plan["peak_mb"][role]["host"]
                        err = pred / m["step_mb"] - 1
                        rows.append({"config": name, "rank": int(rank), "role": role, "predicted_mb": pred,
                                     "measured_mb": m["step_mb"], "error": err, **rules})
                        phases = " ".join(f"{n[:3]} {mb:,.0f}" for n, mb in m.get("phases", [])[:7]) if args.phases else ""
                        print(f"{key:5} {backend:7} {mode:5} {length:5} {rank} ({role:7}) {pred:9,.0f} MB "
                              f"{m['step_mb']:9,.0f} MB {err:+7.1%} {rules['rule24_mb']:10,.0f} MB "
                              f"{rules['accelerate_mb']:8,.0f} MB {phases}", flush=True)
                        if args.phases:
                            print("      planned:", {p: round(v) for p, v in plan["phase_mb"][role]["host"].items()})
    if rows:
        worst = max(rows, key=lambda r: abs(r["error"]))
        print(f"worst error: {worst['error']:+.1%} ({worst['config']}, rank {worst['rank']}); "
              f"{sum(abs(r['error']) <= 0.15 for r in rows)}/{len(rows)} within ±15%")
    if args.markdown and rows:
        print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=2))
    return 0


def markdown(rows: list[dict]) -> str:
    """The README's table: one line per configuration, ranks as "rank 0 / rank 1" (rank 0 loads the checkpoint);
    the rules' error is against the larger measured rank."""
    lines = ["| model | backend | mode | tokens | measured, rank 0 / 1 | planned, rank 0 / 1 | error | 24-byte rule | "
             "accelerate estimate-memory |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    configs: dict[str, list[dict]] = {}
    for r in rows:
        configs.setdefault(r["config"], []).append(r)
    for name, ranks in configs.items():
        model, backend, mode, length = name.split("/")[:4]
        ranks.sort(key=lambda r: r["rank"])
        worst = max(ranks, key=lambda r: abs(r["error"]))
        top = max(r["measured_mb"] for r in ranks)
        rule, acc = ranks[0]["rule24_mb"], ranks[0]["accelerate_mb"]
        lines.append(f"| {model} | {backend} | {mode} | {length} | "
                     f"{' / '.join(format(r['measured_mb'], ',.0f') for r in ranks)} MB | "
                     f"{' / '.join(format(r['predicted_mb'], ',.0f') for r in ranks)} MB | {worst['error']:+.1%} | "
                     f"{rule:,.0f} MB ({rule / top - 1:+.0%}) | {acc:,.0f} MB ({acc / top - 1:+.0%}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(main())
