"""Split a dataset into train and test files, reproducibly (FastChat's `split_train_test`).

    python scripts/split_train_test.py --in-file data.json --ratio 0.05 [--seed 0]
        → data_train.json and data_test.json (or --train-file / --test-file)

Parts of one conversation written by split_long_conversation (records with the same `split_from`)
stay on the same side, so the test set never holds the continuation of a training conversation
(`--no-group-parts` turns that off). `--test-size N` instead of `--ratio` fixes the number of test groups. Records are
written unchanged; the summary counts both sides.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from data.records import Tally, add_io_args, read_records, record_id, run_tool, write_records


def group_key(row, group_parts: bool) -> str:
    parent = row.value.get("split_from") if group_parts else None
    return f"split:{parent}" if parent is not None else f"id:{record_id(row)}"


def split_groups(keys: list[str], ratio: float | None, test_size: int | None, seed: int) -> set[str]:
    """The group keys that go to the test side."""
    unique = sorted(set(keys))
    random.Random(seed).shuffle(unique)
    n = test_size if test_size is not None else round(len(unique) * ratio)
    return set(unique[:n])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_io_args(p, out=False)
    p.add_argument("--ratio", type=float, default=0.1, help="fraction of conversations for the test side")
    p.add_argument("--test-size", type=int, help="number of conversations (groups) for the test side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-file")
    p.add_argument("--test-file")
    p.add_argument("--no-group-parts", action="store_true", help="let parts of one split conversation land on different sides")
    args = p.parse_args()
    if not 0 <= args.ratio <= 1:
        p.error("--ratio must be in [0, 1]")
    if args.test_size is not None and args.test_size < 0:
        p.error("--test-size must be >= 0")
    stem = Path(args.in_file[0])
    suffix = stem.suffix if stem.suffix in (".json", ".jsonl") else ".json"
    train_file = args.train_file or str(stem.with_name(f"{stem.stem}_train{suffix}"))
    test_file = args.test_file or str(stem.with_name(f"{stem.stem}_test{suffix}"))
    rows = read_records(args.in_file)
    keys = [group_key(r, not args.no_group_parts) for r in rows]
    test_keys = split_groups(keys, args.ratio, args.test_size, args.seed)
    train = [r.value for r, k in zip(rows, keys) if k not in test_keys]
    test = [r.value for r, k in zip(rows, keys) if k in test_keys]
    tally = Tally("split_train_test", read=len(rows))
    tally.kept = write_records(train, train_file) + write_records(test, test_file)
    tally.report()
    print(f"  train: {len(train)} records → {train_file}\n  test:  {len(test)} records ({len(test_keys)} "
          f"conversations) → {test_file}", flush=True)
    return 0


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(run_tool(main))
