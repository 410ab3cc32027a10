"""Convert between ShareGPT, OpenAI `messages` and Alpaca records.

    python scripts/convert.py --in-file alpaca.json --out-file sharegpt.json --to sharegpt
    python scripts/convert.py --in-file sharegpt.json --out-file openai.jsonl --to openai

The input format is recognized per record (the same rules as training, data.validate); invalid
records are dropped with the reason. Alpaca holds one exchange: a multi-turn conversation cannot be
written as Alpaca and is dropped (counted), never cut silently. `train` flags on turns are kept for
ShareGPT and OpenAI. Ids are kept (or made from file:line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.records import (
    Tally,
    add_io_args,
    progress,
    read_records,
    record_id,
    run_tool,
    to_sharegpt,
    valid_conversations,
    where,
    write_records,
)


def to_openai(rid: str, messages: list[dict]) -> dict:
    return {"id": rid, "messages": [dict(m) for m in messages]}


def to_alpaca(rid: str, messages: list[dict]) -> tuple[dict | None, str | None]:
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    body = messages[1:] if system is not None else messages
    if len(body) != 2:
        return None, "multi-turn conversation cannot be written as Alpaca"
    rec = {"id": rid, "instruction": body[0]["content"], "input": "", "output": body[1]["content"]}
    if system is not None:
        rec["system"] = system
    return rec, None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_io_args(p)
    p.add_argument("--to", required=True, choices=["sharegpt", "openai", "alpaca"])
    args = p.parse_args()
    rows = read_records(args.in_file)
    tally = Tally("convert", read=len(rows))
    out = []
    for row, msgs in progress(valid_conversations(rows, tally), "converting"):
        rid = record_id(row)
        if args.to == "sharegpt":
            out.append(to_sharegpt(rid, msgs))
        elif args.to == "openai":
            out.append(to_openai(rid, msgs))
        else:
            rec, reason = to_alpaca(rid, msgs)
            if reason:
                tally.drop(reason, where(row))
                continue
            out.append(rec)
    tally.kept = write_records(out, args.out_file)
    tally.report(args.out_file, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
