"""Convert between ShareGPT, OpenAI `messages` and Alpaca records.

    python scripts/convert.py --in-file alpaca.json --out-file sharegpt.json --to sharegpt
    python scripts/convert.py --in-file sharegpt.json --out-file openai.jsonl --to openai

The input format is recognized per record (the same rules as training, data.validate); invalid
records are dropped with the reason. Alpaca holds one exchange: a multi-turn conversation cannot be
written as Alpaca and is dropped (counted), never cut silently. `train` flags on turns are kept for
ShareGPT and OpenAI. Ids are kept (or made from file:line).

Tool use converts both ways between OpenAI (`tools`, assistant `tool_calls`, `tool` messages,
`reasoning_content`) and LLaMA-Factory's ShareGPT (`function_call` / `observation` turns, a `tools` JSON
string, reasoning inline as `<think>…</think>`); records with tools cannot be written as Alpaca (dropped, counted).
"""

from __future__ import annotations

import argparse

from data.records import (
    Tally,
    add_io_args,
    progress,
    read_records,
    record_id,
    reply_text,
    run_tool,
    to_openai,
    to_sharegpt,
    valid_records,
    where,
    write_records,
)


def to_alpaca(rid: str, messages: list[dict]) -> tuple[dict | None, str | None]:
    if any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return None, "tool calls cannot be written as Alpaca"
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    body = messages[1:] if system is not None else messages
    if len(body) != 2:
        return None, "multi-turn conversation cannot be written as Alpaca"
    rec = {"id": rid, "instruction": body[0]["content"], "input": "", "output": reply_text(body[1])}
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
    for row, rec in progress(valid_records(rows, tally), "converting"):
        rid, msgs, tools = record_id(row), rec["messages"], rec.get("tools")
        if args.to == "sharegpt":
            out.append(to_sharegpt(rid, msgs, tools))
        elif args.to == "openai":
            out.append(to_openai(rid, msgs, tools))
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
    from train.fast_exit import exit_fast

    exit_fast(run_tool(main))
