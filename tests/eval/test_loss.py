"""eval.loss: assistant-token loss with training's masking, per turn, streaming, multi-rank."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import DEMO, ENV, ROOT, common, free_port, losses, run

from data.tokenize import IGNORE_INDEX, tokenize_conversation
from data.validate import load_conversations

CONVS = [
    {"id": "a", "system": "Be brief.", "conversations": [
        {"from": "human", "value": "Who are you?"}, {"from": "gpt", "value": "A small test model."},
        {"from": "human", "value": "And what can you do?"}, {"from": "gpt", "value": "Not much, honestly."}]},
    {"id": "b", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello! How can I help?"}]},
    {"id": "c", "conversations": [
        {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}, {"from": "human", "value": "3+3?"},
        {"from": "gpt", "value": "6"}, {"from": "human", "value": "and 4+4?"}, {"from": "gpt", "value": "8, of course."}]},
]


def _loss(*args: str, nproc: int | None = None) -> subprocess.CompletedProcess:
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}", "-m",
            "eval.loss"] if nproc else [sys.executable, "-m", "eval.loss"])
    return subprocess.run(cmd + list(args), capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)


@pytest.fixture
def heldout(tmp_path):
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in CONVS))
    return path


def _reference(model_dir: str, path, template: str = "chatml") -> tuple[float, dict[int, float]]:
    """Loss from transformers' own shifted loss per conversation, and per turn by masking all other turns."""
    from data.tokenizer import load_tokenizer
    from train.modeling import load_causal_lm

    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir).eval()
    total, count = 0.0, 0
    per_turn: dict[int, list[float]] = {}
    for rec in load_conversations(str(path))[0]:
        enc = tokenize_conversation(rec["messages"], tok, template)
        ids, labels = torch.tensor([enc["input_ids"]]), torch.tensor([enc["labels"]])
        # contiguous supervised runs are the assistant turns, in order
        runs, prev = [], False
        for i, lab in enumerate(enc["labels"]):
            sup = lab != IGNORE_INDEX
            if sup and not prev:
                runs.append([])
            if sup:
                runs[-1].append(i)
            prev = sup
        with torch.no_grad():
            n = (labels[0, 1:] != IGNORE_INDEX).sum().item()
            total += model(input_ids=ids, labels=labels).loss.item() * n
            count += n
            for k, positions in enumerate(runs, start=1):
                only = torch.full_like(labels, IGNORE_INDEX)
                only[0, positions] = labels[0, positions]
                per_turn.setdefault(k, []).extend([model(input_ids=ids, labels=only).loss.item()] * len(positions))
    return total / count, {k: sum(v) / len(v) for k, v in per_turn.items()}


def test_loss_equals_transformers_loss_overall_and_per_turn(tiny_llama, heldout, tmp_path):
    out = tmp_path / "loss.json"
    proc = _loss("--model-path", tiny_llama, "--template", "chatml", "--data", str(heldout), "--batch-size", "2",
                 "--output", str(out), "--per-sample-output", str(tmp_path / "per.jsonl"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    overall, per_turn = _reference(tiny_llama, heldout)
    assert figures["overall"]["loss"] == pytest.approx(overall, rel=1e-5)
    assert set(figures["per_turn"]) == {"1", "2", "3"}
    for k, loss in per_turn.items():
        assert figures["per_turn"][str(k)]["loss"] == pytest.approx(loss, rel=1e-5)
    assert [figures["per_turn"][k]["conversations"] for k in ("1", "2", "3")] == [3, 2, 1]
    assert sum(t["tokens"] for t in figures["per_turn"].values()) == figures["overall"]["tokens"]
    per = [json.loads(x) for x in (tmp_path / "per.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in per) == ["a", "b", "c"]
    assert "turn 3:" in proc.stdout


def test_bad_records_are_named_or_skipped_and_counted(tiny_llama, heldout, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(heldout.read_text() + '{"id": "z", "conversations": [{"from": "gpt", "value": "no question"}]}\n')
    proc = _loss("--model-path", tiny_llama, "--template", "chatml", "--data", str(bad))
    assert proc.returncode == 1 and f"{bad}:4" in proc.stderr and "Traceback" not in proc.stderr
    out = tmp_path / "l.json"
    proc = _loss("--model-path", tiny_llama, "--template", "chatml", "--data", str(bad), "--on-bad-record", "skip",
                 "--output", str(out))
    assert proc.returncode == 0 and "skipped 1" in proc.stdout
    assert json.loads(out.read_text())["skipped_records"] == 1


@pytest.mark.slow
def test_matches_training_eval_loss_and_is_rank_independent(tiny_llama, tmp_path):
    """The loss of the exported model equals the eval_loss train.py logged at the last step (same data,
    same masking and truncation); two ranks give the same figures as one; an adapter and its merged
    model give the same loss."""
    for mode, extra in (("full", {"save_dtype": "fp32"}), ("lora", {"lora": True})):
        d = tmp_path / mode
        run("train.py", common(tiny_llama, d, max_steps=2, per_device_train_batch_size=2, save_strategy="no",
                               eval_data_path=DEMO, evaluation_strategy="steps", eval_steps=2, **extra))
        logged = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        eval_loss = [r["eval_loss"] for r in logged if "eval_loss" in r][-1]
        assert losses(d)  # it trained
        single = tmp_path / f"{mode}-1.json"
        proc = _loss("--model-path", str(d), "--data", DEMO, "--max-length", "96", "--output", str(single))
        assert proc.returncode == 0, proc.stderr[-3000:]
        figures = json.loads(single.read_text())
        assert figures["overall"]["loss"] == pytest.approx(eval_loss, rel=1e-4)
        if mode == "lora":  # the same adapter merged into a standalone model by scripts/merge_lora.py
            merged = tmp_path / "merged"
            subprocess.run([sys.executable, str(ROOT / "scripts" / "merge_lora.py"), "--adapter", str(d), "--output",
                            str(merged), "--dtype", "fp32"], check=True, capture_output=True, env=ENV, cwd=ROOT)
            proc = _loss("--model-path", str(merged), "--data", DEMO, "--max-length", "96", "--output",
                         str(tmp_path / "merged.json"))
            assert proc.returncode == 0, proc.stderr[-3000:]
            merged_loss = json.loads((tmp_path / "merged.json").read_text())["overall"]["loss"]
            assert merged_loss == pytest.approx(figures["overall"]["loss"], rel=1e-4)
        if mode == "full":
            double = tmp_path / "full-2.json"
            proc = _loss("--model-path", str(d), "--data", DEMO, "--max-length", "96", "--output", str(double), nproc=2)
            assert proc.returncode == 0, proc.stderr[-3000:]
            two = json.loads(double.read_text())
            assert two["overall"]["tokens"] == figures["overall"]["tokens"]
            assert two["overall"]["loss"] == pytest.approx(figures["overall"]["loss"], rel=1e-6)
            assert two["per_turn"].keys() == figures["per_turn"].keys()
            for k in figures["per_turn"]:
                assert two["per_turn"][k]["loss"] == pytest.approx(figures["per_turn"][k]["loss"], rel=1e-6)


@pytest.mark.slow
def test_gguf_model(heldout, tmp_path):
    """A .gguf model (the SmolLM2 asset, dequantized once) with its own chat template."""
    out = tmp_path / "l.json"
    proc = _loss("--model-path", "asset:smollm2", "--data", str(heldout), "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["template"] == "tokenizer" and 0 < figures["overall"]["loss"] < 10  # a trained model, not random
    assert figures["per_turn"]["1"]["conversations"] == 3
