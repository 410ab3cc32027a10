"""MT-bench flow: formats and parsing (unit), then answers → our own server as judge → tables (end to end)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ENV, ROOT, start_server

from eval.mtbench import (
    DEFAULT_JUDGE_PROMPTS,
    DEFAULT_QUESTIONS,
    FormatError,
    load_answer_file,
    load_judge_prompts,
    load_questions,
    parse_score,
    parse_verdict,
)


@pytest.mark.parametrize("text,score", [
    ("Good answer. Rating: [[7]]", 7.0), ("[[8.5]]", 8.5), ("Rating: [[9/10]]", 9.0),
    ('I use the format "[[rating]]"... final: [[3]]', 3.0), ("Rating: [[4]] ... on reflection [[6]]", 6.0),
    ("Score: [5]", 5.0), ("Rating: 8", 8.0), ("My score is **6**/10", 6.0), ("I'd give it 7/10.", 7.0),
    ("Rating: [[11]]", None), ("Rating: [[0]]", None), ("no number here", None), ("[[A]]", None),
])
def test_score_parsing(text, score):
    assert parse_score(text) == score


@pytest.mark.parametrize("text,verdict", [
    ("A is better. [[A]]", "A"), ("[[B]]", "B"), ("They are equal: [[C]]", "tie"),
    ("Format: [[A]], [[B]] or [[C]]. My verdict: [[B]]", "B"), ("[[ a ]]", None), ("Final verdict: B", "B"),
    ("Assistant A wrote more.", None), ("[[D]]", None),
])
def test_verdict_parsing(text, verdict):
    assert parse_verdict(text) == verdict


def test_shipped_questions_and_prompts_are_well_formed():
    qs = load_questions(DEFAULT_QUESTIONS)
    assert len(qs) >= 16 and all(len(q["turns"]) == 2 for q in qs)
    assert {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"} <= {
        q["category"] for q in qs}
    assert all("reference" in q for q in qs if q["category"] in ("math", "reasoning", "coding"))
    prompts = load_judge_prompts(DEFAULT_JUDGE_PROMPTS)
    for name in ("single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn", "pair-v2",
                 "pair-math-v1", "pair-v2-multi-turn", "pair-math-v1-multi-turn"):
        assert name in prompts
        expect = "[[rating]]" if name.startswith("single") else "[[A]]"
        assert prompts[name]["output_format"] == expect


def test_bad_files_name_file_and_line(tmp_path):
    q = tmp_path / "question.jsonl"
    q.write_text('{"question_id": 1, "category": "math", "turns": ["a"]}\n{"question_id": 2, "turns": []}\n')
    with pytest.raises(FormatError, match=r"question.jsonl:2: 'turns' must be a non-empty list"):
        load_questions(q)
    q.write_text('{"question_id": 1, "turns": ["a"]}\n{"question_id": 1, "turns": ["b"]}\n')
    with pytest.raises(FormatError, match=r":2: duplicate question_id 1"):
        load_questions(q)
    a = tmp_path / "m.jsonl"
    a.write_text('{"question_id": 1, "choices": [{"index": 0, "turns": ["x"]}]}\n{"question_id": 2, "choi')
    with pytest.raises(FormatError, match=r"m.jsonl:2: not valid JSON"):
        load_answer_file(a)
    assert list(load_answer_file(a, tolerate_torn_tail=True)) == [1]  # a write cut short by a crash


# --- end to end -------------------------------------------------------------------------------------------
QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write one line about rain.", "Make it shorter."]},
    {"question_id": 2, "category": "math", "turns": ["What is 2 + 3?", "And times 4?"], "reference": ["5", "20"]},
    {"question_id": 3, "category": "coding", "turns": ["Print hello in Python."]},  # one turn, no reference
]
# Short judge prompts in FastChat's format (a user's own prompt file drops in the same way).
PROMPTS = [
    {"name": n, "type": "single" if n.startswith("single") else "pairwise", "system_prompt": "Grade it.",
     "prompt_template": t, "category": "math" if "math" in n else "general",
     "output_format": "[[rating]]" if n.startswith("single") else "[[A]]"}
    for n, t in [
        ("single-v1", "Q: {question}\nA: {answer}"),
        ("single-math-v1", "Q: {question}\nRef: {ref_answer_1}\nA: {answer}"),
        ("single-v1-multi-turn", "Q1: {question_1}\nA1: {answer_1}\nQ2: {question_2}\nA2: {answer_2}"),
        ("single-math-v1-multi-turn", "Ref: {ref_answer_1} {ref_answer_2}\nQ1: {question_1}\nA1: {answer_1}\n"
                                      "Q2: {question_2}\nA2: {answer_2}"),
        ("pair-v2", "Q: {question}\nA: {answer_a}\nB: {answer_b}"),
        ("pair-math-v1", "Q: {question}\nRef: {ref_answer_1}\nA: {answer_a}\nB: {answer_b}"),
        ("pair-v2-multi-turn", "Q1: {question_1}\nA: {answer_a_1} / {answer_a_2}\nQ2: {question_2}\n"
                               "B: {answer_b_1} / {answer_b_2}"),
        ("pair-math-v1-multi-turn", "Ref: {ref_answer_1} {ref_answer_2}\nQ1: {question_1}\nA: {answer_a_1} / "
                                    "{answer_a_2}\nQ2: {question_2}\nB: {answer_b_1} / {answer_b_2}"),
    ]
]


def _py(module: str, *args: str, check: bool = True, cwd=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd or ROOT, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_answers_judging_and_results_end_to_end(tiny_llama, constant_reply_model, tmp_path, capsys):
    from eval.gen_answers import main as gen_answers

    def _gen(*args: str) -> str:  # eval.gen_answers's entry point in this process (it loads a model each time)
        capsys.readouterr()
        assert gen_answers(list(args)) == 0
        return capsys.readouterr().out

    judge_model, reply = constant_reply_model
    assert parse_score(reply) == 7.0 and parse_verdict(reply) == "A"  # a deterministic judge for the flow
    qfile = tmp_path / "question.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    pfile = tmp_path / "judge_prompts.jsonl"
    pfile.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    answers = tmp_path / "answers"
    gen = ["--questions", str(qfile), "--answer-dir", str(answers), "--max-new-tokens", "6"]

    # answers: resumable (first two questions, then the rest; a torn last line is tolerated)
    _gen("--model-path", tiny_llama, "--conv-template", "chatml", "--model-id", "base", *gen,
        "--question-end", "2")
    first = load_answer_file(answers / "base.jsonl")
    assert sorted(first) == [1, 2]
    with open(answers / "base.jsonl", "a") as f:
        f.write('{"question_id": 3, "answer_id": "to')
    out = _gen("--model-path", tiny_llama, "--conv-template", "chatml", "--model-id", "base", *gen)
    assert "2 already answered" in out and "1 to go" in out
    base = load_answer_file(answers / "base.jsonl")
    assert sorted(base) == [1, 2, 3] and base[1]["answer_id"] == first[1]["answer_id"]
    assert [len(base[q]["choices"][0]["turns"]) for q in (1, 2, 3)] == [2, 2, 1]
    assert all(base[q]["model_id"] == "base" for q in base)
    _gen("--model-path", str(judge_model), "--model-id", "tuned", *gen)
    # per-category temperature: math is greedy (same answer whatever the seed), writing samples at 0.7
    other = tmp_path / "other"
    for seed in ("1", "2"):
        _gen("--model-path", tiny_llama, "--conv-template", "chatml", "--model-id", f"s{seed}",
            "--questions", str(qfile), "--answer-dir", str(other), "--max-new-tokens", "6", "--seed", seed,
            "--question-end", "2")
    s1, s2 = load_answer_file(other / "s1.jsonl"), load_answer_file(other / "s2.jsonl")
    assert s1[2]["choices"] == s2[2]["choices"] and s1[1]["choices"] != s2[1]["choices"]
    out = _gen("--model-path", str(judge_model), "--model-id", "tuned", *gen)
    assert "0 to go" in out

    proc, url = start_server(judge_model, "--model-name", "judge", "--limit-concurrency", "2")
    try:
        judge = ["--judge-base-url", f"{url}/v1", "--judge-model", "judge", "--questions", str(qfile),
                 "--answer-dir", str(answers), "--judge-prompts", str(pfile), "--judge-max-tokens", "16",
                 "--parallel", "2"]
        single = tmp_path / "single.jsonl"
        out = _py("eval.judge", *judge, "--mode", "single", "--output", str(single))
        assert "judging 10" in out.stdout  # 2 models × (2 + 2 + 1 turns)
        records = [json.loads(x) for x in single.read_text().splitlines()]
        assert len(records) == 10 and all(r["score"] == 7.0 for r in records)
        names = {(r["question_id"], r["turn"]): r["judge"][1] for r in records}
        assert names[(1, 1)] == "single-v1" and names[(2, 1)] == "single-math-v1"
        assert names[(2, 2)] == "single-math-v1-multi-turn" and names[(3, 1)] == "single-v1"  # coding: no reference
        assert "Ref: 5" in next(r["user_prompt"] for r in records if r["question_id"] == 2 and r["turn"] == 1)
        assert "judging 0" in _py("eval.judge", *judge, "--mode", "single", "--output", str(single)).stdout  # resumed

        pair = tmp_path / "pair.jsonl"
        out = _py("eval.judge", *judge, "--mode", "pairwise-baseline", "--baseline-model", "base", "--output", str(pair))
        assert "judging 5" in out.stdout
        games = [json.loads(x) for x in pair.read_text().splitlines()]
        # the judge always says "A": game 1 picks model_1, the swapped game 2 picks model_2 → inconsistent
        assert all(g["model_1"] == "tuned" and g["model_2"] == "base" for g in games)
        assert all(g["g1_winner"] == "model_1" and g["g2_winner"] == "model_2" for g in games)

        # requests the judge server refuses (400: max_tokens beyond what it accepts): recorded as errors, no crash
        errs = tmp_path / "errors.jsonl"
        out = _py("eval.judge", *judge[:-4], "--judge-max-tokens", str(2**31), "--mode", "pairwise-all", "--output",
                  str(errs))
        assert "5 without a usable score/verdict" in out.stdout
        assert all(json.loads(x)["g1_judgment"].startswith("$ERROR$ HTTP 400") for x in errs.read_text().splitlines())
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    table = tmp_path / "single.json"
    out = _py("eval.show_results", "--judgment-file", str(single), "--questions", str(qfile), "--output-json", str(table))
    result = json.loads(table.read_text())
    assert result["base"]["turn 1"] == result["base"]["turn 2"] == result["base"]["overall"] == 7.0
    assert result["tuned"]["n"] == 5 and result["tuned"]["categories"] == {"coding": 7.0, "math": 7.0, "writing": 7.0}
    assert "mean score per category" in out.stdout and "tuned" in out.stdout
    table = tmp_path / "pair.json"
    _py("eval.show_results", "--judgment-file", str(pair), "--baseline-model", "base", "--output-json", str(table),
        "--questions", str(qfile))
    result = json.loads(table.read_text())
    assert list(result) == ["tuned"]
    assert result["tuned"] == {"wins": 0, "losses": 0, "ties": 5, "inconsistent": 5, "errors": 0,
                                    "win_rate": 0.0, "loss_rate": 0.0, "win_rate_adjusted": 0.5}
    bad = _py("eval.show_results", "--judgment-file", str(pair), "--mode", "single", "--questions", str(qfile),
              check=False)
    assert bad.returncode == 1 and "does not match" in bad.stderr

    # FastChat's own llm_judge readers accept every file we wrote
    fc = _fastchat_llm_judge()
    assert sorted(fc.load_model_answers(str(answers))) == ["base", "tuned"]
    assert fc.load_model_answers(str(answers))["base"][1]["choices"][0]["turns"] == base[1]["choices"][0]["turns"]
    assert len(fc.load_single_model_judgments(str(single))[("judge", "single-v1")]) == 4  # (question, model) keys
    pairs = fc.load_pairwise_model_judgments(str(pair))
    assert all(r["winners"] == ("inconsistent",) for table in pairs.values() for r in table.values())
    assert set(fc.load_judge_prompts(str(DEFAULT_JUDGE_PROMPTS))) == set(load_judge_prompts(DEFAULT_JUDGE_PROMPTS))


def _fastchat_llm_judge():
    """fastchat.llm_judge.common (fschat 0.2.36) imports API clients at module level; only its file readers
    are used here, so absent clients are replaced by empty modules."""
    import importlib
    import types

    for name in ("anthropic",):
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)
    return importlib.import_module("fastchat.llm_judge.common")


def test_matches_references_missing_answers_and_swapped_rendering():
    from eval.judge import make_matches, render

    prompts = {p["name"]: p for p in PROMPTS}
    answers = {m: {q["question_id"]: {"choices": [{"turns": [f"{m}-{q['question_id']}-{t}" for t in range(len(q["turns"]))]}]}
                   for q in QUESTIONS if not (m == "c" and q["question_id"] == 2)} for m in ("a", "b", "c")}
    refs = {2: ["5", "20"]}
    single, notes = make_matches(QUESTIONS, answers, "single", prompts, refs, None)
    assert len(single) == 3 * 5 - 2 and notes == [
        "question 3 (coding): no reference answer, judged with the general prompt",
        "c: no answer to 1 question(s) (2); those are not judged"]
    pairs, _ = make_matches(QUESTIONS, answers, "pairwise-all", prompts, refs, None)
    assert {m.models for m in pairs} == {("a", "b"), ("a", "c"), ("b", "c")} and len(pairs) == 5 + 3 + 3
    math_turn2 = next(m for m in pairs if m.models == ("a", "b") and m.question["question_id"] == 2 and m.turn == 2)
    assert math_turn2.prompt["name"] == "pair-math-v1-multi-turn"
    text, swapped = render(math_turn2), render(math_turn2, swap=True)
    assert text.startswith("Ref: 5 20") and "A: a-2-0 / a-2-1" in text and "B: b-2-0 / b-2-1" in text
    assert "A: b-2-0 / b-2-1" in swapped and "B: a-2-0 / a-2-1" in swapped
    baseline, _ = make_matches(QUESTIONS, answers, "pairwise-baseline", prompts, {}, "a")
    assert {m.models for m in baseline} == {("b", "a"), ("c", "a")}
    _, notes = make_matches(QUESTIONS, answers, "single", prompts, {}, None)
    assert "question 2 (math): no reference answer, judged with the general prompt" in notes
