"""What fits where: the memory planner's answers for common fine-tunes on common GPUs (README's table).

    python scripts/what_fits.py [--markdown]

For each scenario (model, method, GPUs) the planner (train/plan.py, `--device cuda`, bf16, gradient
checkpointing, micro-batch 1) gives the peak per GPU at 4,096 tokens and the longest row, in powers of two
from 1k to 128k tokens, whose plan fits the GPU's memory. These are predictions from the model configs in
scripts/model_configs/ (public architecture numbers; no weights are read), not measurements.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "scripts" / "model_configs"
FSDP = ["--fsdp", "full_shard auto_wrap"]
QLORA = ["--q_lora", "True", "--lora_r", "16", "--lora_alpha", "32"]
LORA = ["--lora", "True", "--lora_r", "16", "--lora_alpha", "32"]
# (GPUs, GB per GPU, model, method, flags)
SCENARIOS = [
    (1, 24, "llama-2-7b", "QLoRA", QLORA),
    (1, 24, "llama-3.1-8b", "QLoRA", QLORA),
    (1, 24, "llama-2-13b", "QLoRA", QLORA),
    (1, 24, "llama-3.1-8b", "LoRA (bf16 base)", LORA),
    (8, 24, "llama-3.1-8b", "LoRA, FSDP2", LORA + FSDP),
    (8, 24, "llama-3.1-8b", "full, FSDP2", FSDP),
    (8, 24, "llama-3.1-70b", "QLoRA, FSDP2", QLORA + FSDP),
    (8, 80, "llama-3.1-8b", "full, FSDP2", FSDP),
    (8, 80, "llama-3.1-8b", "full, ZeRO-3", ["--deepspeed", str(ROOT / "ds_configs" / "zero3.json")]),
    (8, 80, "llama-3.1-70b", "LoRA, FSDP2", LORA + FSDP),
    (8, 80, "llama-3.1-70b", "full, FSDP2", FSDP),
    (8, 80, "llama-3.1-70b", "full, FSDP2 + CPU offload", ["--fsdp", "full_shard auto_wrap offload"]),
    (8, 80, "llama-3.1-8b", "LoRA, FSDP2, sequence parallel 8", LORA + FSDP + ["--sequence_parallel_size", "8"]),
]
LENGTHS = [2**k for k in range(10, 18)]  # 1k .. 128k


def peak(world: int, model: str, flags: list[str], length: int) -> tuple[float, float]:
    """(device MB, host MB): the larger of the loading rank's and the others'."""
    from train.plan import plan_from_args

    p = plan_from_args(["--model_name_or_path", str(CONFIGS / model), "--bf16", "True", "--gradient_checkpointing",
                        "True", "--model_max_length", str(length), *flags], world_size=world, device="cuda")
    roles = [r for r in p["peak_mb"].values() if r]
    return max(r["device"] for r in roles), max(r["host"] for r in roles)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args()
    os.environ.setdefault("CHATTUNE_NO_PROGRESS", "1")
    print("| GPUs | model | method | per GPU at 4k tokens | host RAM per rank at 4k | longest row that fits |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for world, gb, model, method, flags in SCENARIOS:
        dev4k, host4k = peak(world, model, flags, 4096)
        longest = None
        for length in LENGTHS:
            if peak(world, model, flags, length)[0] > gb * 1024:
                break
            longest = length
        fits = f"{longest // 1024}k tokens" if longest else "none (not even 1k)"
        print(f"| {world}×{gb} GB | {model} | {method} | {dev4k / 1024:.1f} GB{'' if dev4k <= gb * 1024 else ' ✗'} | "
              f"{host4k / 1024:.0f} GB | {fits} |", flush=True)
    return 0


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(main())
