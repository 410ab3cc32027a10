"""How long a checkpoint stalls training: synchronous save vs `--async_save True`.

Builds a random Llama of about 480M parameters (16 layers, hidden 1536; `--layers`/`--hidden` to change),
takes real AdamW steps on it (so the checkpoint holds weights and both Adam moments, ~5.7 GB in fp32),
and saves through chattune's own Checkpointer as training does, `--saves` times per mode. Per save it
prints the stall (the time the step loop is blocked in `save()`), when the checkpoint was complete on
disk, and the step times while a background write was in flight.

    python scripts/bench_checkpoint.py --output_dir /tmp/bench-ckpt [--saves 3] [--layers 16 --hidden 1536]

Every figure names the CPU it was measured on (bf16 is not used: fp32 is what an AVX2-only CPU trains in).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch


def cpu_kind() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from train.precision import NATIVE_BF16_CPU_FLAGS, cpu_flags

    bf16 = "native bf16" if NATIVE_BF16_CPU_FLAGS & cpu_flags() else "no native bf16"
    return f"{model}, {torch.get_num_threads()} threads, ISA {torch.backends.cpu.get_cpu_capability()}, {bf16}"


def build(layers: int, hidden: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 384),
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def step(model, optimizer, tokens: torch.Tensor) -> float:
    t = time.perf_counter()
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output_dir", required=True, help="where the checkpoints are written (needs ~12 GB free)")
    ap.add_argument("--saves", type=int, default=3, help="saves per mode")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--tokens", type=int, default=32, help="tokens per training step (the steps only keep time)")
    args = ap.parse_args(argv)

    from train.backends import Backend
    from train.checkpoint import Checkpointer
    from train.distributed import DistInfo

    info = DistInfo(0, 1, 0, torch.device("cpu"))
    model = build(args.layers, args.hidden)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    tokens = torch.randint(0, 49152, (1, args.tokens))
    baseline = [step(model, optimizer, tokens) for _ in range(3)][1:]
    print(f"[bench] {n_params / 1e6:.0f}M parameters; training step {statistics.median(baseline):.2f} s "
          f"without a save; CPU: {cpu_kind()}", flush=True)
    rows = []
    for mode in ("sync", "async"):
        out = Path(args.output_dir) / mode
        shutil.rmtree(out, ignore_errors=True)
        ckpt = Checkpointer(str(out), info, Backend(info), save_total_limit=1, async_save=mode == "async")
        for k in range(args.saves):
            step(model, optimizer, tokens)
            t0 = time.perf_counter()
            path = ckpt.save(k + 1, model, optimizer, scheduler, {"step": k + 1, "run": {}})
            stall = time.perf_counter() - t0
            during = []
            while mode == "async" and not Path(path).exists():  # train on while the write is in flight
                during.append(step(model, optimizer, tokens))
            ckpt.wait()
            done = time.perf_counter() - t0
            size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e9
            rows.append({"mode": mode, "save": k + 1, "stall_s": round(stall, 2), "complete_after_s": round(done, 2),
                         "steps_during_write": len(during),
                         "step_s_during_write": round(statistics.median(during), 2) if during else None,
                         "size_gb": round(size, 2)})
            print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    print("\n| save | stall per save (median) | checkpoint complete after | training step while writing | size |")
    print("|---|---|---|---|---|")
    for mode in ("sync", "async"):
        r = [x for x in rows if x["mode"] == mode]
        steps = [x["step_s_during_write"] for x in r if x["step_s_during_write"]]
        print(f"| {mode} | {statistics.median(x['stall_s'] for x in r):.2f} s | "
              f"{statistics.median(x['complete_after_s'] for x in r):.2f} s | "
              f"{f'{statistics.median(steps):.2f} s (alone: {statistics.median(baseline):.2f} s)' if steps else '-'} | "
              f"{r[0]['size_gb']:.1f} GB |")
    print(f"\n{n_params / 1e6:.0f}M-parameter Llama, fp32, AdamW; CPU: {cpu_kind()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
