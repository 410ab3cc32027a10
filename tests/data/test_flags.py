"""Issue 21 (6): data-layer messages name the calling entry point's flag, never training's from elsewhere."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from helpers import ROOT, tool, write

from data.flags import TRAINING_FLAGS, flag_name, given, suggest
from data.formats import Row, parse_source
from data.records import Tally, valid_records
from data.tokenize import tokenize_batch
from data.validate import ValidationOptions, normalize_row

CONSECUTIVE = {"id": "dup", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                                              {"from": "gpt", "value": "x"}]}
LEADING = {"id": "lead", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"},
                                           {"from": "gpt", "value": "x"}]}
UNDECLARED = {"id": "tool", "messages": [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                           "function": {"name": "calc", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "4"}, {"role": "assistant", "content": "4"}]}
CASES = [(CONSECUTIVE, "merge_consecutive", "to join them"), (LEADING, "drop_leading_assistant", "to drop such turns"),
         (UNDECLARED, "allow_undeclared_tools", "to accept it")]
EVAL_LIKE = {"merge_consecutive": "--merge-consecutive", "drop_leading_assistant": "--drop-leading-assistant",
             "allow_undeclared_tools": "--allow-undeclared-tools", "max_length": "--max-length", "mask": "--mask",
             "truncation": "--truncation", "data": "--data"}


def _problem(record: dict, opts: ValidationOptions | None = None) -> str:
    rec, problem = normalize_row(Row("f.jsonl", 1, record), opts)
    assert rec is None
    return problem.message


@pytest.mark.parametrize("record,option,effect", CASES)
def test_validation_suggests_the_callers_flag(record, option, effect):
    training = TRAINING_FLAGS[option]
    assert f"use {training} {effect}" in _problem(record)  # the default: training's spelling
    assert f"use {training} {effect}" in _problem(record, ValidationOptions())
    other = _problem(record, ValidationOptions(flags=EVAL_LIKE))
    assert f"use {EVAL_LIKE[option]} {effect}" in other and training not in other
    none = _problem(record, ValidationOptions(flags={}))  # an entry point without the flag
    assert f"the {option} option would" in none and "has no flag for it" in none and "--" not in none


def test_tokenize_and_source_messages_name_the_callers_flag(tokenizers):
    tok = tokenizers["smollm2"]
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    for kwargs, training, other in (({"max_length": 1}, "--model_max_length must be >= 2", "--max-length must be >= 2"),
                                    ({"mask": "odd"}, "--mask must be one of", "--mask must be one of"),
                                    ({"overflow": "odd"}, "--truncation must be one of", "--truncation must be one of"),
                                    ({"reasoning_history": "odd"}, "--reasoning_history must", "reasoning_history must")):
        with pytest.raises(ValueError, match=training):
            tokenize_batch([conv], tok, "chatml", **kwargs)
        with pytest.raises(ValueError) as e:
            tokenize_batch([conv], tok, "chatml", **kwargs, flags=EVAL_LIKE)
        assert str(e.value).startswith(other)
    with pytest.raises(ValueError, match=r"^--data_path x.jsonl:0: weight"):
        parse_source("x.jsonl:0")
    with pytest.raises(ValueError, match=r"^x.jsonl:0: weight"):
        parse_source("x.jsonl:0", {})


def test_flag_helpers_and_unknown_options():
    assert flag_name("max_length") == "--model_max_length" and flag_name("max_length", {}) == "max_length"
    assert given("data", "a.jsonl") == "--data_path a.jsonl" and given("data", "a.jsonl", {}) == "a.jsonl"
    assert suggest("mask", "x", {"mask": "--m"}) == "use --m to x"
    with pytest.raises(ValueError, match="maxlength"):
        ValidationOptions(flags={"maxlength": "--max-length"})  # a misspelt key would silently mean "no flag"


def test_scripts_name_their_own_flags_or_none(tmp_path):
    rows = [Row("f.jsonl", 1, CONSECUTIVE)]
    tally = Tally("t")
    assert valid_records(rows, tally) == []  # the scripts' shared helper: no validation flags by default
    (message,) = tally.examples.values()
    assert "merge_consecutive option would join them" in message and "--" not in message
    data = write(tmp_path / "in.jsonl", [CONSECUTIVE, LEADING], jsonl=True)
    out = tool("filter.py", "--in", data, "--out", tmp_path / "f.jsonl", "--report", tmp_path / "f.json").stdout
    assert "use --merge-consecutive to join them" in out and "use --drop-leading-assistant" in out
    assert "--merge_consecutive" not in out and "--drop_leading_assistant" not in out
    out = tool("convert.py", "--in", data, "--out", tmp_path / "c.jsonl", "--to", "openai").stdout
    assert "merge_consecutive option would join them" in out and "--merge" not in out
    report = json.loads((tmp_path / "f.json").read_text())  # the report file says the same
    assert any("use --merge-consecutive" in msg for msg in report["first_dropped"].values())


LIBRARY = ("toolcalls", "validate", "tokenize", "samples", "dataset", "formats", "records")


def test_library_modules_hard_code_no_training_flag():
    """Outside data/flags.py (and the argparse of a module's own CLI), no string names one of training's flags:
    every message asks the caller's mapping. `--template` is spelt alike by every entry point."""
    spellings = {f for o, f in TRAINING_FLAGS.items() if o != "template"}
    for name in LIBRARY:
        tree = ast.parse(Path(ROOT / "data" / f"{name}.py").read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, ast.Module | ast.FunctionDef | ast.ClassDef) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        cli = {id(c) for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "add_argument"
               for c in ast.walk(n)}
        cli |= {id(c) for n in ast.walk(tree) if isinstance(n, ast.Assign) and any(
            getattr(t, "id", "").endswith("_FLAGS") for t in n.targets) for c in ast.walk(n)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings | cli:
                named = [f for f in spellings if f in node.value]
                assert not named, f"data/{name}.py:{node.lineno} names {named}: {node.value!r}"
