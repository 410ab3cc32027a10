"""Dataset building: multi-process, cached by fingerprint, drop reports, and rank-0-builds under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port

from data.dataset import DataConfig, build_dataset, fingerprint
from data.tokenize import tokenize_batch
from data.validate import load_conversations

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "data" / "demo" / "chattune_demo.jsonl"


def test_build_matches_direct_tokenization_and_is_cached(tokenizers, tmp_path):
    tok = tokenizers["smollm2"]
    cfg = DataConfig(template="chatml", max_length=64)
    ds, stats, report = build_dataset(DEMO, tok, cfg, num_proc=2, cache=tmp_path, verbose=False)
    records, _ = load_conversations(DEMO)
    direct = [ex for r in tokenize_batch([r["messages"] for r in records], tok, "chatml", 64) for ex in r.samples]
    assert list(ds["input_ids"]) == [ex.input_ids for ex in direct]  # order preserved across 2 worker processes
    assert list(ds["labels"]) == [ex.labels for ex in direct]
    assert stats.samples == len(ds) and stats.tokens == sum(list(ds["length"])) and stats.truncated > 0
    assert report.kept == len(records)
    built = next(tmp_path.iterdir())
    stamp = (built / "stats.json").stat().st_mtime_ns
    ds2, _, _ = build_dataset(DEMO, tok, cfg, num_proc=2, cache=tmp_path, verbose=False)
    assert (built / "stats.json").stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert list(ds2["input_ids"]) == list(ds["input_ids"])


def test_fingerprint_changes_with_every_input(tokenizers, tmp_path):
    tok = tokenizers["smollm2"]
    base = DataConfig(template="chatml", max_length=64)
    fp = fingerprint(DEMO, tok, base)
    variants = [DataConfig(template="tokenizer", max_length=64), DataConfig(template="chatml", max_length=65),
                DataConfig(template="chatml", max_length=64, mask="last"), DataConfig(template="chatml", max_length=64, overflow="split")]
    assert len({fp, *(fingerprint(DEMO, tok, v) for v in variants), fingerprint(DEMO, tokenizers["qwen2"], base)}) == 6
    copy = tmp_path / "demo.jsonl"
    copy.write_text(DEMO.read_text().replace("Oslo", "Bergen"))
    assert fingerprint(copy, tok, base) != fingerprint(tmp_path / "demo.jsonl", tok, DataConfig(template="chatml", max_length=63))


def test_skipped_and_dropped_records_are_reported(tokenizers, tmp_path):
    data = tmp_path / "mixed.jsonl"
    good = {"id": "g", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello " * 40}]}
    short = {"id": "s", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    data.write_text("\n".join([json.dumps(good), "{oops", json.dumps(short)]) + "\n")
    cfg = DataConfig(template="chatml", max_length=20, overflow="drop", on_bad_record="skip")
    ds, stats, report = build_dataset(data, tokenizers["smollm2"], cfg, cache=tmp_path / "c", report_dir=tmp_path / "out", verbose=False)
    assert list(ds["id"]) == ["s"]
    n_good = len(tokenize_batch([load_conversations(data, "skip")[0][0]["messages"]], tokenizers["smollm2"], "chatml")[0].samples[0].input_ids)
    reason = f"too long ({n_good} tokens > max_length 20)"
    assert stats.dropped == {reason: 1}
    saved = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert saved["skipped_by_rule"] == {"malformed-json": 1}
    assert saved["skipped_records"][0]["loc"] == 2
    assert saved["tokenization_dropped"] == [{"id": "g", "reason": reason}]


def test_bad_record_error_mode_fails_before_tokenizing(tokenizers, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"id": "x", "conversations": [{"from": "human", "value": "q"}]}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: no assistant reply to learn from \(x\)"):
        build_dataset(data, tokenizers["smollm2"], DataConfig(template="chatml"), cache=tmp_path / "c", verbose=False)


RANK_SCRIPT = """
import json, os, sys
import torch.distributed as dist
from data.dataset import DataConfig, build_dataset
from data.tokenizer import load_tokenizer
dist.init_process_group("gloo")
import data.dataset as dd
built = []
orig = dd._build
dd._build = lambda *a, **k: (built.append(dist.get_rank()), orig(*a, **k))
ds, stats, _ = build_dataset(sys.argv[1], load_tokenizer("asset:smollm2"), DataConfig(template="chatml", max_length=48),
                             cache=sys.argv[2], verbose=False)
out = {"rank": dist.get_rank(), "built": built, "n": len(ds), "first": ds[0]["input_ids"]}
open(os.path.join(sys.argv[3], f"rank{dist.get_rank()}.json"), "w").write(json.dumps(out))
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_torchrun_rank0_builds_and_other_ranks_load(tmp_path):
    script = tmp_path / "build.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", str(script),
         str(DEMO), str(tmp_path / "cache"), str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["built"] == [0] and r1["built"] == []
    assert r0["n"] == r1["n"] > 200 and r0["first"] == r1["first"]
