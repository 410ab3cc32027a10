"""Build the tokenized training dataset: load → validate → tokenize (batched, multi-process) → cache.

The result is an Arrow dataset with columns `id, source, input_ids, labels, length, num_supervised, truncated`
cached under `<cache>/datasets/<key>/` and read memory-mapped by every rank (never turned into Python lists).

The key (`fingerprint`) covers everything that can change the output, so a cache can never be stale: the data
files' bytes (or path + size + mtime with `data_hash="stat"`, for huge files), each source's weight/count and
template, the tokenizer, every data option, the source code of the modules that read, validate, render and
tokenize, and the versions of transformers, tokenizers, datasets and pyarrow.

Builds are coordinated through the filesystem, never a collective (a 3-hour tokenization must not hit a process
group timeout): one builder per node (local rank 0; `shared=True`: one per job, global rank 0, for a cache on a
filesystem all nodes see) builds into a temporary directory under an exclusive lock and publishes it by atomic
rename; the other ranks poll for the published directory and report progress; a failed build leaves a marker
that makes them fail with its message. Concurrent builders of the same key (two jobs) both end with the same
valid cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data.assets import cache_dir
from data.flags import flag_name, given
from data.formats import Source, expand_paths, parse_sources
from data.tokenize import IGNORE_INDEX, tokenize_batch
from data.tokenizer import run_encoder, tokenizer_fingerprint
from data.validate import (
    DataError,
    LoadReport,
    Problem,
    ValidationOptions,
    format_report,
    iter_conversations,
    write_report,
)

# Modules whose code decides a cached row: changing any of them changes every key.
PIPELINE_MODULES = ("data.formats", "data.validate", "data.toolcalls", "data.pieces", "data.templates",
                    "data.agent_templates", "data.jinja_pieces", "data.samples", "data.tokenizer", "data.tokenize",
                    "data.dataset")
VERSIONED_LIBRARIES = ("transformers", "tokenizers", "datasets", "pyarrow")
PUBLISHED = "stats.json"  # written last inside the build directory; its presence means "complete"


@dataclass
class DataConfig:
    template: str = "vicuna_v1.1"
    max_length: int | None = 2048
    mask: str = "assistant"
    overflow: str = "truncate"
    on_bad_record: str = "error"
    validation: ValidationOptions = field(default_factory=ValidationOptions)
    seed: int = 42  # mixing: which records a weight/count below 1x keeps
    reasoning: str = "train"  # assistant reasoning: train | mask | drop
    reasoning_history: str = "expand"  # turns a template renders differently in history: expand | exact

    @property
    def flags(self) -> dict[str, str]:
        """How the calling entry point spells each option in messages (data/flags.py): `validation.flags`."""
        return self.validation.flags


@dataclass
class BuildStats:
    conversations: int = 0
    samples: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    truncated: int = 0
    expanded: int = 0  # conversations the inference-context rule made several samples (data/samples.py)
    inexact_turns: int = 0  # supervised turns left as context (--reasoning_history exact, or not trainable)
    dropped: dict = field(default_factory=dict)  # reason -> count (samples that produced no training row)
    sources: list = field(default_factory=list)  # per source: path, records read, conversations used, samples, tokens

    def summary(self) -> dict:
        d = asdict(self)
        d["supervised_fraction"] = self.supervised_tokens / max(self.tokens, 1)
        return d


def mix(records, source: Source, seed: int, index: int):
    """The records (or record indices) a source contributes: all of them, or `weight`x / `count` of them, chosen by
    seed (whole repeats first, then a seeded sample without replacement for the rest)."""
    if source.weight is None and source.count is None:
        return records
    records = list(records)
    want = source.count if source.count is not None else round(source.weight * len(records))
    whole, rest = divmod(want, len(records)) if records else (0, 0)
    rng = random.Random(f"{seed}:{index}:{source.path}")
    return records * whole + [records[i] for i in sorted(rng.sample(range(len(records)), rest))]


# --- the cache key -------------------------------------------------------------------------------------------------


def _module_source(name: str) -> bytes:
    origin = importlib.util.find_spec(name).origin
    with open(origin, "rb") as f:
        return f.read()


def pipeline_digest() -> str:
    """Hash of the code that turns files into rows, and of the libraries it runs on."""
    from importlib.metadata import PackageNotFoundError, version

    h = hashlib.sha256()
    for name in PIPELINE_MODULES:
        h.update(name.encode() + b"\0" + _module_source(name) + b"\0")
    for lib in VERSIONED_LIBRARIES:
        try:
            h.update(f"{lib}=={version(lib)}".encode())
        except PackageNotFoundError:
            h.update(f"{lib}: absent".encode())
    return h.hexdigest()


def _file_digest(path: str, data_hash: str) -> str:
    st = os.stat(path)
    if data_hash == "stat":  # opt-in for huge files: path + size + mtime
        return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return f"{os.path.abspath(path)}:{h.hexdigest()}"


def fingerprint(paths, tokenizer, cfg: DataConfig, data_hash: str = "content") -> str:
    if data_hash not in ("content", "stat"):
        raise ValueError(f"{flag_name('data_hash', cfg.flags)} must be content or stat, got {data_hash!r}")
    h = hashlib.sha256()
    for source in parse_sources(paths, cfg.flags):
        h.update(json.dumps(source.spec(), sort_keys=True).encode())
        for path in expand_paths(source.path):
            h.update(_file_digest(path, data_hash).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(json.dumps(asdict(cfg), sort_keys=True).encode())
    h.update(pipeline_digest().encode())
    return h.hexdigest()[:20]


def _tokenize_rows(batch: dict, tokenizer, cfg: DataConfig) -> dict:
    conversations = [json.loads(m) for m in batch["messages"]]
    results: list = [None] * len(conversations)
    by_template: dict[str, list[int]] = {}
    for i, t in enumerate(batch["template"]):
        by_template.setdefault(t, []).append(i)
    for template, idx in by_template.items():  # each source may have its own template
        for i, res in zip(idx, tokenize_batch([conversations[i] for i in idx], tokenizer, template, cfg.max_length,
                                              cfg.mask, cfg.overflow, cfg.reasoning, cfg.reasoning_history,
                                              flags=cfg.flags)):
            results[i] = res
    out: dict[str, list] = {k: [] for k in ("id", "source", "input_ids", "labels", "length", "num_supervised",
                                            "truncated", "dropped", "expanded", "inexact_turns")}

    def add(rid, src, ids, labels, truncated, dropped, expanded=0, inexact=0):
        out["id"].append(rid)
        out["source"].append(src)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        out["num_supervised"].append(len(labels) - labels.count(IGNORE_INDEX))
        out["truncated"].append(truncated)
        out["dropped"].append(dropped)
        out["expanded"].append(expanded)
        out["inexact_turns"].append(inexact)

    for rid, src, res in zip(batch["id"], batch["source"], results):
        for k, ex in enumerate(res.samples):  # the conversation's counts ride on its first row
            add(rid, src, ex.input_ids, ex.labels, ex.truncated, "", int(k == 0 and res.expanded_into > 1),
                res.inexact_turns if k == 0 else 0)
        for reason in res.dropped:  # an empty row carries the reason so stats can count it
            add(rid, src, [], [], False, reason)
    return out


class DataBuildError(RuntimeError):
    """The rank that builds the data cache failed; the waiting ranks stop with its message."""


def _builder(shared: bool) -> tuple[bool, str]:
    """Whether this process builds the cache, and who does (for the waiting ranks' messages)."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if shared:
        return rank == 0, "rank 0 of the job"
    return local_rank == 0, "local rank 0 of this node"


def build_dataset(paths, tokenizer, cfg: DataConfig, num_proc: int = 1, cache: str | os.PathLike | None = None,
                  report_dir: str | os.PathLike | None = None, verbose: bool = True, shared: bool = False,
                  data_hash: str = "content", poll_s: float = 1.0):
    """Tokenized dataset for training (cached, memory-mapped), plus its BuildStats and the LoadReport of bad
    records. `paths`: FastChat's single path, or several `PATH[:WEIGHT][:count=N][:template=T]` sources."""
    from datasets import load_from_disk

    sources = parse_sources(paths, cfg.flags)
    root = Path(cache) if cache else cache_dir() / "datasets"
    key = fingerprint(sources, tokenizer, cfg, data_hash)
    target = root / key
    builds, who = _builder(shared)
    if not (target / PUBLISHED).is_file():
        if builds:
            _build_once(sources, tokenizer, cfg, num_proc, root, key, verbose)
        else:
            _wait_for(root, key, who, poll_s, verbose)
    meta = json.loads((target / PUBLISHED).read_text())
    stats = BuildStats(**{k: v for k, v in meta["stats"].items() if k in BuildStats.__dataclass_fields__})
    saved = json.loads((target / "data_report.json").read_text())
    report = LoadReport(rows=saved["rows"], kept=saved["kept"], fixes=Counter(saved["fixes"]), skipped=[
        Problem(r["path"], r["loc"], r["id"], r["rule"], r["message"]) for r in saved["skipped_records"]])
    is_main = int(os.environ.get("RANK", 0)) == 0
    if report_dir and is_main:
        os.makedirs(report_dir, exist_ok=True)
        shutil.copy(target / "data_report.json", Path(report_dir) / "data_report.json")
    if verbose and is_main:
        if report.skipped or report.fixes:
            print("[data] " + format_report(report).replace("\n", "\n[data] "), flush=True)
        if stats.expanded or stats.inexact_turns:
            history = given("reasoning_history", cfg.reasoning_history, cfg.flags)
            print(f"[data] {stats.conversations} conversations -> {stats.samples} samples: {stats.expanded} expanded so "
                  f"every trained turn sees its inference context ({history}); "
                  f"{stats.inexact_turns} turn(s) left untrained as context", flush=True)
        print(f"[data] {target} — {stats.samples} samples, {stats.tokens} tokens "
              f"({stats.supervised_tokens / max(stats.tokens, 1):.1%} supervised), truncated {stats.truncated}, "
              f"dropped {sum(stats.dropped.values())} {dict(stats.dropped) or ''}", flush=True)
        if len(stats.sources) > 1:
            for src in stats.sources:
                print(f"[data]   {src['path']}: {src['records']} records read, {src['conversations']} used "
                      f"(weight {src['weight'] or 1}{', count ' + str(src['count']) if src['count'] else ''}, "
                      f"template {src['template']}) -> {src['samples']} samples, {src['tokens']} tokens", flush=True)
    return load_from_disk(str(target / "dataset")), stats, report


def _wait_for(root: Path, key: str, who: str, poll_s: float, verbose: bool) -> None:
    """Poll for the published cache; no collective involved, so no process-group timeout however long it takes."""
    start, last = time.time(), time.time()
    failed = root / f"{key}.failed"
    while not (root / key / PUBLISHED).is_file():
        if failed.is_file() and failed.stat().st_mtime >= start - 5:
            raise DataBuildError(f"the data cache {root / key} was not built: {who} failed: "
                                 f"{failed.read_text().strip()}")
        if verbose and time.time() - last >= 30:
            last = time.time()
            print(f"[data] waiting for {who} to build the data cache {root / key} ({time.time() - start:.0f} s)",
                  flush=True)
        time.sleep(poll_s)


def _build_once(sources, tokenizer, cfg: DataConfig, num_proc: int, root: Path, key: str, verbose: bool) -> None:
    """Build under an exclusive lock (a concurrent builder of the same key waits, then finds it published);
    publish by atomic rename; on failure leave a marker with the error for the waiting ranks."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    target, failed = root / key, root / f"{key}.failed"
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / PUBLISHED).is_file():  # another process built it while we waited for the lock
            return
        failed.unlink(missing_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{key}-"))
        try:
            _build(sources, tokenizer, cfg, num_proc, tmp, verbose)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            failed.write_text(f"{type(e).__name__}: {e}".splitlines()[0] + "\n")
            raise
        if target.exists():  # a leftover without the published marker (an interrupted older layout)
            shutil.rmtree(target)
        os.rename(tmp, target)


def _build(sources: list[Source], tokenizer, cfg: DataConfig, num_proc: int, out: Path, verbose: bool) -> None:
    import pyarrow as pa
    from datasets import Dataset, concatenate_datasets

    run_encoder(tokenizer)  # prove the tokenizer once, before forking workers
    report = LoadReport()
    per_source, parts = [], []
    schema = pa.schema([("id", pa.string()), ("source", pa.int32()), ("template", pa.string()),
                        ("messages", pa.string())])
    for i, source in enumerate(sources):
        # records stream to an Arrow file in chunks: the builder's memory does not grow with the data
        template = source.template or cfg.template
        rep = LoadReport()
        path = out / f"raw-{i}.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            chunk: list[dict] = []
            opts = dataclasses.replace(cfg.validation, expect_format=source.format)
            for rec in iter_conversations(source.path, cfg.on_bad_record, opts, rep):
                chunk.append(rec)
                if len(chunk) == 4096:
                    writer.write_batch(_raw_batch(chunk, i, template, schema))
                    chunk = []
            if chunk:
                writer.write_batch(_raw_batch(chunk, i, template, schema))
        report.rows += rep.rows
        report.kept += rep.kept
        report.skipped += rep.skipped
        report.fixes.update(rep.fixes)
        part = Dataset.from_file(str(path))
        whole = range(len(part))
        chosen = mix(whole, source, cfg.seed, i)
        parts.append(part if chosen is whole else part.select(chosen))
        per_source.append({**source.spec(), "template": template, "records": rep.rows, "conversations": len(chosen),
                           "samples": 0, "tokens": 0})
    raw = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(raw) == 0:
        raise DataError([], header=f"{given('data', ' '.join(s.path for s in sources), cfg.flags)}: "
                                   "no conversations to train on")
    tokenized = raw.map(
        _tokenize_rows, batched=True, batch_size=256, num_proc=num_proc if num_proc > 1 and len(raw) > 256 else None,
        remove_columns=raw.column_names, fn_kwargs={"tokenizer": tokenizer, "cfg": cfg},
        load_from_cache_file=False, desc="tokenizing", new_fingerprint="chattune",
        cache_file_name=str(out / "tokenized.arrow"),
    )
    dropped_col = tokenized.data.column("dropped").to_pylist()
    dropped = Counter(r for r in dropped_col if r)
    kept = tokenized.filter(lambda d: d == "", input_columns="dropped", cache_file_name=str(out / "kept.arrow"))
    expanded = int(kept.data.column("expanded").to_numpy().sum())
    inexact = int(kept.data.column("inexact_turns").to_numpy().sum())
    kept = kept.remove_columns(["dropped", "expanded", "inexact_turns"])
    lengths = lengths_of(kept)
    supervised = kept.data.column("num_supervised").to_numpy()
    for src, n, tok_count in zip(per_source, *_per_source_counts(kept, lengths, len(sources))):
        src["samples"], src["tokens"] = n, tok_count
    stats = BuildStats(
        conversations=len(raw), samples=len(kept), tokens=int(lengths.sum()), supervised_tokens=int(supervised.sum()),
        truncated=int(kept.data.column("truncated").to_numpy().sum()), expanded=expanded, inexact_turns=inexact,
        dropped=dict(dropped), sources=per_source,
    )
    kept.save_to_disk(str(out / "dataset"))
    write_report(report, out / "data_report.json")
    saved = json.loads((out / "data_report.json").read_text())
    saved["tokenization_dropped"] = [
        {"id": rid, "reason": reason}
        for rid, reason in zip(tokenized.data.column("id").to_pylist(), dropped_col) if reason
    ]
    (out / "data_report.json").write_text(json.dumps(saved, indent=2))
    del tokenized, kept, raw, parts
    for scratch in [*out.glob("tokenized*.arrow"), *out.glob("kept*.arrow"), *out.glob("raw-*.arrow")]:
        scratch.unlink()  # map/filter scratch (one per worker) and the streamed records
    (out / PUBLISHED).write_text(json.dumps({"stats": stats.summary(), "config": asdict(cfg)}))


def _raw_batch(records: list[dict], source: int, template: str, schema):
    import pyarrow as pa

    # a record with tools keeps them beside its messages (data.tokenize.conversation_parts reads either form)
    return pa.record_batch([[r["id"] for r in records], [source] * len(records), [template] * len(records),
                            [json.dumps({"messages": r["messages"], "tools": r["tools"]} if r.get("tools") else r["messages"])
                             for r in records]], schema=schema)


def _per_source_counts(ds, lengths, n_sources: int):
    import numpy as np

    src = ds.data.column("source").to_numpy()
    samples = np.bincount(src, minlength=n_sources)
    tokens = np.bincount(src, weights=lengths, minlength=n_sources)
    return [int(x) for x in samples], [int(x) for x in tokens]


def lengths_of(ds):
    """The `length` column as a NumPy array, read from the memory-mapped table (no Python list per sample)."""
    return ds.data.column("length").to_numpy()
