"""Tables from judgment files: mean score per turn and per category (single), win rates (pairwise).

    python -m eval.show_results --judgment-file judgments/JUDGE_single.jsonl
    python -m eval.show_results --judgment-file judgments/JUDGE_pair.jsonl --mode pairwise-baseline --baseline-model base

When a judgment appears more than once (a resumed or retried run), the last one counts. Single mode
leaves out judgments without a score (reported as errors). Pairwise: each match was played twice
with the answers swapped; agreeing games give a winner, disagreeing ones (position bias) count as a
tie, as FastChat does; a match with an errored game is left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

from eval.judge import is_error, record_key
from eval.mtbench import DEFAULT_QUESTIONS, FormatError, load_questions, read_jsonl


def latest(records: list[dict]) -> list[dict]:
    by_key = {}
    for r in records:
        by_key[record_key(r)] = r
    return list(by_key.values())


def single_table(records: list[dict], categories: dict, models: list[str] | None) -> dict:
    """model → {"turn 1", "turn 2", "overall", "n", "errors", "categories": {cat: mean}}."""
    scores: dict = defaultdict(lambda: defaultdict(list))
    errors: dict = defaultdict(int)
    for r in records:
        if models and r["model"] not in models:
            continue
        if is_error(r):
            errors[r["model"]] += 1
            continue
        scores[r["model"]][f"turn {r['turn']}"].append(r["score"])
        scores[r["model"]]["overall"].append(r["score"])
        scores[r["model"]][("cat", categories.get(r["question_id"], "?"))].append(r["score"])
    table = {}
    for model in sorted(set(scores) | set(errors)):
        s = scores[model]
        row = {k: _mean(v) for k, v in s.items() if isinstance(k, str)}
        row.update(n=len(s["overall"]), errors=errors[model],
                   categories={k[1]: _mean(v) for k, v in sorted(s.items(), key=lambda kv: str(kv[0])) if isinstance(k, tuple)})
        table[model] = row
    return dict(sorted(table.items(), key=lambda kv: -(kv[1].get("overall") or 0)))


def pairwise_table(records: list[dict], baseline: str | None, models: list[str] | None) -> dict:
    """model → wins, losses, ties, inconsistent, win_rate, loss_rate, win_rate_adjusted (ties count half)."""
    stats: dict = defaultdict(lambda: defaultdict(int))
    for r in records:
        pair = (r["model_1"], r["model_2"])
        if models and not all(m in models or m == baseline for m in pair):
            continue
        if baseline and baseline not in pair:  # the file may also hold pairwise-all games
            continue
        if is_error(r):
            for m in pair:
                stats[m]["errors"] += 1
            continue
        g1, g2 = r["g1_winner"], r["g2_winner"]
        winner = g1 if g1 == g2 else "tie"
        for i, m in enumerate(pair, start=1):
            if winner == "tie":
                stats[m]["ties"] += 1
                stats[m]["inconsistent"] += g1 != g2
            elif winner == f"model_{i}":
                stats[m]["wins"] += 1
            else:
                stats[m]["losses"] += 1
    table = {}
    for m, s in stats.items():
        if m == baseline:
            continue
        total = s["wins"] + s["losses"] + s["ties"]
        table[m] = {"wins": s["wins"], "losses": s["losses"], "ties": s["ties"], "inconsistent": s["inconsistent"],
                    "errors": s["errors"], "win_rate": s["wins"] / total if total else None,
                    "loss_rate": s["losses"] / total if total else None,
                    "win_rate_adjusted": (s["wins"] + 0.5 * s["ties"]) / total if total else None}
    return dict(sorted(table.items(), key=lambda kv: -(kv[1]["win_rate_adjusted"] or 0)))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def print_tables(result: dict, mode: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    if mode == "single":
        table = Table(title="single-answer grading (mean score, 1-10)")
        for col in ("model", "turn 1", "turn 2", "overall", "judged", "errors"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for m, row in result.items():
            table.add_row(m, _fmt(row.get("turn 1")), _fmt(row.get("turn 2")), _fmt(row.get("overall")),
                          str(row["n"]), str(row["errors"]))
        console.print(table)
        cats = sorted({c for row in result.values() for c in row["categories"]})
        by_cat = Table(title="mean score per category")
        by_cat.add_column("model")
        for c in cats:
            by_cat.add_column(c, justify="right")
        for m, row in result.items():
            by_cat.add_row(m, *(_fmt(row["categories"].get(c)) for c in cats))
        console.print(by_cat)
    else:
        table = Table(title="pairwise comparison (inconsistent swapped games count as ties)")
        cols = ("model", "wins", "losses", "ties", "inconsistent", "errors", "win_rate", "loss_rate", "win_rate_adjusted")
        for col in cols:
            table.add_column(col, justify="left" if col == "model" else "right")
        for m, row in result.items():
            table.add_row(m, *(_fmt(row[c]) for c in cols[1:]))
        console.print(table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.show_results", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--judgment-file", required=True)
    p.add_argument("--mode", choices=["single", "pairwise-baseline", "pairwise-all"], default=None,
                   help="default: read from the file (single if it holds scores)")
    p.add_argument("--baseline-model", help="left out of the pairwise table")
    p.add_argument("--model-list", nargs="+")
    p.add_argument("--questions", default=str(DEFAULT_QUESTIONS), help="for per-category figures")
    p.add_argument("--output-json", help="also write the tables as JSON")
    args = p.parse_args(argv)
    try:
        records = latest(read_jsonl(args.judgment_file, "judgment", tolerate_torn_tail=True))
        questions = load_questions(args.questions)
    except (FormatError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not records:
        print(f"error: {args.judgment_file} holds no judgments", file=sys.stderr)
        return 1
    mode = args.mode or ("single" if "score" in records[0] else "pairwise-all")
    if (mode == "single") != ("score" in records[0]):
        print(f"error: --mode {mode} does not match {args.judgment_file} "
              f"({'single' if 'score' in records[0] else 'pairwise'} judgments)", file=sys.stderr)
        return 1
    if mode == "single":
        result = single_table(records, {q["question_id"]: q["category"] for q in questions}, args.model_list)
    else:
        result = pairwise_table(records, args.baseline_model, args.model_list)
    print_tables(result, mode)
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(main())
