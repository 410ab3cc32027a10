"""Split conversations longer than --max-length tokens at turn boundaries (FastChat's
`split_long_conversation`, without its loss of the last exchange at each split).

    python scripts/split_long_conversation.py --in-file clean.json --out-file split.json \\
        --tokenizer asset:llama-spm --template vicuna_v1.1 --max-length 2048

Lengths are counted with the real tokenizer and template, exactly as training will tokenize. Parts
are `ID_0`, `ID_1`, ... with `"split_from": ID` (split_train_test keeps them on one side); each keeps
the system prompt and the record's other fields; together they hold every turn of the original, in order. An exchange longer than --max-length on its own is kept
as its own part (training's --truncation then applies) and counted in the summary. Input in any
supported format; output is ShareGPT (tool calls as LLaMA-Factory's function_call/observation turns). A
part starts at a user turn and runs to the next one, so a tool call is never separated from its result.
"""

from __future__ import annotations

import argparse

from data.records import (
    TEMPLATE_HELP,
    Tally,
    add_io_args,
    batches,
    load_tool_tokenizer,
    read_records,
    record_id,
    resolve_tool_template,
    run_tool,
    to_sharegpt,
    valid_records,
    write_records,
)
from data.templates import TEMPLATE_NAMES


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_io_args(p)
    p.add_argument("--tokenizer", "--model-name-or-path", dest="tokenizer", required=True,
                   help="tokenizer: HF dir, .gguf or asset:NAME")
    p.add_argument("--template", choices=TEMPLATE_NAMES, help=TEMPLATE_HELP)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=256, help="conversations tokenized per batch")
    args = p.parse_args()
    if args.max_length < 2:
        p.error("--max-length must be >= 2")
    from data.tokenize import split_conversations, tokenize_batch

    tokenizer = load_tool_tokenizer(args.tokenizer)
    args.template = resolve_tool_template(args.template, tokenizer, args.tokenizer)
    rows = read_records(args.in_file)
    tally = Tally("split_long_conversation", read=len(rows))
    valid = valid_records(rows, tally)
    out, split_parts = [], []
    over = 0  # parts still over the limit: single exchanges that cannot be split at a turn boundary
    for chunk in batches(valid, args.batch_size, "splitting"):
        for (row, rec), (parts, length) in zip(chunk, split_conversations([r for _, r in chunk], tokenizer, args.template,
                                                                          args.max_length)):
            rid, msgs, tools = record_id(row), rec["messages"], rec.get("tools")
            extra = {k: v for k, v in row.value.items() if k not in ("id", "conversations", "messages", "system",
                                                                     "instruction", "input", "output", "tools")}
            if len(parts) == 1:
                over += length > args.max_length
                out.append(row.value if "conversations" in row.value else {**to_sharegpt(rid, msgs, tools), **extra})
                continue
            tally.fixed["conversations split"] += 1
            tally.fixed["parts written for split conversations"] += len(parts)
            for i, part in enumerate(parts):  # every part keeps the tools; a call stays with its results
                out.append({**to_sharegpt(f"{rid}_{i}", part, tools), **extra, "split_from": rid})
                split_parts.append({"messages": part, "tools": tools})
    results = tokenize_batch(split_parts, tokenizer, args.template) if split_parts else []
    over += sum(len(res.samples[0].input_ids) > args.max_length for res in results if res.samples)
    if over:
        tally.fixed[f"single exchanges longer than {args.max_length} tokens kept whole"] += over
    tally.kept = write_records(out, args.out_file)
    tally.report(args.out_file, args.report)
    return 0


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(run_tool(main))
