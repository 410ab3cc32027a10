"""Per-rank memory of training as the dataset grows, and the cost of packing plans at size.

    python scripts/bench_data_memory.py [--sizes 200 60000] [--nproc 2] [--plan-samples 1000000] [--json OUT]

For each size, writes that many short generated conversations, runs `train/train.py` (tiny random Llama with
SmolLM2's tokenizer, packing, 2 steps) under torchrun and prints each rank's peak RSS and its growth over the
smallest size: the tokenized set is memory-mapped, so the growth should stay near zero. Then times the packing
plan (best-fit decreasing) for --plan-samples random lengths and checks that every rank's plan is the same.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the cat sat on a mat while rain fell over old maps and tea".split()


def write_conversations(path: Path, n: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20)))
            f.write(json.dumps({"id": str(i), "conversations": [{"from": "human", "value": q},
                                                                 {"from": "gpt", "value": a}]}) + "\n")


def tiny_model(out: Path) -> str:
    from data.tokenizer import load_tokenizer
    from scripts.tiny_model import make_tiny_llama

    if not (out / "config.json").is_file():
        make_tiny_llama(out, load_tokenizer("asset:smollm2"))
    return str(out)


def peak_per_rank(model: str, data: Path, work: Path, nproc: int) -> list[float]:
    """Each rank's peak RSS over a 2-step run, measured by bench_memory's torchrun worker."""
    import os
    import socket

    out = work / f"out-{data.stem}"
    measures = work / f"rss-{data.stem}"
    measures.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = {"model_name_or_path": model, "data_path": str(data), "output_dir": str(out), "template": "chatml",
             "max_steps": 2, "per_device_train_batch_size": 2, "save_strategy": "no", "packing": True,
             "model_max_length": 256, "logging_steps": 1}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           str(ROOT / "scripts" / "bench_memory.py"), "--worker"] + [x for k, v in flags.items() for x in (f"--{k}", str(v))]
    env = {**os.environ, "BENCH_MEMORY_OUT": str(measures), "CHATTUNE_CACHE": str(work / "cache"),
           "OMP_NUM_THREADS": "1", "CHATTUNE_NO_PROGRESS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return [json.loads((measures / f"rank{r}.json").read_text())["final_mb"] for r in range(nproc)]


def plan_figures(n: int, nproc: int) -> tuple[float, bool]:
    from train.sampler import PlanConfig, plan_epoch

    rng = random.Random(0)
    lengths = [min(2048, int(rng.lognormvariate(5.5, 0.9)) + 8) for _ in range(n)]
    t0 = time.perf_counter()
    plans = [plan_epoch(lengths, 0, PlanConfig(4, nproc, rank, 42, True, 2048)) for rank in range(nproc)]
    seconds = (time.perf_counter() - t0) / nproc
    # every rank packs the same bins and takes its share of the same shuffled order: the shares are equally long
    # and together cover every sample (a few padding batches repeat), which only holds when the plans agree
    seen = {i for plan in plans for batch in plan for unit in batch for i in unit}
    return seconds, len({len(p) for p in plans}) == 1 and seen == set(range(n))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 60_000])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--plan-samples", type=int, default=1_000_000)
    ap.add_argument("--json", help="write the figures as JSON")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="chattune-data-memory-"))
    model = tiny_model(work / "tiny")
    rows = []
    for n in sorted(args.sizes):
        data = work / f"conv{n}.jsonl"
        write_conversations(data, n)
        rows.append({"conversations": n, "peak_mb": peak_per_rank(model, data, work, args.nproc)})
    base = rows[0]["peak_mb"]
    print(f"\n{'conversations':>14} " + " ".join(f"{'rank ' + str(r) + ' peak':>12} {'growth':>8}"
                                             for r in range(args.nproc)))
    for row in rows:
        row["growth_mb"] = [p - b for p, b in zip(row["peak_mb"], base)]
        print(f"{row['conversations']:>14,} " + " ".join(f"{p:>9.0f} MB {g:>+5.0f} MB"
                                                        for p, g in zip(row["peak_mb"], row["growth_mb"])))
    result = {"rows": rows}
    if args.plan_samples:
        seconds, agree = plan_figures(args.plan_samples, args.nproc)
        print(f"packing plan for {args.plan_samples:,} samples: {seconds:.1f} s per rank; ranks agree: {agree}")
        result["plan"] = {"samples": args.plan_samples, "seconds": seconds, "ranks_agree": agree}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(main())
