"""Held-out loss and perplexity over the tokens training supervised, with training's masking.

    python -m eval.loss --model-path OUT --data heldout.jsonl [--template T] [--max-length 2048]
    torchrun --nproc_per_node 2 -m eval.loss --model-path OUT --data heldout.jsonl

Conversations are read, validated and tokenized by the same code as training (data/) and with the options the
model was trained with, read from its chattune.json: mask, max_length, truncation, reasoning, reasoning_history,
on_bad_record, merge_consecutive, drop_leading_assistant and allow_undeclared_tools. So the tokens that carry loss
here are exactly the ones training supervised. A flag given on the command line overrides the recorded value; one
line says which options came from chattune.json, which from flags and which are defaults. A run recorded with
truncation=split is scored truncated, as training scored its own eval set (split parts would renumber turns).
Reported overall and per assistant turn (1st reply, 2nd reply, ...). Streaming: each batch's logits are reduced to
per-token losses and dropped; only sums per turn are kept. With torchrun, conversations are split over ranks and the
sums all-reduced, so the figures do not depend on the number of processes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from data.samples import REASONING_HISTORY
from data.tokenize import IGNORE_INDEX, MASKS, REASONING_POLICIES, tokenize_batch
from data.validate import ON_BAD_RECORD, DataError, ValidationOptions, format_report, load_conversations
from serve.loading import ServeLoadError, add_model_args, load_from_args
from train.collate import collate_padded
from train.distributed import cleanup, init_distributed, print0


def assistant_turn_of_token(token_msg: list[int], messages: list[dict]) -> list[int]:
    """For each (shifted) label position, the 1-based assistant turn its target token belongs to (0 = none)."""
    turn_of_msg: dict[int, int] = {}
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            turn_of_msg[i] = len(turn_of_msg) + 1
    targets = token_msg[1:] + [-1]  # position t predicts token t+1: the same shift as train.collate
    return [turn_of_msg.get(o, 0) for o in targets]


@torch.no_grad()
def turn_loss_sums(model, samples: list[dict], pad_id: int, batch_size: int, device) -> tuple[torch.Tensor, list[float]]:
    """sums[k] = (loss sum, tokens, conversations) of assistant turn k (k=0: all turns); plus per-sample mean losses."""
    max_turn = max((max(s["turn"]) for s in samples), default=0)
    sums = torch.zeros(max_turn + 1, 3, dtype=torch.float64)
    per_sample: list[float] = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        batch = collate_padded(chunk, pad_id)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       position_ids=batch["position_ids"].to(device), use_cache=False).logits
        labels = batch["labels"].to(device)
        losses = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                 reduction="none").double().cpu()
        del logits
        for row, s in enumerate(chunk):
            n = len(s["input_ids"])
            turn = torch.tensor(s["turn"][:n])
            supervised = labels[row, :n].cpu() != IGNORE_INDEX
            row_loss = losses[row, :n]
            per_sample.append(float(row_loss[supervised].sum() / supervised.sum().clamp(min=1)))
            sums[0] += torch.tensor([row_loss[supervised].sum(), supervised.sum(), 1.0], dtype=torch.float64)
            for k in turn[supervised].unique().tolist():
                sel = supervised & (turn == k)
                sums[k] += torch.tensor([row_loss[sel].sum(), sel.sum(), 1.0], dtype=torch.float64)
    return sums, per_sample


def summarize(sums: torch.Tensor) -> dict:
    def one(row) -> dict:
        loss = float(row[0] / row[1]) if row[1] > 0 else float("nan")
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)) if row[1] > 0 else float("nan"),
                "tokens": int(row[1]), "conversations": int(row[2])}

    return {"overall": one(sums[0]), "per_turn": {str(k): one(sums[k]) for k in range(1, len(sums)) if sums[k, 1] > 0}}


# eval.loss's spelling of the options that data-layer messages name (data/flags.py)
FLAGS = {"template": "--template", "data": "--data", "max_length": "--max-length", "mask": "--mask",
         "truncation": "--truncation", "on_bad_record": "--on-bad-record", "merge_consecutive": "--merge-consecutive",
         "drop_leading_assistant": "--drop-leading-assistant", "allow_undeclared_tools": "--allow-undeclared-tools",
         "reasoning": "--reasoning", "reasoning_history": "--reasoning-history"}
TRUNCATION = ("truncate", "drop")
# option -> (its TrainConfig field in chattune.json's "flags", the record's top-level key or None, the value used
# when neither the command line nor a record gives it); max_length None: the model's context length
RECORDED = {
    "mask": ("mask", "mask", "assistant"),
    "max_length": ("model_max_length", "max_length", None),
    "truncation": ("truncation", None, "truncate"),
    "reasoning": ("reasoning", "reasoning", "train"),
    "reasoning_history": ("reasoning_history", None, "expand"),
    "on_bad_record": ("on_bad_record", None, "error"),
    "merge_consecutive": ("merge_consecutive", None, False),
    "drop_leading_assistant": ("drop_leading_assistant", None, False),
    "allow_undeclared_tools": ("allow_undeclared_tools", None, False),
}
CHOICES = {"mask": MASKS, "truncation": (*TRUNCATION, "split"), "reasoning": REASONING_POLICIES,
           "reasoning_history": REASONING_HISTORY, "on_bad_record": ON_BAD_RECORD}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m eval.loss", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    recorded = " (default: the value recorded in the model's chattune.json, else %s)"
    p.add_argument("--data", required=True, help="held-out conversations: ShareGPT / OpenAI messages / Alpaca files")
    p.add_argument("--max-length", type=int, default=None,
                   help="truncate like training's --model_max_length" + recorded % "the model's context")
    p.add_argument("--mask", choices=MASKS, default=None, help="which turns carry loss, as training's --mask"
                   + recorded % "assistant")
    p.add_argument("--truncation", choices=TRUNCATION, default=None,
                   help="over-length conversations, as training's --truncation (split parts would renumber turns: "
                        "a run trained with split is scored truncated; split the data with "
                        "scripts/split_long_conversation.py instead)" + recorded % "truncate")
    p.add_argument("--reasoning", choices=REASONING_POLICIES, default=None,
                   help="assistant reasoning in the loss" + recorded % "train")
    p.add_argument("--reasoning-history", choices=REASONING_HISTORY, default=None,
                   help="turns a template renders differently in history, as training's --reasoning_history"
                   + recorded % "expand")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--on-bad-record", choices=ON_BAD_RECORD, default=None, help="invalid records" + recorded % "error")
    for flag, what in (("--merge-consecutive", "merge consecutive same-role turns"),
                       ("--drop-leading-assistant", "drop assistant turns before the first user turn"),
                       ("--allow-undeclared-tools", "accept tool calls to functions the record does not declare")):
        p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=what + recorded % "no")
    p.add_argument("--output", help="write the figures as JSON here (rank 0)")
    p.add_argument("--per-sample-output", help="write each conversation's id and mean loss as JSONL (rank 0)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


def read_record(model_path: str) -> tuple[Path | None, dict]:
    """The model directory's chattune.json (path, contents), or (None, {}) when there is none (a hub id, a .gguf,
    a model not trained by chattune). A chattune.json that cannot be read is an error, never silently ignored."""
    path = Path(model_path) / "chattune.json"
    if not path.is_file():
        return None, {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read it ({e}); fix or remove it, or pass every option as a flag") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return path, record


def resolve_options(args, record: dict, path: Path | None = None) -> tuple[dict, dict, list[str]]:
    """(options, where each came from: "flag" | "chattune.json" | "default", notes). A flag beats the record, which
    beats the default; a recorded value eval.loss cannot use is an error naming the flag that overrides it."""
    flags = record.get("flags") if isinstance(record.get("flags"), dict) else {}
    options, source, notes = {}, {}, []
    for option, (field_name, top_level, default) in RECORDED.items():
        given = getattr(args, option)
        if given is not None:
            options[option], source[option] = given, "flag"
            continue
        value = flags.get(field_name)
        if value is None and top_level is not None:
            value = record.get(top_level)
        if value is None:  # not recorded (a record from before the option existed)
            options[option], source[option] = default, "default"
            continue
        if not _usable(option, value):
            raise ValueError(f"{path or 'chattune.json'}: {field_name}={value!r} is not an option eval.loss can use; "
                             f"pass {FLAGS[option]}")
        if option == "truncation" and value == "split":
            notes.append("truncation=split recorded: scored truncated, as training scored its eval set "
                         f"({FLAGS['truncation']} drop to drop over-long conversations instead)")
            value = "truncate"
        options[option], source[option] = value, "chattune.json"
    return options, source, notes


def _usable(option: str, value) -> bool:
    if isinstance(RECORDED[option][2], bool):
        return isinstance(value, bool)
    if option == "max_length":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 2
    return value in CHOICES[option]


def describe_options(options: dict, source: dict, path: Path | None, model_path: str) -> str:
    """One line: which options came from chattune.json, which from flags, which are defaults."""
    def fmt(option):
        value = options[option]
        return f"{option}={'(model context)' if value is None else value}"

    def names(kind):
        return ", ".join(fmt(o) for o in RECORDED if source[o] == kind)

    parts = [f"from {path}: {names('chattune.json') or 'nothing'}" if path is not None
             else f"no chattune.json in {model_path}"]
    if any(v == "flag" for v in source.values()):
        parts.append(f"from flags: {' '.join(f'{FLAGS[o]} {options[o]}' for o in RECORDED if source[o] == 'flag')}")
    if any(v == "default" for v in source.values()):
        parts.append(f"defaults: {names('default')}")
    return "[eval] options " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = init_distributed()
    try:
        try:
            record_path, record = read_record(args.model_path)
            opts, source, notes = resolve_options(args, record, record_path)
            print0(describe_options(opts, source, record_path, args.model_path))
            for note in notes:
                print0(f"[eval] {note}")
            loaded = load_from_args(args)
            validation = ValidationOptions(opts["merge_consecutive"], opts["drop_leading_assistant"],
                                           allow_undeclared_tools=opts["allow_undeclared_tools"], flags=FLAGS)
            records, report = load_conversations(args.data, opts["on_bad_record"], validation)
            if info.device.type == "cuda":
                loaded.model.to(info.device)
            max_length = opts["max_length"] if opts["max_length"] is not None else loaded.context_length
            mine = records[info.rank::info.world_size]
            results = tokenize_batch(mine, loaded.tokenizer, loaded.template, max_length, opts["mask"],
                                     opts["truncation"], opts["reasoning"], opts["reasoning_history"],
                                     flags=FLAGS)  # records: their tools are rendered as in training
        except (ServeLoadError, DataError, ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        samples, dropped = [], Counter()
        ids: list[str] = []
        for rec, res in zip(mine, results):
            dropped.update(res.dropped)
            for ex in res.samples:
                samples.append({"input_ids": ex.input_ids, "labels": ex.labels,
                                "turn": assistant_turn_of_token(ex.token_msg, rec["messages"])})
                ids.append(rec["id"])
        order = sorted(range(len(samples)), key=lambda i: len(samples[i]["input_ids"]))  # less padding
        pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
        sums, per_sample = turn_loss_sums(loaded.model, [samples[i] for i in order], pad_id, args.batch_size,
                                          next(loaded.model.parameters()).device)
        if info.distributed:
            sums = _gather_sums(sums)
            dropped = _gather_counter(dropped)
        figures = summarize(sums)
        figures.update({"model": args.model_path, "template": loaded.template, "data": args.data,
                        "options": {**opts, "max_length": max_length}, "options_from": source,
                        "records": report.rows, "skipped_records": len(report.skipped), "dropped_samples": dict(dropped)})
        print0(format_report(report))
        for reason, n in dropped.items():
            print0(f"  dropped {n} sample(s): {reason}")
        o = figures["overall"]
        print0(f"assistant-token loss {o['loss']:.4f}  ppl {o['ppl']:.3f}  ({o['tokens']} tokens, "
               f"{o['conversations']} conversations)")
        for k, t in figures["per_turn"].items():
            print0(f"  turn {k}: loss {t['loss']:.4f}  ppl {t['ppl']:.3f}  ({t['tokens']} tokens, "
                   f"{t['conversations']} conversations)")
        if args.output and info.is_main:
            with open(args.output, "w", encoding="utf-8") as f:
                json.dump(figures, f, indent=2)
        if args.per_sample_output:
            rows = [{"id": ids[i], "loss": loss} for i, loss in zip(order, per_sample)]
            if info.distributed:
                gathered = [None] * info.world_size
                torch.distributed.all_gather_object(gathered, rows)
                rows = [r for part in gathered for r in part]
            if info.is_main:
                with open(args.per_sample_output, "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)
        return 0
    finally:
        cleanup()


def _gather_sums(sums: torch.Tensor) -> torch.Tensor:
    """Ranks may have seen different numbers of turns: pad to the longest, then add up."""
    n = torch.tensor([sums.shape[0]])
    torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
    padded = torch.zeros(int(n), 3, dtype=torch.float64)
    padded[:sums.shape[0]] = sums
    torch.distributed.all_reduce(padded)
    return padded


def _gather_counter(counter: Counter) -> Counter:
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, dict(counter))
    total: Counter = Counter()
    for part in parts:
        total.update(part)
    return total


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(main())
