"""MT-bench file formats (FastChat's `llm_judge`), so real MT-bench files can be dropped in.

* questions  `{"question_id", "category", "turns": [str, ...], "reference"?: [str, ...]}` (one per line)
* answers    `{"question_id", "answer_id", "model_id", "choices": [{"index", "turns": [str, ...]}], "tstamp"}`,
             one file per model: `answers/MODEL_ID.jsonl`; reference answers use the same format
* judge prompts `{"name", "type": "single"|"pairwise", "system_prompt", "prompt_template", "category",
             "output_format"}` selected by FastChat's names (single-v1, single-math-v1, pair-v2, ...)
* judgments  single: `{"question_id", "model", "judge": [judge_model, prompt_name], "user_prompt",
             "judgment", "score", "turn", "tstamp"}`; pairwise: `{"question_id", "model_1", "model_2",
             "g1_winner", "g2_winner", "judge", "g1_user_prompt", "g1_judgment", "g2_user_prompt",
             "g2_judgment", "turn", "tstamp"}` with winners "model_1" | "model_2" | "tie" | "error".
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
DEFAULT_QUESTIONS = DATA / "chattune_bench" / "question.jsonl"
DEFAULT_JUDGE_PROMPTS = DATA / "judge_prompts.jsonl"

# Sampling temperature per category, as MT-bench does: deterministic where there is a right answer.
TEMPERATURE_BY_CATEGORY = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                           "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
DEFAULT_TEMPERATURE = 0.7
NEED_REFERENCE = {"math", "reasoning", "coding", "arena-hard-200"}


class FormatError(ValueError):
    pass


def read_jsonl(path: str | os.PathLike, what: str, tolerate_torn_tail: bool = False) -> list[dict]:
    """Objects of a JSONL file; a bad line is an error naming file and line. `tolerate_torn_tail`: a
    last line without its newline that does not parse (a write cut short by a crash) is ignored."""
    rows: list[dict] = []
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if tolerate_torn_tail and n == len(lines):
                break
            raise FormatError(f"{path}:{n}: not valid JSON ({e.msg}) in this {what} file") from None
        if not isinstance(obj, dict):
            raise FormatError(f"{path}:{n}: expected a JSON object per line in this {what} file")
        obj["_line"] = n
        rows.append(obj)
    return rows


def _strings(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, str) for t in value)


def load_questions(path: str | os.PathLike, begin: int | None = None, end: int | None = None) -> list[dict]:
    questions = read_jsonl(path, "question")
    seen: set = set()
    for q in questions:
        where = f"{path}:{q['_line']}"
        if "question_id" not in q or not isinstance(q["question_id"], int | str):
            raise FormatError(f"{where}: missing or invalid 'question_id'")
        if q["question_id"] in seen:
            raise FormatError(f"{where}: duplicate question_id {q['question_id']!r}")
        seen.add(q["question_id"])
        if not _strings(q.get("turns")):
            raise FormatError(f"{where}: 'turns' must be a non-empty list of strings (question {q['question_id']})")
        if not isinstance(q.get("category", ""), str):
            raise FormatError(f"{where}: 'category' must be a string (question {q['question_id']})")
        q.setdefault("category", "general")
        if "reference" in q and not _strings(q["reference"]):
            raise FormatError(f"{where}: 'reference' must be a list of strings (question {q['question_id']})")
    return questions[begin:end]


def load_answer_file(path: str | os.PathLike, tolerate_torn_tail: bool = False) -> dict:
    """question_id → answer record (the last one wins, as after a resumed run)."""
    out: dict = {}
    for a in read_jsonl(path, "answer", tolerate_torn_tail):
        where = f"{path}:{a['_line']}"
        if "question_id" not in a:
            raise FormatError(f"{where}: missing 'question_id'")
        choices = a.get("choices")
        if not isinstance(choices, list) or not choices or not all(_strings(c.get("turns")) if isinstance(c, dict)
                                                                   else False for c in choices):
            raise FormatError(f"{where}: 'choices' must be a list of {{'turns': [str, ...]}} (question {a['question_id']})")
        out[a["question_id"]] = a
    return out


def load_answers(answer_dir: str | os.PathLike, models: list[str] | None = None) -> dict[str, dict]:
    """model_id → {question_id → answer} from `answer_dir/*.jsonl`."""
    directory = Path(answer_dir)
    if not directory.is_dir():
        raise FormatError(f"--answer-dir {answer_dir}: no such directory")
    found = {p.stem: p for p in sorted(directory.glob("*.jsonl"))}
    wanted = models or list(found)
    missing = [m for m in wanted if m not in found]
    if missing:
        raise FormatError(f"no answers for model(s) {', '.join(missing)} in {answer_dir} (have: {', '.join(found) or 'none'})")
    return {m: load_answer_file(found[m]) for m in wanted}


def write_answer_file(path: str | os.PathLike, answers: dict) -> None:
    """Rewrite sorted by question id, one record per question (atomic: temp file + rename)."""
    tmp = Path(f"{path}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for qid in sorted(answers, key=lambda k: (str(type(k)), k)):
            f.write(json.dumps({k: v for k, v in answers[qid].items() if k != "_line"}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def load_judge_prompts(path: str | os.PathLike) -> dict[str, dict]:
    prompts = {}
    for p in read_jsonl(path, "judge prompt"):
        missing = [k for k in ("name", "type", "system_prompt", "prompt_template") if not isinstance(p.get(k), str)]
        if missing:
            raise FormatError(f"{path}:{p['_line']}: judge prompt lacks {', '.join(missing)}")
        prompts[p["name"]] = p
    return prompts


def references(questions: list[dict], reference_file: str | os.PathLike | None) -> dict:
    """question_id → reference turns: from a FastChat reference-answer file, else the question's `reference`."""
    refs = {q["question_id"]: q["reference"] for q in questions if "reference" in q}
    if reference_file:
        for qid, a in load_answer_file(reference_file).items():
            refs[qid] = a["choices"][0]["turns"]
    return refs


_SCORE_PATTERNS = [
    re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*(?:/\s*10\s*)?\]\]"),  # [[7]], [[7.5]], [[7/10]]
    re.compile(r"\[\s*(\d+(?:\.\d+)?)\s*(?:/\s*10\s*)?\]"),  # [7]
    re.compile(r"(?i)\b(?:rating|score)\s*(?:is|:|=)?\s*\**\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?"),  # Rating: 7, score is 7/10
    re.compile(r"\b(\d+(?:\.\d+)?)\s*/\s*10\b"),  # 7/10
]


def parse_score(text: str) -> float | None:
    """The judge's 1–10 rating, or None. Patterns from strict to loose; within one, the last match
    counts (judges restate the format before giving the score); values outside 1..10 are rejected."""
    for pattern in _SCORE_PATTERNS:
        matches = pattern.findall(text)
        if matches:
            value = float(matches[-1])
            return value if 1 <= value <= 10 else None
    return None


_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")
_VERDICT_LOOSE = re.compile(r"(?i)\b(?:verdict|winner|better)\s*(?:is|:)?\s*(?:assistant\s*)?\**\[?\s*([ABC])\b\]?")


def parse_verdict(text: str) -> str | None:
    """"A", "B", "tie" or None from a pairwise judgment; the last strict `[[X]]` wins."""
    matches = _VERDICT.findall(text) or _VERDICT_LOOSE.findall(text)
    if not matches:
        return None
    return {"A": "A", "B": "B", "C": "tie"}[matches[-1].upper()]
