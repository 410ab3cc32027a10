"""Held-out loss and perplexity over assistant tokens only, with training's masking.

    python -m eval.loss --model-path OUT --data heldout.jsonl [--template T] [--max-length 2048]
    torchrun --nproc_per_node 2 -m eval.loss --model-path OUT --data heldout.jsonl

Conversations are read, validated and tokenized by the same code as training (data/), so the tokens
that carry loss here are exactly the ones training supervised. Reported overall and per assistant turn
(1st reply, 2nd reply, ...). Streaming: each batch's logits are reduced to per-token losses and
dropped; only sums per turn are kept. With torchrun, conversations are split over ranks and the sums
all-reduced, so the figures do not depend on the number of processes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter

import torch
import torch.nn.functional as F

from data.tokenize import IGNORE_INDEX, tokenize_batch
from data.validate import DataError, format_report, load_conversations
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


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m eval.loss", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--data", required=True, help="held-out conversations: ShareGPT / OpenAI messages / Alpaca files")
    p.add_argument("--max-length", type=int, default=None,
                   help="truncate like training's --model_max_length (default: the model's context)")
    p.add_argument("--truncation", choices=["truncate", "drop"], default="truncate",
                   help="over-length conversations, as training's --truncation (split parts would renumber turns: "
                        "split the data with scripts/split_long_conversation.py instead)")
    p.add_argument("--reasoning", choices=["train", "mask", "drop"], default=None,
                   help="assistant reasoning in the loss (default: the training run's --reasoning, else train)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--on-bad-record", choices=["error", "skip"], default="error")
    p.add_argument("--output", help="write the figures as JSON here (rank 0)")
    p.add_argument("--per-sample-output", help="write each conversation's id and mean loss as JSONL (rank 0)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


def _recorded_reasoning(model_path: str) -> str:
    """The --reasoning policy the model was trained with (chattune.json), else "train"."""
    import json
    from pathlib import Path

    path = Path(model_path) / "chattune.json"
    try:
        return json.loads(path.read_text()).get("reasoning", "train") if path.is_file() else "train"
    except (OSError, ValueError):
        return "train"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = init_distributed()
    try:
        try:
            loaded = load_from_args(args)
            records, report = load_conversations(args.data, args.on_bad_record)
        except (ServeLoadError, DataError, ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        if info.device.type == "cuda":
            loaded.model.to(info.device)
        max_length = args.max_length or loaded.context_length
        mine = records[info.rank::info.world_size]
        reasoning = args.reasoning or _recorded_reasoning(args.model_path)
        results = tokenize_batch(mine, loaded.tokenizer, loaded.template, max_length, overflow=args.truncation,
                                 reasoning=reasoning)  # records: their tools are rendered as in training
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
    sys.exit(main())
