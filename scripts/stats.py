"""Dataset statistics with the real tokenizer and template: conversations, turns, tokens (total and
supervised), length percentiles, how many exceed --max-length, and a histogram PNG.

    python scripts/stats.py --in-file train.json --tokenizer asset:llama-spm --template vicuna_v1.1 \\
        [--max-length 2048] [--histogram lengths.png] [--json stats.json]

Tokens are counted exactly as training will tokenize (same rendering and masking), untruncated.
Invalid records are counted with their reason, not silently skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from data.records import (
    TEMPLATE_HELP,
    Tally,
    add_io_args,
    batches,
    load_tool_tokenizer,
    read_records,
    resolve_tool_template,
    run_tool,
    valid_records,
)
from data.templates import TEMPLATE_NAMES


def percentile(sorted_values: list[int], q: float) -> int:
    if not sorted_values:
        return 0
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def describe(values: list[int]) -> dict:
    s = sorted(values)
    return {"count": len(s), "total": sum(s), "mean": round(statistics.fmean(s), 2) if s else 0,
            "min": s[0] if s else 0, "p50": percentile(s, 50), "p90": percentile(s, 90), "p99": percentile(s, 99),
            "max": s[-1] if s else 0}


def save_histogram(lengths: list[int], path: str, max_length: int | None, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.hist(lengths, bins=min(60, max(10, len(set(lengths)))), color="#3b7dd8", edgecolor="white")
    if max_length:
        ax.axvline(max_length, color="#d83b3b", linestyle="--", label=f"--max-length {max_length}")
        ax.legend()
    ax.set_xlabel("tokens per conversation (with the chat template)")
    ax.set_ylabel("conversations")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_io_args(p, out=False)
    p.add_argument("--tokenizer", required=True, help="HF dir, .gguf or asset:NAME")
    p.add_argument("--template", choices=TEMPLATE_NAMES, help=TEMPLATE_HELP)
    p.add_argument("--max-length", type=int, help="report how many conversations are longer")
    p.add_argument("--histogram", help="write a PNG histogram of tokens per conversation")
    p.add_argument("--json", help="write the figures as JSON")
    p.add_argument("--batch-size", type=int, default=512)
    args = p.parse_args()
    if args.histogram and not args.histogram.lower().endswith(".png"):
        p.error("--histogram must name a .png file")
    from data.tokenize import tokenize_batch

    tokenizer = load_tool_tokenizer(args.tokenizer)
    args.template = resolve_tool_template(args.template, tokenizer, args.tokenizer)
    rows = read_records(args.in_file)
    tally = Tally("stats", read=len(rows))
    from data.inspect import token_category

    convs = [rec for _, rec in valid_records(rows, tally)]
    lengths, supervised, turns = [], [], []
    role_tokens = {"system": 0, "user": 0, "assistant": 0, "tool": 0, "template": 0}
    shares = {"reasoning": 0, "tool_call": 0, "tool_result": 0, "text": 0}
    samples = 0
    for chunk in batches(convs, args.batch_size, "tokenizing"):
        for rec, res in zip(chunk, tokenize_batch(chunk, tokenizer, args.template, kinds=True)):
            msgs = rec["messages"]
            turns.append(sum(m["role"] not in ("system", "tool") for m in msgs))
            if not res.samples:  # nothing supervised (e.g. every turn train=false)
                tally.drop("; ".join(res.dropped), "-")
                continue
            ex = res.samples[0]  # the whole conversation (templates that need more samples add them: `samples`)
            samples += len(res.samples)
            lengths.append(len(ex.input_ids))
            supervised.append(sum(lab != -100 for lab in ex.labels))
            for owner, kind in zip(ex.token_msg, ex.token_kind):
                role = msgs[owner]["role"] if owner >= 0 else None
                role_tokens[role or "template"] += 1
                shares[token_category(kind, role)] += 1
    tally.kept = len(lengths)
    figures = {"records": len(rows), "conversations": len(lengths), "turns": describe(turns),
               "tokens": describe(lengths), "supervised_tokens": describe(supervised),
               "supervised_fraction": round(sum(supervised) / max(sum(lengths), 1), 4), "tokens_by_role": role_tokens,
               "samples": samples,
               "token_shares": {k: round(v / max(sum(lengths), 1), 4) for k, v in shares.items()},
               "template": args.template, "tokenizer": args.tokenizer}
    if args.max_length:
        figures["over_max_length"] = sum(n > args.max_length for n in lengths)
    tally.report()
    t = figures["tokens"]
    print(f"  conversations {figures['conversations']}, turns/conv mean {figures['turns']['mean']} max {figures['turns']['max']}\n"
          f"  tokens/conv: mean {t['mean']}  p50 {t['p50']}  p90 {t['p90']}  p99 {t['p99']}  max {t['max']}  "
          f"total {t['total']:,}\n"
          f"  supervised tokens {figures['supervised_tokens']['total']:,} ({figures['supervised_fraction']:.1%}); "
          f"tokens by role (turns incl. their template markup) {role_tokens}\n"
          f"  token shares: reasoning {figures['token_shares']['reasoning']:.1%}, tool calls "
          f"{figures['token_shares']['tool_call']:.1%}, tool results {figures['token_shares']['tool_result']:.1%}; "
          f"{samples} training samples", flush=True)
    if args.max_length:
        print(f"  longer than {args.max_length}: {figures['over_max_length']}", flush=True)
    if args.histogram:
        save_histogram(lengths, args.histogram, args.max_length, f"{Path(args.in_file[0]).name} — {args.template}")
        print(f"  histogram → {args.histogram}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(run_tool(main))
