"""`python -m data.inspect` shows coloured tokens and whole-file stats."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from data.inspect import histogram

DEMO = Path(__file__).resolve().parents[2] / "data" / "demo" / "chattune_demo.jsonl"


def test_inspect_cli_shows_tokens_and_stats(tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [{"id": "a", "conversations": [{"from": "human", "value": "Who are you?"}, {"from": "gpt", "value": "I am Chattune-Demo."}]},
            {"id": "b", "conversations": [{"from": "human", "value": "q"}]}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    proc = subprocess.run([sys.executable, "-m", "data.inspect", "--data", str(data), "--tokenizer", "asset:smollm2",
                           "--template", "chatml"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "record 0 — id a" in out and "Chattune-Demo" in out
    assert "skipped 1 × no-assistant" in out
    assert "conversations 1  samples 1" in out and "length histogram" in out


def test_inspect_bad_index_and_bad_template(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "data.inspect", "--data", str(DEMO), "--tokenizer", "asset:smollm2",
                           "--template", "chatml", "--index", "99999"], capture_output=True, text=True)
    assert proc.returncode == 1 and "--index 99999 is out of range" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "data.inspect", "--data", str(DEMO), "--tokenizer", "asset:smollm2",
                           "--template", "chatmlx"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--template" in proc.stderr


def test_histogram_counts_every_sample():
    lines = histogram([10, 11, 12, 50, 99], bins=4)
    assert sum(int(line.split()[-1]) for line in lines) == 5
