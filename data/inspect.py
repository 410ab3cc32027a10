"""Show exactly what the model will learn from: tokens coloured by supervised / masked, plus stats.

    python -m data.inspect --data PATH --tokenizer TOK --template T [--index N] [--max_length L]

Supervised tokens (labels == ids) are green; masked tokens (-100) are dim. Stats cover the whole file:
tokens, % supervised, truncated and dropped counts with reasons, and a length histogram.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from rich.console import Console
from rich.text import Text

from data.templates import TEMPLATE_NAMES
from data.tokenize import IGNORE_INDEX, MASKS, OVERFLOW_POLICIES, tokenize_batch
from data.tokenizer import load_tokenizer
from data.validate import DataError, ValidationOptions, format_report, load_conversations


def colour_tokens(input_ids: list[int], labels: list[int], tokenizer) -> Text:
    text = Text()
    for tid, lab in zip(input_ids, labels):
        piece = tokenizer.decode([tid])
        shown = piece.replace("\n", "\\n\n")
        text.append(shown, style="bold black on green" if lab != IGNORE_INDEX else "dim")
    return text


def histogram(lengths: list[int], bins: int = 10, width: int = 40) -> list[str]:
    if not lengths:
        return ["(no samples)"]
    lo, hi = min(lengths), max(lengths)
    step = max((hi - lo + bins) // bins, 1)
    counts = Counter((n - lo) // step for n in lengths)
    top = max(counts.values())
    return [
        f"{lo + b * step:>7}-{lo + (b + 1) * step - 1:<7} {'█' * max(1, round(width * counts[b] / top)) if counts[b] else '':<{width}} {counts[b]}"
        for b in range(max(counts) + 1)
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.inspect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, nargs="+", help="conversation file(s), dir or glob")
    p.add_argument("--tokenizer", required=True, help="HF dir, hub id, .gguf file or asset:NAME")
    p.add_argument("--template", default="vicuna_v1.1", choices=TEMPLATE_NAMES, help="chat template")
    p.add_argument("--index", type=int, default=0, help="which conversation to show (0-based, after validation)")
    p.add_argument("--count", type=int, default=1, help="how many conversations to show from --index")
    p.add_argument("--max_length", type=int, default=None, help="token limit (default: none)")
    p.add_argument("--mask", default="assistant", choices=MASKS, help="which turns carry loss")
    p.add_argument("--truncation", default="truncate", choices=OVERFLOW_POLICIES, help="over-length policy")
    p.add_argument("--on_bad_record", default="skip", choices=("error", "skip"), help="what to do with invalid records")
    p.add_argument("--merge_consecutive", action="store_true")
    p.add_argument("--drop_leading_assistant", action="store_true")
    args = p.parse_args(argv)
    console = Console(highlight=False)
    try:
        records, report = load_conversations(args.data, args.on_bad_record,
                                             ValidationOptions(args.merge_consecutive, args.drop_leading_assistant))
    except (DataError, FileNotFoundError, ValueError) as e:
        console.print(f"[red]error:[/] {e}", markup=True)
        return 1
    if not records:
        console.print("no valid records")
        return 1
    if not 0 <= args.index < len(records):
        console.print(f"[red]error:[/] --index {args.index} is out of range (0..{len(records) - 1})")
        return 1
    tokenizer = load_tokenizer(args.tokenizer)
    results = tokenize_batch([r["messages"] for r in records], tokenizer, args.template, args.max_length,
                             args.mask, args.truncation)
    for i in range(args.index, min(args.index + args.count, len(records))):
        console.rule(f"record {i} — id {records[i]['id']}")
        res = results[i]
        for k, ex in enumerate(res.samples):
            if len(res.samples) > 1:
                console.print(f"[bold]sample {k + 1}/{len(res.samples)}[/]")
            console.print(colour_tokens(ex.input_ids, ex.labels, tokenizer))
            n_sup = sum(1 for x in ex.labels if x != IGNORE_INDEX)
            console.print(f"[dim]{len(ex.input_ids)} tokens, {n_sup} supervised{', truncated' if ex.truncated else ''}[/]")
        for reason in res.dropped:
            console.print(f"[yellow]dropped:[/] {reason}")

    lengths = [len(ex.input_ids) for r in results for ex in r.samples]
    tokens = sum(lengths)
    sup = sum(1 for r in results for ex in r.samples for x in ex.labels if x != IGNORE_INDEX)
    dropped = Counter(reason for r in results for reason in r.dropped)
    console.rule("stats")
    console.print(format_report(report))
    console.print(f"conversations {len(records)}  samples {len(lengths)}  tokens {tokens}  "
                  f"supervised {sup} ({sup / max(tokens, 1):.1%})  truncated {sum(r.truncated for r in results)}  "
                  f"dropped {sum(dropped.values())}")
    for reason, n in dropped.most_common():
        console.print(f"  dropped {n} × {reason}")
    console.print("length histogram (tokens per sample):")
    for line in histogram(lengths):
        console.print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
