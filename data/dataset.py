"""Build the tokenized training dataset: load → validate → tokenize (batched, multi-process) → cache.

The result is an Arrow dataset with columns `id, input_ids, labels, length, num_supervised, truncated`
cached under `<cache>/datasets/<fingerprint>/`, where the fingerprint covers the data files' bytes,
the tokenizer, template, max_length, mask, overflow policy and validation options. In a multi-rank
job rank 0 builds and the other ranks wait at a barrier and load the same cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data.assets import cache_dir
from data.formats import expand_paths
from data.tokenize import IGNORE_INDEX, tokenize_batch
from data.tokenizer import run_encoder, tokenizer_fingerprint
from data.validate import (
    LoadReport,
    Problem,
    ValidationOptions,
    format_report,
    load_conversations,
    write_report,
)

PIPELINE_VERSION = "1"  # bump when tokenization output changes for the same inputs


@dataclass
class DataConfig:
    template: str = "vicuna_v1.1"
    max_length: int | None = 2048
    mask: str = "assistant"
    overflow: str = "truncate"
    on_bad_record: str = "error"
    validation: ValidationOptions = field(default_factory=ValidationOptions)


@dataclass
class BuildStats:
    conversations: int = 0
    samples: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    truncated: int = 0
    dropped: dict = field(default_factory=dict)  # reason -> count (samples that produced no training row)
    lengths: list[int] = field(default_factory=list)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("lengths")
        d["supervised_fraction"] = self.supervised_tokens / max(self.tokens, 1)
        return d


def fingerprint(paths, tokenizer, cfg: DataConfig) -> str:
    h = hashlib.sha256()
    for path in expand_paths(paths):
        h.update(os.path.abspath(path).encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(json.dumps({**asdict(cfg), "v": PIPELINE_VERSION}, sort_keys=True).encode())
    return h.hexdigest()[:20]


def _tokenize_rows(batch: dict, tokenizer, cfg: DataConfig) -> dict:
    conversations = [json.loads(m) for m in batch["messages"]]
    results = tokenize_batch(conversations, tokenizer, cfg.template, cfg.max_length, cfg.mask, cfg.overflow)
    out: dict[str, list] = {k: [] for k in ("id", "input_ids", "labels", "length", "num_supervised", "truncated", "dropped")}

    def add(rid, ids, labels, truncated, dropped):
        out["id"].append(rid)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        out["num_supervised"].append(len(labels) - labels.count(IGNORE_INDEX))
        out["truncated"].append(truncated)
        out["dropped"].append(dropped)

    for rid, res in zip(batch["id"], results):
        for ex in res.samples:
            add(rid, ex.input_ids, ex.labels, ex.truncated, "")
        for reason in res.dropped:  # an empty row carries the reason so stats can count it
            add(rid, [], [], False, reason)
    return out


def _is_main_and_world() -> tuple[bool, bool]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.get_rank() == 0, True
    except ImportError:
        pass
    return True, False


def build_dataset(paths, tokenizer, cfg: DataConfig, num_proc: int = 1, cache: str | os.PathLike | None = None,
                  report_dir: str | os.PathLike | None = None, verbose: bool = True):
    """Tokenized dataset for training (cached), plus its BuildStats and the LoadReport of bad records."""
    from datasets import load_from_disk

    root = Path(cache) if cache else cache_dir() / "datasets"
    target = root / fingerprint(paths, tokenizer, cfg)
    is_main, distributed = _is_main_and_world()
    if is_main and not (target / "stats.json").is_file():
        _build(paths, tokenizer, cfg, num_proc, target, verbose)
    if distributed:
        import torch.distributed as dist

        dist.barrier()
    meta = json.loads((target / "stats.json").read_text())
    stats = BuildStats(**{k: v for k, v in meta["stats"].items() if k in BuildStats.__dataclass_fields__})
    stats.lengths = meta["lengths"]
    saved = json.loads((target / "data_report.json").read_text())
    report = LoadReport(rows=saved["rows"], kept=saved["kept"], fixes=Counter(saved["fixes"]), skipped=[
        Problem(r["path"], r["loc"], r["id"], r["rule"], r["message"]) for r in saved["skipped_records"]])
    if report_dir and is_main:
        os.makedirs(report_dir, exist_ok=True)
        shutil.copy(target / "data_report.json", Path(report_dir) / "data_report.json")
    if verbose and is_main:
        print(f"[data] {target} — {stats.samples} samples, {stats.tokens} tokens "
              f"({stats.supervised_tokens / max(stats.tokens, 1):.1%} supervised), truncated {stats.truncated}, "
              f"dropped {sum(stats.dropped.values())} {dict(stats.dropped) or ''}", flush=True)
    ds = load_from_disk(str(target / "dataset"))
    return ds, stats, report


def _build(paths, tokenizer, cfg: DataConfig, num_proc: int, target: Path, verbose: bool) -> None:
    from datasets import Dataset

    run_encoder(tokenizer)  # prove the tokenizer once, before forking workers
    records, report = load_conversations(paths, cfg.on_bad_record, cfg.validation)
    if verbose and (report.skipped or report.fixes):
        print("[data] " + format_report(report).replace("\n", "\n[data] "), flush=True)
    raw = Dataset.from_dict({"id": [r["id"] for r in records], "messages": [json.dumps(r["messages"]) for r in records]})
    tokenized = raw.map(
        _tokenize_rows, batched=True, batch_size=256, num_proc=num_proc if num_proc > 1 and len(raw) > 256 else None,
        remove_columns=raw.column_names, fn_kwargs={"tokenizer": tokenizer, "cfg": cfg},
        keep_in_memory=True, load_from_cache_file=False, desc="tokenizing", new_fingerprint="chattune",
    )
    dropped = Counter(r for r in list(tokenized["dropped"]) if r)
    kept = tokenized.filter(lambda d: d == "", input_columns="dropped", keep_in_memory=True).remove_columns("dropped")
    lengths = list(kept["length"])
    stats = BuildStats(
        conversations=len(records), samples=len(kept), tokens=sum(lengths), supervised_tokens=sum(list(kept["num_supervised"])),
        truncated=sum(list(kept["truncated"])), dropped=dict(dropped), lengths=lengths,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    kept.save_to_disk(str(tmp / "dataset"))
    write_report(report, tmp / "data_report.json")
    saved = json.loads((tmp / "data_report.json").read_text())
    saved["tokenization_dropped"] = [
        {"id": rid, "reason": reason} for rid, reason in zip(list(tokenized["id"]), list(tokenized["dropped"])) if reason
    ]
    (tmp / "data_report.json").write_text(json.dumps(saved, indent=2))
    (tmp / "stats.json").write_text(json.dumps({
        "stats": stats.summary(), "lengths": lengths, "config": asdict(cfg),
        }))
    if target.exists():  # a stale partial build (no stats.json): replace it
        shutil.rmtree(target)
    os.replace(tmp, target)
