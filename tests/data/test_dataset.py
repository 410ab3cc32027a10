"""Dataset building: multi-process, cached by fingerprint, drop reports, and rank-0-builds under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port  # noqa: I001

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
    (built,) = [p for p in tmp_path.iterdir() if p.is_dir()]  # one published build (plus its lock file)
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


# --- issue 14: a key that cannot go stale, builds coordinated through the filesystem, several sources ----------------


def test_cache_key_covers_code_libraries_sources_and_options(tokenizers, tmp_path, monkeypatch):
    import dataclasses
    import importlib.metadata

    import data.dataset as dataset_mod
    from data.validate import ValidationOptions

    tok = tokenizers["smollm2"]
    base = DataConfig(template="chatml", max_length=64)
    key = fingerprint(DEMO, tok, base)
    # every option of DataConfig, one at a time
    changed = {"template": "tokenizer", "max_length": 65, "mask": "last", "overflow": "split", "on_bad_record": "skip",
               "validation": ValidationOptions(merge_consecutive=True), "seed": 7,
               "reasoning": "mask", "reasoning_history": "exact"}
    assert set(changed) == {f.name for f in dataclasses.fields(DataConfig)}
    keys = {name: fingerprint(DEMO, tok, dataclasses.replace(base, **{name: value})) for name, value in changed.items()}
    assert len({key, *keys.values()}) == len(changed) + 1
    # the data's bytes, the tokenizer, and each source's weight / count / template
    copy = tmp_path / "demo.jsonl"
    copy.write_text(DEMO.read_text())
    same_bytes = fingerprint(copy, tok, base)
    copy.write_text(DEMO.read_text().replace("Oslo", "Bergen"))
    assert fingerprint(copy, tok, base) != same_bytes
    assert fingerprint(DEMO, tokenizers["qwen2"], base) != key
    for spec in (f"{DEMO}:0.5", f"{DEMO}:count=10", f"{DEMO}:template=llama-2"):
        assert fingerprint(spec, tok, base) != key
    # the source code of the modules that render and tokenize, and the libraries' versions
    real_source = dataset_mod._module_source
    monkeypatch.setattr(dataset_mod, "_module_source",
                        lambda name: real_source(name) + (b"# edited" if name == "data.templates" else b""))
    assert fingerprint(DEMO, tok, base) != key
    monkeypatch.setattr(dataset_mod, "_module_source", real_source)
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda lib: "99.0" if lib == "tokenizers" else real_version(lib))
    assert fingerprint(DEMO, tok, base) != key
    monkeypatch.setattr(importlib.metadata, "version", real_version)
    assert fingerprint(DEMO, tok, base) == key
    # unchanged inputs: the same key in another process
    other = subprocess.run([sys.executable, "-c", (
        "from data.dataset import DataConfig, fingerprint; from data.tokenizer import load_tokenizer; "
        f"print(fingerprint({str(DEMO)!r}, load_tokenizer('asset:smollm2'), DataConfig(template='chatml', max_length=64)))")],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert other.stdout.strip().splitlines()[-1] == key, other.stderr[-2000:]


def test_stat_hashing_is_opt_in_and_sees_size_and_mtime(tokenizers, tmp_path):
    tok, cfg = tokenizers["smollm2"], DataConfig(template="chatml")
    f = tmp_path / "d.jsonl"
    f.write_text(DEMO.read_text())
    stat_key = fingerprint(f, tok, cfg, data_hash="stat")
    assert stat_key != fingerprint(f, tok, cfg)  # content hashing is the default
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert fingerprint(f, tok, cfg, data_hash="stat") != stat_key
    with pytest.raises(ValueError, match="--data_hash"):
        fingerprint(f, tok, cfg, data_hash="fast")


BUILD_SCRIPT = """
import json, sys
from data.dataset import DataConfig, build_dataset
from data.tokenizer import load_tokenizer
ds, stats, _ = build_dataset(sys.argv[1], load_tokenizer("asset:smollm2"), DataConfig(template="chatml", max_length=48),
                             cache=sys.argv[2], verbose=False, poll_s=0.1)
