"""Tool-use and reasoning records through the data tools: convert both ways, split without separating a call from
its result, stats token shares, and `data.inspect --dump` (every sample of every record)."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import ENV, ROOT, read, tool, write

from data.validate import load_conversations

TOOLS = [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}]


def agent_record(rid: str, steps: int = 1) -> dict:
    msgs = [{"role": "system", "content": "Use tools."}]
    for s in range(steps):
        msgs += [{"role": "user", "content": f"What is {s}+{s}? " + "Explain carefully. " * 6},
                 {"role": "assistant", "content": None, "reasoning_content": f"Need calc for {s}.",
                  "tool_calls": [{"id": f"c{s}a", "type": "function", "function": {"name": "calc", "arguments": json.dumps({"expr": f"{s}+{s}"})}},
                                 {"id": f"c{s}b", "type": "function", "function": {"name": "calc", "arguments": "{}"}}]},
                 {"role": "tool", "tool_call_id": f"c{s}a", "content": str(2 * s)},
                 {"role": "tool", "tool_call_id": f"c{s}b", "content": "0"},
                 {"role": "assistant", "content": f"<think>It is {2 * s}.</think>\n\nThe answer is {2 * s}."}]
    return {"id": rid, "tools": TOOLS, "messages": msgs}


def test_convert_round_trips_tools_between_openai_and_sharegpt(tmp_path):
    rec = agent_record("a", 2)
    rec["messages"][8], rec["messages"][9] = rec["messages"][9], rec["messages"][8]  # results out of call order
    src = write(tmp_path / "oai.jsonl", [rec], jsonl=True)
    tool("convert.py", "--in-file", src, "--out-file", tmp_path / "sg.json", "--to", "sharegpt")
    (sg,) = read(tmp_path / "sg.json")
    assert [t["from"] for t in sg["conversations"]][:5] == ["human", "gpt", "function_call", "observation", "gpt"]
    assert json.loads(sg["tools"]) == TOOLS and json.loads(sg["conversations"][3]["value"]) == ["0", "0"]
    tool("convert.py", "--in-file", tmp_path / "sg.json", "--out-file", tmp_path / "back.jsonl", "--to", "openai")
    (back,) = read(tmp_path / "back.jsonl")
    assert back["messages"][2]["tool_calls"][0]["function"]["arguments"] == json.dumps({"expr": "0+0"})  # OpenAI: a string
    original, _ = load_conversations(src)
    again, _ = load_conversations(tmp_path / "back.jsonl")
    def by_call(msgs):  # each result with the call it answers (ShareGPT writes them in the calls' order)
        ids = {c["id"]: c["function"] for m in msgs for c in m.get("tool_calls", [])}
        return sorted((json.dumps(ids[m["tool_call_id"]], sort_keys=True), m["content"], m["name"])
                      for m in msgs if m["role"] == "tool")

    assert by_call(original[0]["messages"]) == by_call(again[0]["messages"])
    strip = [{k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id", "name")}
             for m in original[0]["messages"] if m["role"] != "tool"]
    assert strip == [{k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id", "name")}
                     for m in again[0]["messages"] if m["role"] != "tool"]
    assert again[0]["tools"] == TOOLS
    proc = tool("convert.py", "--in-file", src, "--out-file", tmp_path / "alp.json", "--to", "alpaca")
    assert "tool calls cannot be written as Alpaca" in proc.stdout


def test_split_long_conversation_keeps_calls_with_their_results(tmp_path):
    src = write(tmp_path / "long.jsonl", [agent_record("x", 4)], jsonl=True)
    tool("split_long_conversation.py", "--in-file", src, "--out-file", tmp_path / "split.json",
         "--tokenizer", "asset:qwen2", "--template", "qwen2.5", "--max-length", "330")
    parts = read(tmp_path / "split.json")
    assert len(parts) > 1
    records, report = load_conversations(tmp_path / "split.json")  # every part is valid: no orphan result
    assert report.kept == len(parts) and all(r["tools"] == TOOLS for r in records)
    roles = [m["role"] for r in records for m in r["messages"] if m["role"] != "system"]
    original, _ = load_conversations(src)
    assert roles == [m["role"] for m in original[0]["messages"] if m["role"] != "system"]  # no turn lost


def test_stats_reports_reasoning_tool_call_and_result_shares(tmp_path):
    src = write(tmp_path / "a.jsonl", [agent_record("a", 2)], jsonl=True)
    tool("stats.py", "--in-file", src, "--tokenizer", "asset:qwen2", "--template", "qwen3", "--json", tmp_path / "s.json")
    figures = json.loads((tmp_path / "s.json").read_text())
    shares = figures["token_shares"]
    assert all(shares[k] > 0.02 for k in ("reasoning", "tool_call", "tool_result"))
    assert figures["samples"] == 2  # qwen3 drops the first exchange's reasoning later: it gets its own sample


def test_inspect_dump_writes_every_sample_of_every_record(tmp_path):
    from data.tokenize import tokenize_batch
    from data.tokenizer import load_tokenizer

    bad = {"id": "bad", "messages": [{"role": "user", "content": "only"}]}
    src = write(tmp_path / "a.jsonl", [agent_record("a", 2), bad, agent_record("b", 1)], jsonl=True)
    dump = tmp_path / "dump.jsonl"
    proc = subprocess.run([sys.executable, "-m", "data.inspect", "--data", str(src), "--tokenizer", "asset:qwen2",
                           "--template", "qwen3", "--reasoning", "mask", "--dump", str(dump)],
                          capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "token shares: reasoning" in proc.stdout and "became several samples" in proc.stdout
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [r["record"] for r in rows] == [0, 0, 2]  # positions in the file; the invalid record 1 has none
    records, _ = load_conversations(src, "skip")
    want = [ex for res in tokenize_batch(records, load_tokenizer("asset:qwen2"), "qwen3", reasoning="mask")
            for ex in res.samples]
    assert [(r["input_ids"], r["labels"]) for r in rows] == [(ex.input_ids, ex.labels) for ex in want]
