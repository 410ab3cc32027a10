"""`make demo`: fine-tune SmolLM2-135M-Instruct on the embedded demo dataset on CPU and show the change.

1. asks the base model (from the GGUF asset) a few held-out identity questions,
2. runs the real training entry point (full fine-tune, bf16 autocast, packing) on data/demo,
3. asks the fine-tuned model the same questions, and prints both side by side.

    python scripts/demo.py [--output_dir outputs/demo] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

DEMO = ROOT / "data" / "demo"


def answer(model, tokenizer, question: str, max_new_tokens: int = 40) -> str:
    """Greedy answer using the model's own chat template: the base's (with its default SmolLM system
    prompt) before, the exported one (the ChatML template it was fine-tuned with) after."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def ask_all(model_source: str, questions: list[str]) -> list[str]:
    from data.tokenizer import load_tokenizer
    from train.modeling import load_causal_lm

    tokenizer = load_tokenizer(model_source)
    model = load_causal_lm(model_source, dtype=torch.float32).eval()
    return [answer(model, tokenizer, q) for q in questions]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output_dir", default=str(ROOT / "outputs" / "demo"))
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--learning_rate", type=float, default=1e-4)
    args = ap.parse_args()
    heldout = json.loads((DEMO / "heldout_identity.json").read_text())
    questions, expected = heldout["questions"], heldout["expected_substring"]
    torch.set_num_threads(os.cpu_count() or 1)

    print("== base model (SmolLM2-135M-Instruct, its own chat template) on held-out identity questions", flush=True)
    before = ask_all("asset:smollm2", questions)
    for q, a in zip(questions, before):
        print(f"  Q: {q}\n  A: {a}", flush=True)

    print("\n== fine-tuning on data/demo/chattune_demo.jsonl (full fine-tune, bf16 autocast, packing, CPU)", flush=True)
    t0 = time.time()
    cmd = [sys.executable, str(ROOT / "train" / "train.py"), "--model_name_or_path", "asset:smollm2",
           "--data_path", str(DEMO / "chattune_demo.jsonl"), "--output_dir", args.output_dir, "--template", "chatml",
           "--bf16", "True", "--packing", "True", "--model_max_length", "512", "--per_device_train_batch_size", "2",
           "--num_train_epochs", str(args.epochs), "--learning_rate", str(args.learning_rate), "--warmup_ratio", "0.1",
           "--lr_scheduler_type", "cosine", "--logging_steps", "5", "--save_strategy", "no", "--seed", "1"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    minutes = (time.time() - t0) / 60

    print(f"\n== fine-tuned model ({minutes:.1f} min of training) on the same questions", flush=True)
    after = ask_all(args.output_dir, questions)
    for q, b, a in zip(questions, before, after):
        print(f"  Q: {q}\n     before: {b}\n     after:  {a}", flush=True)
    hits_before = sum(expected in a for a in before)
    hits_after = sum(expected in a for a in after)
    print(f"\nanswers naming '{expected}': before {hits_before}/{len(questions)}, after {hits_after}/{len(questions)}")
    print("\n== a short scripted chat through serve.cli (programmatic style)", flush=True)
    script = "".join(f"{m} __END_OF_A_MESSAGE_47582648__\n" for m in ("Hi! Who am I talking to?", "What is 7 + 5?"))
    chat = subprocess.run([sys.executable, "-m", "serve.cli", "--model-path", args.output_dir, "--style", "programmatic",
                           "--temperature", "0", "--max-new-tokens", "48"], input=script, text=True,
                          capture_output=True, cwd=ROOT)
    print(chat.stdout.replace(" __END_OF_A_MESSAGE_47582648__", ""), flush=True)
    print(f"model written to {args.output_dir}; chat with it: python -m serve.cli --model-path {args.output_dir}")
    return 0 if hits_after > hits_before and chat.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