print(json.dumps({"n": len(ds), "first": ds[0]["input_ids"], "last": ds[len(ds) - 1]["labels"]}))
"""


def test_two_concurrent_builders_end_with_one_valid_cache(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, str(DEMO), str(cache)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    a, b = (json.loads(o[0].strip().splitlines()[-1]) for o in outs)
    assert a == b and a["n"] > 200
    entries = sorted(p.name for p in cache.iterdir())
    assert len([e for e in entries if (cache / e).is_dir()]) == 1 and not [e for e in entries if e.startswith(".tmp")]
    assert not [e for e in entries if e.endswith(".failed")]


def test_waiting_ranks_poll_for_the_build_and_fail_with_the_builders_error(tokenizers, tmp_path, monkeypatch):
    import threading
    import time

    import data.dataset as dataset_mod
    from data.dataset import DataBuildError

    tok, cfg = tokenizers["smollm2"], DataConfig(template="chatml", max_length=48)
    cache = tmp_path / "cache"
    cache.mkdir()
    key = fingerprint(DEMO, tok, cfg)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")  # not a builder: it waits
    (cache / f"{key}.failed").write_text("DataError: /data/x.jsonl:3: malformed JSON\n")
    with pytest.raises(DataBuildError, match=r"local rank 0 of this node failed: DataError: /data/x.jsonl:3"):
        build_dataset(DEMO, tok, cfg, cache=cache, verbose=False, poll_s=0.05)
    (cache / f"{key}.failed").unlink()

    def publish_later():  # the builder (another process in real life) publishes after a while
        time.sleep(1.0)
        dataset_mod._build_once(dataset_mod.parse_sources(DEMO), tok, cfg, 1, cache, key, False)

    t = threading.Thread(target=publish_later)
    t.start()
    ds, _, _ = build_dataset(DEMO, tok, cfg, cache=cache, verbose=False, poll_s=0.05)
    t.join()
    assert len(ds) > 200


@pytest.mark.slow
def test_two_nodes_each_build_their_node_local_cache(tmp_path):
    """2 ranks as 2 nodes (torchrun --nnodes 2, one process each, distinct node-local cache dirs): each node's
    local rank 0 builds its own copy; both copies hold the same rows."""
    script = tmp_path / "node.py"
    script.write_text(RANK_SCRIPT)
    port = free_port()
    procs = []
    for node in (0, 1):  # each node's launcher names its own cache directory
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
             "--master_addr=127.0.0.1", f"--master_port={port}", str(script), str(DEMO),
             str(tmp_path / f"node{node}-cache"), str(tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
            cwd=ROOT))
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["built"] == [0] and r1["built"] == [1]  # one builder per node
    assert r0["n"] == r1["n"] > 200 and r0["first"] == r1["first"]
    for node in (0, 1):
        assert len([p for p in (tmp_path / f"node{node}-cache").iterdir() if p.is_dir()]) == 1


def test_several_sources_mix_by_weight_count_and_template(tokenizers, tmp_path):
    from data.formats import parse_source

    def write(name, n, prefix):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"id": f"{prefix}{i}", "conversations": [
            {"from": "human", "value": f"{prefix} question {i}"}, {"from": "gpt", "value": f"{prefix} answer {i}"}]}) + "\n"
            for i in range(n)))
        return path

    a, b, c = write("a.jsonl", 10, "a"), write("b.jsonl", 20, "b"), write("c.jsonl", 8, "c")
    tok, cfg = tokenizers["llama-spm"], DataConfig(template="vicuna_v1.1", max_length=128, seed=3)
    specs = [f"{a}:2", f"{b}:0.25", f"{c}:count=3:template=chatml"]
    ds, stats, _ = build_dataset(specs, tok, cfg, cache=tmp_path / "cache", verbose=False)
    ids = list(ds["id"])
    assert sum(i.startswith("a") for i in ids) == 20 and sorted(set(i for i in ids if i.startswith("a"))) == \
        sorted(f"a{i}" for i in range(10))  # weight 2: every record twice
    assert sum(i.startswith("b") for i in ids) == 5 and sum(i.startswith("c") for i in ids) == 3
    assert [s["conversations"] for s in stats.sources] == [20, 5, 3]
    assert [s["records"] for s in stats.sources] == [10, 20, 8]
    assert [s["template"] for s in stats.sources] == ["vicuna_v1.1", "vicuna_v1.1", "chatml"]
    first_c = next(i for i, rid in enumerate(ids) if rid.startswith("c"))
    assert "<|im_start|>" in tok.decode(ds[first_c]["input_ids"])  # the source's own template
    # deterministic by seed, and another seed picks other records
    again, _, _ = build_dataset(specs, tok, cfg, cache=tmp_path / "cache2", verbose=False)
    assert list(again["id"]) == ids
    other, _, _ = build_dataset(specs, tok, DataConfig(template="vicuna_v1.1", max_length=128, seed=4),
                                cache=tmp_path / "cache3", verbose=False)
    assert [i for i in other["id"] if i.startswith("b")] != [i for i in ids if i.startswith("b")]
    # FastChat's single path is one source with every record; a path with ':' but no option stays a path
    assert parse_source(str(a)).weight is None and parse_source("/x/y:z.jsonl").path == "/x/y:z.jsonl"
    with pytest.raises(ValueError, match="weight or a count, not both"):
        parse_source(f"{a}:0.5:count=3")
    # a declared format: records of another format in that source are invalid records, counted per rule
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(a.read_text() + json.dumps({"instruction": "say hi", "output": "hi"}) + "\n")
    ds, _, report = build_dataset([f"{mixed}:format=sharegpt"], tok, DataConfig(template="vicuna_v1.1",
                                  on_bad_record="skip"), cache=tmp_path / "cache4", verbose=False)
    assert len(ds) == 10 and [p.rule for p in report.skipped] == ["wrong-format"]
    assert "alpaca record in a source declared format=sharegpt" in report.skipped[0].message
    with pytest.raises(ValueError, match="format must be one of"):
        parse_source(f"{a}:format=csv")
