"""Peak host memory of one training step vs packed-row length, plain vs chunked loss (train/loss.py).

    python scripts/bench_loss_memory.py [--vocab 128256] [--lengths 256 2048]

A random 2-layer Llama (hidden 256) with a Llama-3-sized vocabulary; each (loss, length) runs in a fresh
process: one packed row of that many tokens (90% supervised), forward + backward through the real
`token_loss_sum`, fp32. Prints peak RSS per run and the growth from the shortest to the longest row —
the part of the memory that scales with tokens × vocab. Target (issue 12): ≤ 0.8 GB from 256 to 2048.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def one(vocab: int, length: int, mode: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from train.collate import collate_packed
    from train.loop import token_loss_sum
    from train.loss import install

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096))
    if mode == "chunked":
        assert install(model)
    ids = torch.randint(3, vocab, (length,)).tolist()
    batch = collate_packed([[{"input_ids": ids, "labels": [-100] * (length // 10) + ids[length // 10:]}]], 0)
    token_loss_sum(model, batch, torch.device("cpu"), None).backward()  # the step whose peak is measured
    return {"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 2048])
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.vocab, int(args.one[0]), args.one[1])))
        return 0
    print(f"vocab {args.vocab:,}, random 2-layer Llama (hidden 256), fp32, one packed row, forward + backward")
    for mode in ("plain", "chunked"):
        peaks = []
        for length in args.lengths:
            out = subprocess.run([sys.executable, __file__, "--vocab", str(args.vocab), "--one", str(length), mode],
                                 capture_output=True, text=True, check=True, cwd=ROOT)
            peaks.append(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"])
            print(f"{mode:8} {length:6} tokens: peak RSS {peaks[-1]:8,.0f} MB", flush=True)
        print(f"{mode:8} growth {args.lengths[0]} → {args.lengths[-1]} tokens: {peaks[-1] - peaks[0]:,.0f} MB", flush=True)
    return 0


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(main())
