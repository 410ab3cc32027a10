"""Remove exact and near-duplicate conversations (MinHash LSH from datasketch).

    python scripts/dedup.py --in-file train.json --out-file dedup.json [--threshold 0.8] [--on user]

Exact: the same text after whitespace/case normalization. Near: estimated Jaccard similarity of word
n-gram shingles ≥ --threshold (MinHash with --num-perm permutations, LSH index). The first occurrence
is kept; each dropped record is reported with the id it duplicates (--clusters-file). `--on user`
compares prompts only (dedups repeated questions whatever the answers). Any input format; records are
written unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

from data.records import (
    Tally,
    add_io_args,
    conversation_text,
    progress,
    read_records,
    record_id,
    run_tool,
    valid_conversations,
    where,
    write_records,
)

WORD = re.compile(r"\w+", re.UNICODE)


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def shingles(text: str, n: int) -> set[bytes]:
    words = WORD.findall(text.lower())
    if len(words) < n:
        return {" ".join(words).encode("utf-8")} if words else set()
    return {" ".join(words[i:i + n]).encode("utf-8") for i in range(len(words) - n + 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_io_args(p)
    p.add_argument("--mode", choices=["exact", "near", "both"], default="both")
    p.add_argument("--on", choices=["all", "user", "assistant"], default="all", help="which turns are compared")
    p.add_argument("--threshold", type=float, default=0.8, help="near-duplicate Jaccard threshold (0-1)")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (more: slower, more exact)")
    p.add_argument("--ngram", type=int, default=5, help="words per shingle")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--clusters-file", help="write {dropped id: kept id it duplicates} as JSON")
    args = p.parse_args()
    if not 0 < args.threshold <= 1:
        p.error("--threshold must be in (0, 1]")
    roles = {"all": ("user", "assistant"), "user": ("user",), "assistant": ("assistant",)}[args.on]
    rows = read_records(args.in_file)
    tally = Tally("dedup", read=len(rows))
    kept, duplicate_of = [], {}
    exact: dict[str, str] = {}
    lsh = None
    if args.mode in ("near", "both"):
        from datasketch import MinHash, MinHashLSH

        lsh = MinHashLSH(threshold=args.threshold, num_perm=args.num_perm)
    for i, (row, msgs) in enumerate(progress(valid_conversations(rows, tally), "dedup")):
        rid = record_id(row)
        text = normalize(conversation_text(msgs, roles))
        if args.mode in ("exact", "both"):
            digest = hashlib.sha1(text.encode("utf-8")).hexdigest()
            if digest in exact:
                tally.drop("exact duplicate", where(row))
                duplicate_of[rid] = exact[digest]
                continue
            exact[digest] = rid
        if lsh is not None:
            mh = MinHash(num_perm=args.num_perm, seed=args.seed)
            mh.update_batch(list(shingles(text, args.ngram)) or [b""])
            similar = lsh.query(mh)
            if similar:
                tally.drop(f"near duplicate (Jaccard >= {args.threshold})", where(row))
                duplicate_of[rid] = min(json.loads(s) for s in similar)[1]  # the earliest kept match
                continue
            lsh.insert(json.dumps([i, rid]), mh)  # unique key even when ids repeat
        kept.append(row.value)
    tally.kept = write_records(kept, args.out_file)
    tally.report(args.out_file, args.report)
    if args.clusters_file:
        Path(args.clusters_file).write_text(json.dumps(duplicate_of, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(run_tool(main))
