"""Take a reproducible sample of a dataset (FastChat's `sample`).

    python scripts/sample.py --in-file data.json --out-file sample.json --n 1000 [--seed 0]
    python scripts/sample.py --in-file data.json --out-file head.json --begin 0 --end 100

`--n` (or `--fraction`) picks records uniformly at random with --seed, kept in their input order;
`--begin/--end` takes a slice instead. Records are written unchanged.
"""

from __future__ import annotations

import argparse
import random

from data.records import Tally, add_io_args, read_records, run_tool, write_records


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_io_args(p)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--n", type=int, help="number of records to sample")
    how.add_argument("--fraction", type=float, help="fraction of records to sample")
    p.add_argument("--begin", type=int, help="slice start (instead of sampling)")
    p.add_argument("--end", type=int, help="slice end")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    slicing = args.begin is not None or args.end is not None
    if slicing == (args.n is not None or args.fraction is not None):
        p.error("give either --n/--fraction or --begin/--end")
    if args.n is not None and args.n < 0:
        p.error("--n must be >= 0")
    if args.fraction is not None and not 0 <= args.fraction <= 1:
        p.error("--fraction must be in [0, 1]")
    rows = read_records(args.in_file)
    if slicing:
        chosen = list(range(len(rows)))[args.begin:args.end]
    else:
        n = args.n if args.n is not None else round(len(rows) * args.fraction)
        if n > len(rows):
            p.error(f"--n {n} is more than the {len(rows)} records in the input")
        chosen = sorted(random.Random(args.seed).sample(range(len(rows)), n))
    tally = Tally("sample", read=len(rows))
    tally.kept = write_records([rows[i].value for i in chosen], args.out_file)
    tally.dropped["not sampled"] = len(rows) - tally.kept
    tally.examples["not sampled"] = "-"
    tally.report(args.out_file, args.report)
    return 0


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(run_tool(main))
