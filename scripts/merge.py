"""Merge several data files into one (FastChat's `merge`), accounting for clashing ids.

    python scripts/merge.py --in-file a.json b.jsonl more/ --out-file merged.json [--on-duplicate-id rename]

Records are written unchanged, in input order. Two records with the same id from different places:
`rename` (default) gives the later one `ID#2`, `ID#3`...; `drop` keeps the first; `error` stops and
names both locations. Exact copies of a record are always dropped and counted.
"""

from __future__ import annotations

import argparse
import json

from data.records import (
    Tally,
    ToolError,
    add_io_args,
    progress,
    read_records,
    record_id,
    run_tool,
    where,
    write_records,
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_io_args(p)
    p.add_argument("--on-duplicate-id", choices=["rename", "drop", "error"], default="rename")
    args = p.parse_args()
    rows = read_records(args.in_file)
    tally = Tally("merge", read=len(rows))
    first_seen: dict[str, str] = {}
    copies: set[str] = set()
    out = []
    for row in progress(rows, "merging"):
        canonical = json.dumps(row.value, sort_keys=True, ensure_ascii=False)
        if canonical in copies:
            tally.drop("exact copy of an earlier record", where(row))
            continue
        copies.add(canonical)
        rid = record_id(row)
        if rid in first_seen:
            if args.on_duplicate_id == "error":
                raise ToolError(f"{where(row)}: id {rid!r} already used at {first_seen[rid]} "
                                "(use --on-duplicate-id rename or drop)")
            if args.on_duplicate_id == "drop":
                tally.drop("duplicate id", where(row))
                continue
            n = 2
            while f"{rid}#{n}" in first_seen:
                n += 1
            rid = f"{rid}#{n}"
            row.value = {**row.value, "id": rid}
            tally.fixed["duplicate id renamed"] += 1
        first_seen[rid] = f"{row.path}:{row.loc}"
        out.append(row.value)
    tally.kept = write_records(out, args.out_file)
    tally.report(args.out_file, args.report)
    return 0


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(run_tool(main))
