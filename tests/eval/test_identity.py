"""eval.identity: fact and format scoring, and before/after on a tiny model fine-tuned by train.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ENV, ROOT

from eval.identity import DEFAULT_SPEC, load_spec, score_answer


def test_scoring_rules():
    assert score_answer("I am Chattune-Demo.", "stop", ["chattune-demo"]) == {
        "correct": True, "well_formed": True, "problems": []}
    assert score_answer("I am Chattune-Demo", "stop", ["Chattune-Demo", "chattune project"])["correct"] is False
    cut = score_answer("I am Chattune-Demo and", "length", ["Chattune-Demo"])
    assert cut["correct"] and not cut["well_formed"] and cut["problems"] == ["cut at max tokens"]
    leak = score_answer("Sure.<|im_start|>user", "stop", ["x"])
    assert leak["problems"] == ["template markup <|im_start|>"]
    assert score_answer("", "stop", ["x"])["problems"] == ["empty"]


def test_spec_validation(tmp_path):
    items = load_spec(DEFAULT_SPEC)
    assert len(items) >= 5 and any("Chattune-Demo" in i["expect"] for i in items)
    bad = tmp_path / "spec.json"
    bad.write_text(json.dumps({"items": [{"question": "q", "expect": []}]}))
    with pytest.raises(ValueError, match=r"items\[0\] needs a 'question' string and a non-empty 'expect'"):
        load_spec(bad)


@pytest.mark.slow
def test_before_and_after_fine_tuning(tiny_llama, constant_reply_model, tmp_path):
    """The random base knows nothing; the model fine-tuned (by train.py) to always answer one sentence
    states it for held-out questions, well formed (ended by its end-of-turn, no markup)."""
    model, reply = constant_reply_model
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"items": [{"question": "Please tell me who you are.", "expect": ["[[A]]"]},
                                          {"question": "What are you called?", "expect": ["[[a]]", "7/10"]}]}))
    scores = {}
    for name, args in (("before", [tiny_llama, "--conv-template", "chatml"]), ("after", [model])):
        report = tmp_path / f"{name}.json"
        proc = subprocess.run([sys.executable, "-m", "eval.identity", "--model-path", *args, "--spec", str(spec),
                               "--max-new-tokens", "24", "--output", str(report)], capture_output=True, text=True,
                              env=ENV, cwd=ROOT, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        scores[name] = json.loads(report.read_text())
    assert scores["before"]["correct"] == 0
    assert scores["after"]["correct"] == scores["after"]["well_formed"] == 2
    assert scores["after"]["items"][0]["answer"] == reply
