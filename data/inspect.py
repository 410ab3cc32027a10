"""Show exactly what the model will learn from: tokens coloured by supervised / masked, plus stats.

    python -m data.inspect --data PATH --tokenizer TOK --template T [--index N] [--max_length L] [--dump OUT.jsonl]

Supervised tokens (labels == ids) are green, supervised reasoning magenta, supervised tool-call text cyan; masked
tokens are dim (masked reasoning dim magenta, tool results yellow). Stats cover the whole file: tokens, %
supervised, the shares of reasoning, tool calls and tool results, samples per conversation, truncated and dropped
counts with reasons, and a length histogram. `--dump` writes every sample of every record (before packing) as
`{"record": N, "input_ids": [...], "labels": [...]}` per line, N the record's 0-based position in the input.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

from rich.console import Console
from rich.text import Text

from data.flags import TRAINING_FLAGS
from data.formats import read_rows
from data.samples import REASONING_HISTORY
from data.templates import TEMPLATE_NAMES
from data.tokenize import IGNORE_INDEX, MASKS, OVERFLOW_POLICIES, REASONING_POLICIES, tokenize_batch
from data.tokenizer import load_tokenizer
from data.validate import LoadReport, ValidationOptions, format_report, normalize_row

# token category -> (style when supervised, style when masked)
STYLES = {"text": ("bold black on green", "dim"), "reasoning": ("bold black on magenta", "dim magenta"),
          "tool_call": ("bold black on cyan", "dim cyan"), "tool_result": ("yellow", "yellow")}


def token_category(kind: str | None, role: str | None) -> str:
    """What a token is, for colours and shares: reasoning, tool-call text, a tool's result, or other text."""
    if role == "tool":
        return "tool_result"
    if kind in ("reasoning", "reasoning_tag"):
        return "reasoning"
    if kind in ("call", "call_tag"):
        return "tool_call"
    return "text"


def colour_tokens(input_ids: list[int], labels: list[int], tokenizer, categories: list[str] | None = None) -> Text:
    text = Text()
    for k, (tid, lab) in enumerate(zip(input_ids, labels)):
        piece = tokenizer.decode([tid])
        shown = piece.replace("\n", "\\n\n")
        on, off = STYLES[categories[k] if categories else "text"]
        text.append(shown, style=on if lab != IGNORE_INDEX else off)
    return text


def categories_of(ex, messages: list[dict]) -> list[str]:
    return [token_category(kind, messages[o]["role"] if o >= 0 else None) for kind, o in zip(ex.token_kind, ex.token_msg)]


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


# this command's spelling of the options data-layer messages name (data/flags.py)
INSPECT_FLAGS = {**{k: v for k, v in TRAINING_FLAGS.items() if k != "data_hash"}, "data": "--data",
                 "max_length": "--max_length"}


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
    p.add_argument("--reasoning", default="train", choices=REASONING_POLICIES, help="assistant reasoning: train | mask | drop")
    p.add_argument("--reasoning_history", default="expand", choices=REASONING_HISTORY,
                   help="turns a template renders differently in history: expand into samples, or exact only")
    p.add_argument("--merge_consecutive", action="store_true")
    p.add_argument("--drop_leading_assistant", action="store_true")
    p.add_argument("--allow_undeclared_tools", action="store_true")
    p.add_argument("--dump", help="write every sample of every record as JSON lines {record, input_ids, labels}")
    args = p.parse_args(argv)
    console = Console(highlight=False)
    opts = ValidationOptions(args.merge_consecutive, args.drop_leading_assistant,
                             allow_undeclared_tools=args.allow_undeclared_tools, flags=INSPECT_FLAGS)
    report = LoadReport()
    positions, records = [], []  # the input position of every valid record
    try:
        for pos, row in enumerate(read_rows(args.data)):
            report.rows += 1
            rec, problem = normalize_row(row, opts, report.fixes)
            if problem:
                report.skipped.append(problem)
                continue
            report.kept += 1
            positions.append(pos)
            records.append(rec)
    except (FileNotFoundError, ValueError, OSError) as e:
        console.print(f"[red]error:[/] {e}", markup=True)
        return 1
    if report.skipped and args.on_bad_record == "error":
        for problem in report.skipped:
            console.print(str(problem), markup=False)
        return 1
    if not records:
        console.print("no valid records")
        return 1
    if not 0 <= args.index < len(records):
        console.print(f"[red]error:[/] --index {args.index} is out of range (0..{len(records) - 1})")
        return 1
    tokenizer = load_tokenizer(args.tokenizer)
    results = tokenize_batch(records, tokenizer, args.template, args.max_length, args.mask, args.truncation,
                             args.reasoning, args.reasoning_history, kinds=True, flags=INSPECT_FLAGS)
    for i in range(args.index, min(args.index + args.count, len(records))):
        console.rule(f"record {i} — id {records[i]['id']}")
        res = results[i]
        for k, ex in enumerate(res.samples):
            if len(res.samples) > 1:
                console.print(f"[bold]sample {k + 1}/{len(res.samples)}[/]")
            console.print(colour_tokens(ex.input_ids, ex.labels, tokenizer, categories_of(ex, records[i]["messages"])))
            n_sup = sum(1 for x in ex.labels if x != IGNORE_INDEX)
            console.print(f"[dim]{len(ex.input_ids)} tokens, {n_sup} supervised{', truncated' if ex.truncated else ''}[/]")
        for reason in res.dropped:
            console.print(f"[yellow]dropped:[/] {reason}")
    if args.dump:
        with open(args.dump, "w", encoding="utf-8") as f:
            for pos, res in zip(positions, results):
                for ex in res.samples:
                    f.write(json.dumps({"record": pos, "input_ids": ex.input_ids, "labels": ex.labels}) + "\n")

    lengths = [len(ex.input_ids) for r in results for ex in r.samples]
    tokens = sum(lengths)
    sup = sum(1 for r in results for ex in r.samples for x in ex.labels if x != IGNORE_INDEX)
    shares = Counter(c for rec, r in zip(records, results) for ex in r.samples for c in categories_of(ex, rec["messages"]))
    dropped = Counter(reason for r in results for reason in r.dropped)
    console.rule("stats")
    console.print(format_report(report), markup=False)
    console.print(f"conversations {len(records)}  samples {len(lengths)}  tokens {tokens}  "
                  f"supervised {sup} ({sup / max(tokens, 1):.1%})  truncated {sum(r.truncated for r in results)}  "
                  f"dropped {sum(dropped.values())}")
    console.print(f"token shares: reasoning {shares['reasoning'] / max(tokens, 1):.1%}  tool calls "
                  f"{shares['tool_call'] / max(tokens, 1):.1%}  tool results {shares['tool_result'] / max(tokens, 1):.1%}")
    expanded = sum(r.expanded_into > 1 for r in results)
    if expanded or any(r.inexact_turns for r in results):
        console.print(f"{expanded} conversation(s) became several samples (inference context); "
                      f"{sum(r.inexact_turns for r in results)} turn(s) left untrained as context")
    for reason, n in dropped.most_common():
        console.print(f"  dropped {n} × {reason}", markup=False)
    console.print("length histogram (tokens per sample):")
    for line in histogram(lengths):
        console.print("  " + line)
    if args.dump:
        console.print(f"dump → {args.dump} ({len(lengths)} samples)")
    return 0


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(main())
