"""`make demo`: fine-tune SmolLM2-135M-Instruct on the embedded demo dataset on CPU and show the change.

1. scores the base model (from the GGUF asset) on held-out identity questions and facts (eval.identity),
2. runs the real training entry point (full fine-tune, `--bf16 True`: bf16 where the CPU has it natively, else
   fp32; packing) on data/demo,
3. scores the fine-tuned model on the same questions, and ends with a short scripted chat.

    python scripts/demo.py [--output_dir outputs/demo] [--epochs 1] [--learning_rate 2e-4]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output_dir", default=str(ROOT / "outputs" / "demo"))
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--learning_rate", type=float, default=2e-4)
    args = ap.parse_args()
    from eval.identity import load_spec, print_report, run_identity_eval
    from serve.loading import load_for_chat

    items = load_spec(DEMO / "heldout_identity.json")
    torch.set_num_threads(os.cpu_count() or 1)

    # eval.identity: greedy answers to held-out questions, scored on the facts the demo data teaches
    before = run_identity_eval(load_for_chat("asset:smollm2"), items)  # its own chat template (tokenizer's)
    print_report(before, "base model (SmolLM2-135M-Instruct, its own chat template) on held-out questions")

    print("\n== fine-tuning on data/demo/chattune_demo.jsonl (full fine-tune, --bf16 True, packing, CPU)", flush=True)
    t0 = time.time()
    cmd = [sys.executable, str(ROOT / "train" / "train.py"), "--model_name_or_path", "asset:smollm2",
           "--data_path", str(DEMO / "chattune_demo.jsonl"), "--output_dir", args.output_dir, "--template", "chatml",
           "--bf16", "True", "--packing", "True", "--model_max_length", "512", "--per_device_train_batch_size", "2",
           "--num_train_epochs", str(args.epochs), "--learning_rate", str(args.learning_rate), "--warmup_ratio", "0.1",
           "--lr_scheduler_type", "cosine", "--logging_steps", "5", "--save_strategy", "no", "--seed", "1"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    minutes = (time.time() - t0) / 60

    print(f"\n== fine-tuned model ({minutes:.1f} min of training) on the same questions", flush=True)
    after = run_identity_eval(load_for_chat(args.output_dir), items)  # the template recorded at training
    print_report(after, "fine-tuned model")
    print(f"\nheld-out facts correct: before {before['correct']}/{before['total']}, after {after['correct']}/{after['total']}"
          f"; well-formed replies: before {before['well_formed']}, after {after['well_formed']}", flush=True)
    print("\n== a short scripted chat through serve.cli (programmatic style)", flush=True)
    script = "".join(f"{m} __END_OF_A_MESSAGE_47582648__\n" for m in ("Hi! Who am I talking to?", "Which city is the capital of Norway?"))
    chat = subprocess.run([sys.executable, "-m", "serve.cli", "--model-path", args.output_dir, "--style", "programmatic",
                           "--temperature", "0", "--max-new-tokens", "48"], input=script, text=True,
                          capture_output=True, cwd=ROOT)
    print(chat.stdout.replace(" __END_OF_A_MESSAGE_47582648__", ""), flush=True)
    print(f"model written to {args.output_dir}; chat with it: python -m serve.cli --model-path {args.output_dir}")
    return 0 if after["correct"] > before["correct"] and chat.returncode == 0 else 1


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(main())
