"""Peak memory and time of exporting a model of a few hundred million parameters (scripts/export.py streams it).

    python scripts/bench_export.py [--layers 24 --hidden 1280] [--dtype bf16] [--outtypes f16 q8_0 q4_0 hf]
                                   [--workdir /tmp/bench-export]

A random Llama (SmolLM2's vocabulary and tokenizer, the chatml template) is saved as a training output would be,
then each export runs in a fresh process that reports its peak resident memory (VmHWM) after importing everything
(the baseline) and after exporting. S is the model's size on disk. The goal of docs/export.md is a peak of at most
1.3 S; the export's own share (peak minus baseline) is printed too, since the baseline is the libraries' code.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from train.host_memory import hwm_mb, reset_hwm

ROOT = Path(__file__).resolve().parent.parent


def child(model: str, outtype: str, output: str) -> int:
    """Export once and print {"baseline_mb", "peak_mb", "seconds"} as one JSON line."""
    import torch  # noqa: F401 - the baseline includes every library the export uses
    import transformers  # noqa: F401

    from scripts import export
    from train import export_gguf, export_sources  # noqa: F401

    reset_hwm()
    baseline = hwm_mb()
    t0 = time.perf_counter()
    argv = ["--model-path", model, "--output", output, "--no-check"]
    argv += ["--format", "hf", "--dtype", "bf16"] if outtype == "hf" else ["--outtype", outtype]
    rc = export.main(argv)
    print(json.dumps({"baseline_mb": baseline, "peak_mb": hwm_mb(), "seconds": time.perf_counter() - t0}))
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1280)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="how the training output is saved")
    ap.add_argument("--outtypes", nargs="+", default=["f16", "q8_0", "q4_0", "hf"])
    ap.add_argument("--workdir", default="/tmp/bench-export")
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "OUTTYPE", "OUTPUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(*args.child)
    import shutil

    import torch

    from data.tokenizer import load_tokenizer
    from scripts.bench_checkpoint import build, cpu_kind

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    model_dir = work / "run"
    model = build(args.layers, args.hidden)
    n_params = sum(p.numel() for p in model.parameters())
    model.to(torch.bfloat16 if args.dtype == "bf16" else torch.float32).save_pretrained(model_dir)
    del model
    load_tokenizer("asset:smollm2").save_pretrained(model_dir)
    (model_dir / "chattune.json").write_text(json.dumps({"template": "chatml", "mode": "full",
                                                         "base_model": "asset:smollm2"}))
    size_mb = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**20
    print(f"CPU: {cpu_kind()}")
    print(f"model: random Llama, {n_params / 1e6:.0f}M parameters ({args.layers} layers, hidden {args.hidden}), "
          f"saved {args.dtype}: S = {size_mb:.0f} MB")
    print(f"\n{'export':<8} {'output MB':>10} {'baseline MB':>12} {'peak MB':>9} {'peak / S':>9} "
          f"{'(peak - baseline) / S':>22} {'seconds':>8}")
    worst = 0.0
    for outtype in args.outtypes:
        output = work / (f"run-{outtype}.gguf" if outtype != "hf" else "run-hf")
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_export.py"), "--child", str(model_dir),
                               outtype, str(output)], capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
            return 1
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        out_mb = (output.stat().st_size if output.is_file() else
                  sum(f.stat().st_size for f in output.glob("*.safetensors"))) / 2**20
        worst = max(worst, r["peak_mb"] / size_mb)
        print(f"{outtype:<8} {out_mb:>10.0f} {r['baseline_mb']:>12.0f} {r['peak_mb']:>9.0f} "
              f"{r['peak_mb'] / size_mb:>9.2f} {(r['peak_mb'] - r['baseline_mb']) / size_mb:>22.2f} "
              f"{r['seconds']:>8.1f}")
    print(f"\nworst peak: {worst:.2f} S (goal <= 1.3 S)")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if worst <= 1.3 else 1


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(main())
