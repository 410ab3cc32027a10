"""eval.loss: assistant-token loss with training's masking, per turn, streaming, multi-rank."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    held = tmp_path / "held.jsonl"  # 48 of the demo's conversations: each figure below is one more pass over them
    held.write_text("".join(Path(DEMO).read_text().splitlines(keepends=True)[:48]))
    from eval.loss import main as loss_main
    from scripts.merge_lora import main as merge_main

    def loss_in_process(model: Path, out: Path) -> dict:  # eval.loss's entry point; the two-rank run is a command
        assert loss_main(["--model-path", str(model), "--data", str(held), "--max-length", "96", "--output", str(out)]) == 0
        return json.loads(out.read_text())

    for mode, extra in (("full", {"save_dtype": "fp32"}), ("lora", {"lora": True})):
        d = tmp_path / mode
        run("train.py", common(tiny_llama, d, max_steps=2, per_device_train_batch_size=2, save_strategy="no",
                               eval_data_path=str(held), evaluation_strategy="steps", eval_steps=2, **extra))
        logged = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        eval_loss = [r["eval_loss"] for r in logged if "eval_loss" in r][-1]
        assert losses(d)  # it trained
        figures = loss_in_process(d, tmp_path / f"{mode}-1.json")
        assert figures["overall"]["loss"] == pytest.approx(eval_loss, rel=1e-4)
        if mode == "lora":  # the same adapter merged into a standalone model by scripts/merge_lora.py
            merged = tmp_path / "merged"
            assert merge_main(["--adapter", str(d), "--output", str(merged), "--dtype", "fp32"]) == 0
            merged_loss = loss_in_process(merged, tmp_path / "merged.json")["overall"]["loss"]
            assert merged_loss == pytest.approx(figures["overall"]["loss"], rel=1e-4)
        if mode == "full":
            double = tmp_path / "full-2.json"
            proc = _loss("--model-path", str(d), "--data", str(held), "--max-length", "96", "--output", str(double), nproc=2)
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


# --- issue 21 (6): eval scores what training scored; messages name eval's own flags ----------------------------------

MERGE_ME = {"id": "d", "conversations": [{"from": "human", "value": "Hi there."},
                                         {"from": "human", "value": "Are you awake?"},
                                         {"from": "gpt", "value": "Yes, I am here and ready to help you."}]}
RECORDED_FLAGS = {"template": "chatml", "mask": "last", "model_max_length": 40, "truncation": "truncate",
                  "merge_consecutive": True, "drop_leading_assistant": False, "allow_undeclared_tools": False,
                  "reasoning": "train", "reasoning_history": "expand", "on_bad_record": "error"}


@pytest.fixture
def trained_dir(tiny_llama, tmp_path):
    """The tiny model as a training run leaves it: weights, tokenizer and a chattune.json (run_record's layout)."""
    import shutil

    d = tmp_path / "run"
    shutil.copytree(tiny_llama, d)
    (d / "chattune.json").write_text(json.dumps({
        "format_version": 1, "template": "chatml", "mode": "full", "max_length": 40, "mask": "last",
        "reasoning": "train", "flags": RECORDED_FLAGS}))
    data = tmp_path / "heldout-merge.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in [*CONVS, MERGE_ME]))
    return d, data


def _supervised_count(model_dir, data, mask: str, max_length: int | None, merge: bool = True) -> int:
    """The shifted supervised-token count training's data code gives these options."""
    from data.tokenize import tokenize_batch
    from data.tokenizer import load_tokenizer
    from data.validate import ValidationOptions

    records, _ = load_conversations(str(data), opts=ValidationOptions(merge_consecutive=merge))
    results = tokenize_batch(records, load_tokenizer(str(model_dir)), "chatml", max_length, mask)
    return sum(sum(lab != IGNORE_INDEX for lab in ex.labels[1:]) for res in results for ex in res.samples)


def _eval_in_process(capsys, *args: str) -> tuple[int, str, str]:
    from eval.loss import main

    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_recorded_mask_length_and_validation_are_used_unless_a_flag_overrides(trained_dir, tmp_path, capsys):
    d, data = trained_dir
    recorded = _supervised_count(d, data, "last", 40)
    overridden = _supervised_count(d, data, "assistant", 1024)
    # each recorded option changes what is scored, so the figures below tell them apart
    assert len({recorded, _supervised_count(d, data, "assistant", 40), _supervised_count(d, data, "last", 1024),
                overridden}) == 4
    out = tmp_path / "recorded.json"
    rc, stdout, stderr = _eval_in_process(capsys, "--model-path", str(d), "--data", str(data), "--output", str(out))
    assert rc == 0, stderr
    figures = json.loads(out.read_text())
    assert figures["overall"]["tokens"] == recorded  # mask last, max_length 40, merged consecutive user turns
    assert figures["records"] == 4 and figures["skipped_records"] == 0
    assert figures["options"]["mask"] == "last" and figures["options"]["max_length"] == 40
    line = next(x for x in stdout.splitlines() if x.startswith("[eval] options"))
    assert f"from {d / 'chattune.json'}: mask=last, max_length=40" in line and "merge_consecutive=True" in line
    assert "from flags" not in line

    out = tmp_path / "overridden.json"
    rc, stdout, stderr = _eval_in_process(capsys, "--model-path", str(d), "--data", str(data), "--mask", "assistant",
                                          "--max-length", "1024", "--output", str(out))
    assert rc == 0, stderr
    figures = json.loads(out.read_text())
    assert figures["overall"]["tokens"] == overridden
    assert figures["options_from"]["mask"] == "flag" and figures["options_from"]["merge_consecutive"] == "chattune.json"
    line = next(x for x in stdout.splitlines() if x.startswith("[eval] options"))
    assert "from flags: --mask assistant --max-length 1024" in line and "mask=last" not in line


def test_resolve_options_precedence_and_unusable_records():
    from eval.loss import parse_args, resolve_options

    args = parse_args(["--model-path", "m", "--data", "x", "--mask", "all", "--no-merge-consecutive"])
    record = {"mask": "assistant", "max_length": 77, "reasoning": "mask",
              "flags": {"mask": "last", "truncation": "split", "merge_consecutive": True, "reasoning": None}}
    opts, source, notes = resolve_options(args, record)
    assert opts["mask"] == "all" and source["mask"] == "flag"  # a flag beats the record
    assert opts["merge_consecutive"] is False and source["merge_consecutive"] == "flag"  # --no-... overrides True
    assert opts["max_length"] == 77 and source["max_length"] == "chattune.json"  # top-level key, older records
    assert opts["reasoning"] == "mask"  # flags' null falls back to the top-level key
    assert opts["truncation"] == "truncate" and "split" in notes[0]  # scored as training scored its eval set
    assert opts["reasoning_history"] == "expand" and source["reasoning_history"] == "default"
    for bad in ({"flags": {"mask": "odd"}}, {"flags": {"model_max_length": 1}}, {"flags": {"merge_consecutive": "yes"}}):
        with pytest.raises(ValueError, match="pass --"):
            resolve_options(parse_args(["--model-path", "m", "--data", "x"]), bad)


def test_data_errors_name_eval_flags_not_trainings(trained_dir, capsys):
    d, data = trained_dir
    rc, _, stderr = _eval_in_process(capsys, "--model-path", str(d), "--data", str(data), "--no-merge-consecutive")
    assert rc == 1 and f"{data}:4" in stderr
    assert "use --merge-consecutive to join them" in stderr and "--merge_consecutive" not in stderr
    rc, _, stderr = _eval_in_process(capsys, "--model-path", str(d), "--data", str(data), "--max-length", "1")
    assert rc == 1 and "--max-length must be >= 2" in stderr and "--model_max_length" not in stderr


def test_training_names_its_own_flags_for_the_same_record(tiny_llama, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(MERGE_ME) + "\n")
    args = common(tiny_llama, tmp_path / "out", data_path=str(data), max_steps=1)
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "train.py"), *args], capture_output=True, text=True,
                          env={**ENV, "CHATTUNE_CACHE": str(tmp_path / "cache")}, cwd=ROOT, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "use --merge_consecutive to join them" in proc.stderr and "--merge-consecutive" not in proc.stderr
