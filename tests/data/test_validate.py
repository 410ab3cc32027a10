"""The bad-input matrix: every rule broken is reported with file, line/index, record id and the rule."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.formats import read_rows
from data.validate import DataError, ValidationOptions, load_conversations

GOOD = {"id": "ok", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}

# (jsonl line text, record id or None, expected substring of the problem)
BAD = [
    ('{"id": "x", "conversations": [', None, "malformed JSON"),
    ('["not", "an", "object"]', None, "record must be a JSON object"),
    ('{"id": "nofmt", "text": "hi"}', "nofmt", "exactly one of 'conversations'"),
    ('{"id": "both", "conversations": [], "messages": []}', "both", "exactly one of"),
    ('{"id": "noval", "conversations": [{"from": "human"}]}', "noval", "missing 'value'"),
    ('{"id": "typo", "conversations": [{"from": "human", "vaule": "hi", "value": "x"}]}', "typo", "unknown field(s) 'vaule'"),
    ('{"id": "role", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]}', "role", "unknown role 'robot'"),
    ('{"id": "num", "conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "x"}]}', "num", "content must be a string"),
    ('{"id": "empty", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}]}', "empty", "content is empty"),
    ('{"id": "noasst", "conversations": [{"from": "human", "value": "hi"}]}', "noasst", "no assistant reply"),
    ('{"id": "sys", "conversations": [{"from": "human", "value": "hi"}, {"from": "system", "value": "s"}, {"from": "gpt", "value": "x"}]}', "sys", "system message may only come first"),
    ('{"id": "dup", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "x"}]}', "dup", "two consecutive user turns"),
    ('{"id": "lead", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "x"}]}', "lead", "first turn is from the assistant"),
    ('{"id": "flag", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "x", "train": "yes"}]}', "flag", "'train' must be true or false"),
    ('{"id": "oai", "messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "x"}]}', "oai", "unknown role 'bot'"),
    ('{"id": "alp", "instruction": "do it"}', "alp", "missing 'output'"),
]


@pytest.fixture
def bad_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(GOOD)] + [line for line, _, _ in BAD]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_every_problem_names_file_line_id_and_rule(bad_jsonl):
    _, report = load_conversations(bad_jsonl, on_bad_record="skip")
    assert report.kept == 1 and len(report.skipped) == len(BAD)
    for k, ((_, rid, expected), problem) in enumerate(zip(BAD, report.skipped)):
        line = k + 2  # line 1 is the good record
        text = str(problem)
        assert text.startswith(f"{bad_jsonl}:{line}: "), text
        assert expected in text, text
        assert problem.record_id == rid
        if rid:
            assert text.endswith(f"({rid})")


def test_error_mode_raises_listing_all_problems(bad_jsonl):
    with pytest.raises(DataError) as err:
        load_conversations(bad_jsonl, on_bad_record="error")
    assert f"{len(BAD)} bad record(s)" in str(err.value)
    assert f"{bad_jsonl}:2: malformed JSON" in str(err.value)


def test_validate_cli_contract(bad_jsonl, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "data.validate", str(bad_jsonl)], capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(BAD)
    assert lines[-1] == f"{bad_jsonl}:{len(BAD) + 1}: Alpaca record is missing 'output' (alp)"
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(GOOD) + "\n")
    ok = subprocess.run([sys.executable, "-m", "data.validate", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout == ""


def test_json_array_reports_record_index(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, {"id": "b", "conversations": [{"from": "human", "value": "only"}]}]))
    _, report = load_conversations(path, on_bad_record="skip")
    assert str(report.skipped[0]) == f"{path}:1: no assistant reply to learn from (b)"


def test_malformed_json_file_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"id": "a",\n   "conversations": [}\n]')
    (row,) = list(read_rows(path))
    assert row.loc == 3 and "malformed JSON" in row.error


def test_fix_options_merge_and_drop_leading(tmp_path):
    path = tmp_path / "fix.jsonl"
    rec = {"id": "f", "conversations": [{"from": "gpt", "value": "greeting"}, {"from": "human", "value": "a"},
                                        {"from": "human", "value": "b"}, {"from": "gpt", "value": "x"}]}
    path.write_text(json.dumps(rec) + "\n")
    records, report = load_conversations(path, opts=ValidationOptions(merge_consecutive=True, drop_leading_assistant=True))
    assert records[0]["messages"] == [{"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "x"}]
    assert report.fixes == {"merged consecutive turns": 1, "dropped leading assistant turn": 1}


def test_formats_normalize_identically(tmp_path):
    sharegpt = {"id": "s", "system": "be brief", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    leading_system = {"id": "s", "conversations": [{"from": "system", "value": "be brief"}, {"from": "user", "value": "q"},
                                                   {"from": "chatgpt", "value": "a"}]}
    openai = {"id": "s", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"},
                                      {"role": "assistant", "content": "a"}]}
    alpaca = {"id": "s", "system": "be brief", "instruction": "q", "input": "", "output": "a"}
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in (sharegpt, leading_system)) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([openai]))
    pq.write_table(pa.Table.from_pylist([alpaca]), tmp_path / "c.parquet")
    records, _ = load_conversations(tmp_path)  # a directory
    assert len(records) == 4
    assert all(r["messages"] == records[0]["messages"] for r in records)
    assert len(load_conversations(str(tmp_path / "*.json*"))[0]) == 3  # a glob


def test_parquet_sharegpt_with_optional_fields(tmp_path):
    rows = [GOOD, {"id": "t", "system": "s", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "train": False}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    records, _ = load_conversations(tmp_path / "d.parquet")
    assert records[0]["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert records[1]["messages"][-1] == {"role": "assistant", "content": "a", "train": False}


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_conversations(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("case,content,problem", [
    ("empty.jsonl", "", "holds no records"),
    ("blank.jsonl", "\n  \n\t\n", "holds no records"),
    ("empty.json", "[]", "holds no records"),
    ("data.csv", "a,b\n", "unsupported file type"),
    ("none*.jsonl", None, "glob matches no"),
    ("dir", "DIR", "directory holds no"),
])
def test_files_without_data_fail_in_one_line(case, content, problem, tmp_path):
    path = tmp_path / case
    if content == "DIR":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "data.validate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and str(path) in proc.stderr and problem in proc.stderr


def test_a_file_of_only_invalid_records_is_an_error_even_when_skipping(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"x": 1}\n{"conversations": [{"from": "gpt", "value": "a"}]}\n')
    proc = subprocess.run([sys.executable, "-m", "data.validate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 1 and len(proc.stdout.strip().splitlines()) == 2  # each bad record, as usual
    assert "error: all 2 record(s) are invalid" in proc.stderr and f"{path}:1:" in proc.stderr
    with pytest.raises(ValueError, match="all 2 record"):
        load_conversations(path, "skip")


def test_an_unreadable_file_is_named(tmp_path, monkeypatch):
    import builtins

    path = tmp_path / "locked.jsonl"
    path.write_text(json.dumps(GOOD) + "\n")
    real_open = builtins.open

    def guarded(file, *a, **k):  # root ignores permission bits, so refuse the read the way the OS would
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", guarded)
    with pytest.raises(PermissionError, match=r"locked\.jsonl: cannot read the file \(permission denied\)"):
        load_conversations(path)
