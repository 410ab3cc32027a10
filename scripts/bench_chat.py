"""Chat generation speed: chattune's streaming generation vs a plain `model.generate`, same model and prompt.

    python scripts/bench_chat.py [--model asset:smollm2] [--new-tokens 64] [--repeats 3]

Greedy decoding of exactly --new-tokens tokens (end-of-turn stops disabled on both sides), fp32 on CPU.
Prints time-to-first-token and decode tokens/s (median of --repeats) and our ratio to model.generate.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from data.tokenize import encode_prompt
from data.tokenizer import load_tokenizer
from serve.generation import SamplingParams, stream_generate
from train.modeling import load_causal_lm

PROMPT = [{"role": "user", "content": "Write a short paragraph about why the sky looks blue during the day."}]


def ours(model, tok, ids, n):
    t0 = time.perf_counter()
    first = None
    count = 0
    for _ in stream_generate(model, tok, ids, SamplingParams(temperature=0, max_new_tokens=n), set()):
        count += 1
        if first is None:
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return first, total


def plain(model, ids, n):
    x = torch.tensor([ids])
    t0 = time.perf_counter()
    model.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    assert out.shape[1] - len(ids) == n
    return first, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="asset:smollm2")
    ap.add_argument("--template", default="tokenizer")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tok = load_tokenizer(args.model)
    model = load_causal_lm(args.model).eval()
    ids = encode_prompt(PROMPT, tok, args.template)
    with torch.no_grad():
        ours(model, tok, ids, 4), plain(model, ids, 4)  # warm-up
        o = [ours(model, tok, ids, args.new_tokens) for _ in range(args.repeats)]
        p = [plain(model, ids, args.new_tokens) for _ in range(args.repeats)]
    n = args.new_tokens

    def summary(runs):
        ttft = statistics.median(r[0] for r in runs)
        decode = statistics.median((n - 1) / max(r[1] - r[0], 1e-9) for r in runs)
        return ttft, decode

    (ot, od), (pt, pd) = summary(o), summary(p)
    print(f"model {args.model}, prompt {len(ids)} tokens, {n} new tokens, greedy, fp32, {torch.get_num_threads()} threads")
    print(f"{'':<24}{'TTFT (s)':>10}{'decode tok/s':>14}")
    print(f"{'chattune stream_generate':<24}{ot:>10.3f}{od:>14.1f}")
    print(f"{'transformers generate':<24}{pt:>10.3f}{pd:>14.1f}")
    print(f"ratio (ours / generate): decode {od / pd:.2f}x, TTFT {pt / ot:.2f}x (higher is better)")


if __name__ == "__main__":
    main()
