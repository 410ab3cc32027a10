"""Training on data at real size: the tokenized set stays memory-mapped on every rank, and bad data files stop
training with one line naming the file."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
from helpers import ENV, ROOT, common, free_port

PEAK_PROBE = """
import json, os, resource, sys
sys.path.insert(0, os.environ["CHATTUNE_ROOT"])
from train.train import main
rc = main(sys.argv[2:])
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w").write(json.dumps({"rc": rc, "peak_mb": peak_mb}))
"""


def conversations(path, n: int) -> None:
    rng = random.Random(0)
    words = "the cat sat on a mat while rain fell over old maps and tea".split()
    with open(path, "w") as f:
        for i in range(n):
            q = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
            a = " ".join(rng.choice(words) for _ in range(rng.randint(3, 20)))
            f.write(json.dumps({"id": str(i), "conversations": [{"from": "human", "value": q},
                                                                 {"from": "gpt", "value": a}]}) + "\n")


def peak_rss(tiny_llama, data, out, tmp_path) -> list[float]:
    probe = tmp_path / "probe.py"
    probe.write_text(PEAK_PROBE)
    out.mkdir()
    flags = common(tiny_llama, out, data_path=str(data), max_steps=2, per_device_train_batch_size=2, save_strategy="no",
                   packing=True, model_max_length=256)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(probe), str(out)] + flags
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**ENV, "CHATTUNE_ROOT": str(ROOT),
                                                                    "CHATTUNE_CACHE": str(tmp_path / "cache")},
                          cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["rc"] == 0 for r in ranks)
    return [r["peak_mb"] for r in ranks]


@pytest.mark.slow
def test_sixty_thousand_conversations_cost_each_rank_little_memory(tiny_llama, tmp_path):
    """60,000 conversations instead of 200 add <= 300 MB of peak RSS per rank (2 ranks): the rows stay in the
    memory-mapped Arrow cache, and plans read only its lengths column."""
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    conversations(small, 200)
    conversations(big, 60_000)
    base = peak_rss(tiny_llama, small, tmp_path / "out-small", tmp_path)
    large = peak_rss(tiny_llama, big, tmp_path / "out-big", tmp_path)
    growth = [b - a for a, b in zip(base, large)]
    print(f"peak RSS per rank: 200 conversations {base}, 60,000 {large}, growth {growth} MB")
    assert all(g <= 300 for g in growth), growth


@pytest.mark.parametrize("case", ["empty", "whitespace", "empty-array", "all-invalid", "no-glob-match", "empty-dir",
                                  "wrong-extension", "missing"])
def test_bad_data_files_stop_training_in_one_line(case, tiny_llama, tmp_path):
    path = {"empty": tmp_path / "e.jsonl", "whitespace": tmp_path / "w.jsonl", "empty-array": tmp_path / "a.json",
            "all-invalid": tmp_path / "bad.jsonl", "no-glob-match": tmp_path / "none*.jsonl",
            "empty-dir": tmp_path / "dir", "wrong-extension": tmp_path / "data.csv",
            "missing": tmp_path / "missing.jsonl"}[case]
    if case == "empty":
        path.write_text("")
    elif case == "whitespace":
        path.write_text("\n   \n\t\n")
    elif case == "empty-array":
        path.write_text("[]")
    elif case == "all-invalid":
        path.write_text('{"conversations": [{"from": "gpt", "value": "no question"}]}\n{"x": 1}\n')
    elif case == "empty-dir":
        path.mkdir()
    elif case == "wrong-extension":
        path.write_text("a,b\n")
    args = common(tiny_llama, tmp_path / "out", data_path=str(path), max_steps=1, on_bad_record="skip")
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "train.py"), *args], capture_output=True, text=True,
                          env={**ENV, "CHATTUNE_CACHE": str(tmp_path / "cache")}, cwd=ROOT, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
