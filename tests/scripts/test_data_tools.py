"""The data tools in scripts/, run as a user runs them, on small fixture files written here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ENV, ROOT, read, tool, write

from data.validate import load_conversations


def conv(cid, *turns, **extra) -> dict:
    froms = ["human", "gpt"]
    return {"id": cid, "conversations": [{"from": froms[i % 2], "value": t} for i, t in enumerate(turns)], **extra}


def test_clean_sharegpt(tmp_path):
    html = ('<div><p>Use <code>print</code>:</p><pre><div><div><span>python</span><button>Copy code</button></div>'
            '<div><code class="language-python">print("hi")\n</code></div></div></pre></div>')
    raw_records = [
        conv("1", "How do I print?", html),
        {"id": "2", "conversations": [{"from": "gpt", "value": "Hello"}, {"from": "user", "value": "hi"},
                                      {"from": "chatgpt", "value": "Hi there!"}, {"from": "human", "value": "bye"}]},
        conv("1", "same id", "other content"),
        conv("3", "hi", "Hi there!"),  # same content as 2 after cleaning
        {"id": "4", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                                      {"from": "gpt", "value": "cc"}]},
        conv("5", "question", ""),
        conv("6", "question", "k"),
        {"id": "7", "messages": []},
        conv("8", "Fix this:", "```\npythonCopy code\nx = 1\n"),
        conv("9", "What does <b>bold</b> do in <div> tags?", "It makes text bold; `<b>` is an inline tag."),
    ]
    raw = write(tmp_path / "raw.json", raw_records)
    out = tmp_path / "clean.json"
    proc = tool("clean_sharegpt.py", "--in-file", raw, "--out-file", out, "--report", tmp_path / "r.json")
    kept = {r["id"]: r for r in read(out)}
    assert sorted(kept) == ["1", "2", "8", "9"]
    assert kept["9"]["conversations"] == raw_records[-1]["conversations"]  # talk about HTML is not converted
    reply = kept["1"]["conversations"][1]["value"]
    assert "<" not in reply and "Use `print`:" in reply and '```python\nprint("hi")\n```' in reply
    assert [t["from"] for t in kept["2"]["conversations"]] == ["human", "gpt"]  # leading gpt and trailing human gone
    assert kept["8"]["conversations"][1]["value"] == "```python\nx = 1\n```"  # header fixed, fence closed
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["read"] == 10 and report["kept"] == 4
    assert report["dropped"] == {"duplicate id": 1, "duplicate content": 1, "roles do not alternate human/gpt": 1,
                                 "empty turn": 1, "reply shorter than 2 characters": 1,
                                 "not a ShareGPT record (no 'conversations' list)": 1}
    assert report["fixed"]["HTML converted to markdown"] == 1
    assert f"{raw}:2 (1)" in proc.stdout  # the duplicate is named by file and record
    load_conversations(str(out))  # the output is valid training data


def test_split_long_conversation_loses_no_turn(tmp_path, tokenizers):
    from data.tokenize import tokenize_conversation
    from data.validate import load_conversations as load

    records = [conv(f"c{i}", *[f"{'question ' * (5 + 7 * j)}{j}" if j % 2 == 0 else f"{'answer ' * (9 + 11 * j)}{j}"
                               for j in range(2 * n)], system="Be nice.") for i, n in enumerate([1, 3, 6, 9])]
    records.append(conv("huge", "x " * 400, "y"))
    src = write(tmp_path / "long.jsonl", records, jsonl=True)
    out = tmp_path / "split.jsonl"
    proc = tool("split_long_conversation.py", "--in-file", src, "--out-file", out, "--tokenizer", "asset:llama-spm",
                "--template", "vicuna_v1.1", "--max-length", "128", "--report", tmp_path / "r.json")
    parts = read(out)
    by_origin: dict[str, list] = {}
    for p in parts:
        by_origin.setdefault(p.get("split_from", p["id"]), []).append(p)
    for original in records:  # every turn of every conversation, in order, across its parts
        ordered = sorted(by_origin[original["id"]], key=lambda p: int(p["id"].rsplit("_", 1)[1]) if "_" in p["id"] else 0)
        got = [t for p in ordered for t in p["conversations"]]
        assert got == original["conversations"]
    assert all(p.get("system") == "Be nice." for p in parts if p["id"].startswith("c"))
    assert all(p["split_from"] == p["id"].rsplit("_", 1)[0] for p in parts if "_" in p["id"])
    tok = tokenizers["llama-spm"]
    msgs = {r["id"]: r["messages"] for r in load(str(out))[0]}
    lengths = {pid: len(tokenize_conversation(m, tok, "vicuna_v1.1")["input_ids"]) for pid, m in msgs.items()}
    over = [pid for pid, n in lengths.items() if n > 128]
    # only single exchanges that cannot be split at a turn boundary are left over the limit
    assert "huge" in over and all(len([m for m in msgs[pid] if m["role"] != "system"]) == 2 for pid in over)
    assert len(over) < len(parts) and "c3_2" in msgs
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["fixed"]["single exchanges longer than 128 tokens kept whole"] == len(over)
    assert report["kept"] == len(parts) and "conversations split" in proc.stdout


def test_filter_language_regex_length_and_roles(tmp_path):
    src = write(tmp_path / "in.jsonl", [
        conv("en", "What is the weather like today in the city?", "It is sunny and warm, a lovely day for a walk."),
        conv("fr", "Quel temps fait-il aujourd'hui dans la ville ?", "Il fait beau et chaud, une belle journée."),
        conv("de", "Wie ist das Wetter heute in der Stadt?", "Es ist sonnig und warm, ein schöner Tag."),
        conv("ai", "Tell me a joke about the weather.", "As an AI language model, I cannot tell jokes about weather."),
        conv("long", "Tell me a very long story about the weather please.", "word " * 400),
        {"id": "bad", "conversations": [{"from": "gpt", "value": "I start the conversation without a question."}]},
        conv("one", "Just a question about the weather today?"),
    ], jsonl=True)
    out = tmp_path / "out.jsonl"
    tool("filter.py", "--in-file", src, "--out-file", out, "--lang", "en", "--drop-regex", "(?i)as an ai language model",
         "--max-chars", "1000", "--report", tmp_path / "r.json")
    assert [r["id"] for r in read(out)] == ["en"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["dropped"] == {"language fr": 1, "language de": 1,
                                 "matches --drop-regex (?i)as an ai language model": 1,
                                 "more than 1000 characters": 1, "invalid (leading-assistant)": 1,
                                 "invalid (no-assistant)": 1}
    tool("filter.py", "--in-file", src, "--out-file", out, "--skip-lang", "fr", "de", "--keep-regex", "weather",
         "--tokenizer", "asset:llama-spm", "--template", "vicuna_v1.1", "--max-tokens", "200")
    assert [r["id"] for r in read(out)] == ["en", "ai"]
    bad = tool("filter.py", "--in-file", src, "--out-file", out, "--drop-regex", "(unclosed", check=False)
    assert bad.returncode == 1 and "--drop-regex '(unclosed': not a valid regular expression" in bad.stderr


def test_dedup_exact_and_near(tmp_path):
    import random

    rng = random.Random(0)
    vocab = [f"word{i}" for i in range(300)]
    base = " ".join(rng.choice(vocab) for _ in range(100)) + " warm"
    src = write(tmp_path / "in.json", [
        conv("a", "Tell me a story.", base),
        conv("b", "tell me a   STORY.", base.upper()),  # exact after normalization
        conv("c", "Tell me a story.", base.replace("warm", "hot")),  # near
        conv("d", "Explain photosynthesis.", "Plants turn light, water and carbon dioxide into sugar and oxygen."),
        conv("e", "Explain photosynthesis.", "A completely different answer about chlorophyll and sunlight energy."),
    ])
    out = tmp_path / "out.json"
    tool("dedup.py", "--in-file", src, "--out-file", out, "--clusters-file", tmp_path / "c.json", "--report",
         tmp_path / "r.json")
    assert [r["id"] for r in read(out)] == ["a", "d", "e"]
    assert json.loads((tmp_path / "c.json").read_text()) == {"b": "a", "c": "a"}
    assert json.loads((tmp_path / "r.json").read_text())["dropped"] == {
        "exact duplicate": 1, "near duplicate (Jaccard >= 0.8)": 1}
    tool("dedup.py", "--in-file", src, "--out-file", out, "--on", "user", "--mode", "exact")
    assert [r["id"] for r in read(out)] == ["a", "d"]  # same prompts, whatever the answers


def test_split_train_test_keeps_parts_together(tmp_path):
    records = [conv(f"c{i}_{k}", "q", "a", split_from=f"c{i}") for i in range(20) for k in range(3)]
    records += [conv("solo", "q", "a")] + [conv(f"identity_{i}", "q", "a") for i in range(4)]  # not parts: no split_from
    src = write(tmp_path / "data.json", records)
    tool("split_train_test.py", "--in-file", src, "--ratio", "0.2", "--seed", "3")
    train, test = read(tmp_path / "data_train.json"), read(tmp_path / "data_test.json")
    assert len(train) + len(test) == len(records)
    origin = lambda r: r.get("split_from", r["id"])  # noqa: E731
    assert not {origin(r) for r in train} & {origin(r) for r in test}
    assert len({origin(r) for r in test}) == 5  # 25 groups (20 split conversations + 5 plain records) × 0.2
    tool("split_train_test.py", "--in-file", src, "--ratio", "0.2", "--seed", "3", "--train-file",
         tmp_path / "t2.json", "--test-file", tmp_path / "e2.json")
    assert read(tmp_path / "e2.json") == test  # reproducible
    tool("split_train_test.py", "--in-file", src, "--test-size", "5", "--no-group-parts", "--train-file",
         tmp_path / "t3.json", "--test-file", tmp_path / "e3.json")
    assert len(read(tmp_path / "e3.json")) == 5


def test_merge_sample_and_convert(tmp_path):
    a = write(tmp_path / "a.json", [conv("x", "q1", "a1"), conv("y", "q2", "a2")])
    b = write(tmp_path / "b.jsonl", [conv("x", "q3", "a3"), conv("y", "q2", "a2"),
                                     {"id": "z", "instruction": "Add 2 and 2.", "input": "", "output": "4"}], jsonl=True)
    out = tmp_path / "merged.json"
    proc = tool("merge.py", "--in-file", a, b, "--out-file", out)
    assert [r["id"] for r in read(out)] == ["x", "y", "x#2", "z"]
    assert "exact copy of an earlier record" in proc.stdout and "duplicate id renamed" in proc.stdout
    bad = tool("merge.py", "--in-file", a, b, "--out-file", out, "--on-duplicate-id", "error", check=False)
    assert bad.returncode == 1 and f"{b}:1 (x): id 'x' already used at {a}:0" in bad.stderr

    many = write(tmp_path / "many.jsonl", [conv(f"r{i}", "q", "a") for i in range(50)], jsonl=True)
    s1, s2 = tmp_path / "s1.jsonl", tmp_path / "s2.jsonl"
    tool("sample.py", "--in-file", many, "--out-file", s1, "--n", "10", "--seed", "7")
    tool("sample.py", "--in-file", many, "--out-file", s2, "--n", "10", "--seed", "7")
    ids = [r["id"] for r in read(s1)]
    assert len(set(ids)) == 10 and read(s1) == read(s2) and ids == sorted(ids, key=lambda x: int(x[1:]))
    tool("sample.py", "--in-file", many, "--out-file", s2, "--begin", "5", "--end", "8")
    assert [r["id"] for r in read(s2)] == ["r5", "r6", "r7"]
    assert tool("sample.py", "--in-file", many, "--out-file", s2, "--n", "99", check=False).returncode == 2

    oai, alp, back = tmp_path / "oai.jsonl", tmp_path / "alpaca.json", tmp_path / "back.json"
    tool("convert.py", "--in-file", out, "--out-file", oai, "--to", "openai")
    assert read(oai)[3] == {"id": "z", "messages": [{"role": "user", "content": "Add 2 and 2."},
                                                    {"role": "assistant", "content": "4"}]}
    two_turns = write(tmp_path / "mt.json", [conv("m", "q1", "a1", "q2", "a2", system="S"), conv("s", "q", "a",
                                                                                                 system="S")])
    proc = tool("convert.py", "--in-file", two_turns, "--out-file", alp, "--to", "alpaca")
    assert read(alp) == [{"id": "s", "instruction": "q", "input": "", "output": "a", "system": "S"}]
    assert "multi-turn conversation cannot be written as Alpaca" in proc.stdout
    tool("convert.py", "--in-file", oai, "--out-file", back, "--to", "sharegpt")
    assert read(back)[:3] == [conv("x", "q1", "a1"), conv("y", "q2", "a2"), conv("x#2", "q3", "a3")]


def test_hardcoded_identity_and_stats(tmp_path):
    out = tmp_path / "identity.json"
    tool("hardcoded_identity.py", "--name", "Zeta", "--organization", "Acme Labs", "--out-file", out)
    records = read(out)
    assert len(records) > 20 and len({r["id"] for r in records}) == len(records)
    replies = [t["value"] for r in records for t in r["conversations"] if t["from"] == "gpt"]
    assert all("Zeta" in v for v in replies) and sum("Acme Labs" in v for v in replies) == len(replies)
    assert any(len(r["conversations"]) == 4 for r in records)
    load_conversations(str(out))  # valid training data

    png, js = tmp_path / "h.png", tmp_path / "s.json"
    proc = tool("stats.py", "--in-file", out, "--tokenizer", "asset:smollm2", "--template", "chatml", "--max-length",
                "40", "--histogram", png, "--json", js)
    figures = json.loads(js.read_text())
    from data.tokenize import tokenize_conversation
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer("asset:smollm2")
    expected = [tokenize_conversation(r["messages"], tok, "chatml") for r in load_conversations(str(out))[0]]
    assert figures["tokens"]["total"] == sum(len(e["input_ids"]) for e in expected)
    assert figures["supervised_tokens"]["total"] == sum(sum(x != -100 for x in e["labels"]) for e in expected)
    assert figures["over_max_length"] == sum(len(e["input_ids"]) > 40 for e in expected) > 0
    assert figures["conversations"] == len(records) and "p90" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_bad_input_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(conv("a", "q", "a")) + "\n{not json\n")
    proc = tool("dedup.py", "--in-file", bad, "--out-file", tmp_path / "o.json", check=False)
    assert proc.returncode == 1 and f"{bad}:2: malformed JSON" in proc.stderr and "Traceback" not in proc.stderr
    proc = tool("sample.py", "--in-file", tmp_path / "missing.json", "--out-file", tmp_path / "o.json", "--n", "1",
                check=False)
    assert proc.returncode == 1 and "no such file" in proc.stderr


@pytest.mark.slow
def test_prepare_all_chain(tmp_path):
    raw = [conv(f"r{i}", f"<p>Question number {i} about <b>gardening</b> and plants in spring?</p>",
                f"<p>Answer {i}: water the plants every morning and keep them in the sun for hours.</p>" * (1 + i % 4))
           for i in range(30)]
    raw += [conv("dup", "<p>Question number 1 about <b>gardening</b> and plants in spring?</p>",
                 "<p>Answer 1: water the plants every morning and keep them in the sun for hours.</p>" * 2 + "Thanks!")]
    raw += [conv("fr", "Quelle est la meilleure saison pour planter des tomates au jardin ?",
                 "Le printemps est la meilleure saison pour planter des tomates.")]
    src = write(tmp_path / "raw.json", raw)
    out = tmp_path / "prepared"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "prepare_all.sh"), str(src), str(out), "asset:llama-spm",
                           "vicuna_v1.1", "96"], capture_output=True, text=True, env={**ENV, "PY": sys.executable,
                                                                                      "TEST_RATIO": "0.2"},
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for step in ("clean", "filter", "dedup", "identity", "merge", "split long", "train/test", "statistics"):
        assert f"== {step}" in proc.stdout
    assert json.loads((out / "filtered.report.json").read_text())["dropped"] == {"language fr": 1}
    assert json.loads((out / "dedup.report.json").read_text())["dropped"] == {"near duplicate (Jaccard >= 0.8)": 1}
    train, test = read(out / "train.json"), read(out / "test.json")
    assert train and test and (out / "train_lengths.png").exists()
    load_conversations(str(out / "train.json"))
    assert any("Vicuna" in t["value"] for r in train + test for t in r["conversations"])


def test_tools_default_to_the_tokenizers_own_template(tmp_path):
    """FastChat's commands pass no --template: the tokenizer's chat_template is used (and named); a tokenizer
    without one is a one-line error naming the flag."""
    demo = ROOT / "data" / "demo" / "chattune_demo.jsonl"
    out = tmp_path / "split.json"
    default = tool("split_long_conversation.py", "--in-file", demo, "--out-file", out, "--tokenizer", "asset:smollm2",
                   "--max-length", "64")
    assert "[template] tokenizer (the tokenizer's own chat_template)" in default.stderr
    explicit = tool("split_long_conversation.py", "--in-file", demo, "--out-file", tmp_path / "t.json",
                    "--tokenizer", "asset:smollm2", "--template", "tokenizer", "--max-length", "64")
    assert out.read_text() == (tmp_path / "t.json").read_text() and "[template] tokenizer" in explicit.stderr
    stats = tool("stats.py", "--in-file", demo, "--tokenizer", "asset:smollm2", "--json", tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text())["template"] == "tokenizer" and "[template]" in stats.stderr
    bad = tool("stats.py", "--in-file", demo, "--tokenizer", "asset:llama-spm", check=False)
    assert bad.returncode != 0 and "--template: the tokenizer asset:llama-spm has no chat_template" in bad.stderr
    assert "Traceback" not in bad.stderr
