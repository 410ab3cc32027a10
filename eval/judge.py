"""Judge MT-bench-style answers with any OpenAI-compatible endpoint (chattune's own server included).

    python -m eval.judge --judge-base-url http://127.0.0.1:8000/v1 --judge-model NAME --mode single
    python -m eval.judge ... --mode pairwise-baseline --baseline-model base
    python -m eval.judge ... --mode pairwise-all

Reads the question file and `answers/*.jsonl`; writes FastChat-format judgments (default
`judgments/JUDGE_single.jsonl` or `..._pair.jsonl`). Turn 1 is judged on the first exchange, turn 2
with the whole two-turn conversation. Categories with a right answer (math, reasoning, coding) use
the reference-answer prompts when a reference exists (question `reference` or `--reference-answers`).
Pairwise games are played twice with the answers swapped (position bias); show_results counts an
inconsistent pair as a tie.

Robust: the score/verdict parser accepts the common ways judges write them; an unparseable reply is
retried (sampled, since a greedy judge would repeat itself) before being recorded as an error; API
failures are retried with backoff by the client; a 4xx (e.g. a prompt too long for the judge) is
recorded as an error, never a crash. Resumable: judgments already in the output file are skipped;
errors are tried again on the next run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from data.progress import progress_disabled
from eval.mtbench import (
    DEFAULT_JUDGE_PROMPTS,
    DEFAULT_QUESTIONS,
    NEED_REFERENCE,
    FormatError,
    load_answers,
    load_judge_prompts,
    load_questions,
    parse_score,
    parse_verdict,
    read_jsonl,
    references,
)

ERROR = "$ERROR$"


@dataclass
class Match:
    question: dict
    turn: int  # 1-based
    prompt: dict
    models: tuple[str, ...]  # one model (single) or two (pairwise)
    answers: tuple[list[str], ...]  # each model's answer turns (first choice)
    reference: list[str] | None

    def key(self) -> tuple:
        return (self.question["question_id"], *self.models, self.turn)


def pick_prompt(prompts: dict[str, dict], kind: str, turn: int, with_reference: bool) -> dict:
    if kind == "single":
        name = "single-math-v1" if with_reference else "single-v1"
    else:
        name = "pair-math-v1" if with_reference else "pair-v2"
    if turn > 1:
        name += "-multi-turn"
    if name not in prompts:
        raise FormatError(f"judge prompts lack {name!r} (have: {', '.join(prompts)})")
    return prompts[name]


def make_matches(questions: list[dict], answers: dict[str, dict], mode: str, prompts: dict[str, dict],
                 refs: dict, baseline: str | None) -> tuple[list[Match], list[str]]:
    """Every (question, turn, model or pair) to judge; plus notes on what had to be left out."""
    if mode == "single":
        groups = [(m,) for m in answers]
    elif mode == "pairwise-baseline":
        groups = [(m, baseline) for m in answers if m != baseline]
    else:
        groups = list(itertools.combinations(answers, 2))
    kind = "single" if mode == "single" else "pairwise"
    matches, notes = [], []
    missing_by_model: dict[str, list] = {}
    for q in questions:
        qid = q["question_id"]
        ref = refs.get(qid)
        needs_ref = q["category"] in NEED_REFERENCE
        if needs_ref and ref is None:
            notes.append(f"question {qid} ({q['category']}): no reference answer, judged with the general prompt")
        for models in groups:
            missing = [m for m in models if qid not in answers[m]]
            if missing:
                for m in missing:
                    missing_by_model.setdefault(m, [])
                    if qid not in missing_by_model[m]:
                        missing_by_model[m].append(qid)
                continue
            model_turns = tuple(answers[m][qid]["choices"][0]["turns"] for m in models)
            for turn in range(1, min(len(q["turns"]), *(len(t) for t in model_turns)) + 1):
                if turn > 2:  # MT-bench judges two turns; the prompts have slots for two
                    break
                prompt = pick_prompt(prompts, kind, turn, needs_ref and ref is not None)
                matches.append(Match(q, turn, prompt, models, model_turns, ref if needs_ref else None))
    for m, qids in missing_by_model.items():
        shown = ", ".join(map(str, qids[:10])) + (" ..." if len(qids) > 10 else "")
        notes.append(f"{m}: no answer to {len(qids)} question(s) ({shown}); those are not judged")
    return matches, notes


def render(match: Match, swap: bool = False) -> str:
    q, r = match.question["turns"], match.reference or []
    fields = {"question": q[0], "question_1": q[0], "question_2": q[1] if len(q) > 1 else "",
              "ref_answer_1": r[0] if r else "", "ref_answer_2": r[1] if len(r) > 1 else ""}
    if len(match.models) == 1:
        a = match.answers[0]
        fields.update(answer=a[0], answer_1=a[0], answer_2=a[1] if len(a) > 1 else "")
    else:
        a, b = match.answers[::-1] if swap else match.answers
        fields.update(answer_a=a[0], answer_b=b[0], answer_a_1=a[0], answer_b_1=b[0],
                      answer_a_2=a[1] if len(a) > 1 else "", answer_b_2=b[1] if len(b) > 1 else "")
    return match.prompt["prompt_template"].format(**fields)


class Judge:
    def __init__(self, base_url: str, model: str, api_key: str, max_tokens: int, max_retries: int,
                 parse_retries: int, timeout: float):
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=api_key, max_retries=max_retries, timeout=timeout)
        self.model, self.max_tokens, self.parse_retries = model, max_tokens, parse_retries

    def ask(self, system: str, user: str, parse) -> tuple[str, object]:
        """(judgment text, parsed value or None). Unparseable replies are retried with sampling."""
        import openai

        text = ""
        for attempt in range(self.parse_retries + 1):
            try:
                reply = self.client.chat.completions.create(
                    model=self.model, max_tokens=self.max_tokens, temperature=0.0 if attempt == 0 else 0.7,
                    seed=attempt, messages=[{"role": "system", "content": system}, {"role": "user", "content": user}])
            except openai.APIStatusError as e:  # 4xx/5xx after the client's own retries: recorded, not fatal
                return f"{ERROR} HTTP {e.status_code}: {_message(e)}", None
            except openai.APIError as e:  # connection failures after retries
                return f"{ERROR} {type(e).__name__}: {e}", None
            text = reply.choices[0].message.content or ""
            value = parse(text)
            if value is not None:
                return text, value
        return text, None


def _message(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message", err))
    return str(e)


def judge_single(judge: Judge, match: Match, judge_model: str) -> dict:
    user = render(match)
    text, score = judge.ask(match.prompt["system_prompt"], user, parse_score)
    return {"question_id": match.question["question_id"], "model": match.models[0],
            "judge": [judge_model, match.prompt["name"]], "user_prompt": user, "judgment": text,
            "score": score if score is not None else -1, "turn": match.turn, "tstamp": time.time()}


def judge_pair(judge: Judge, match: Match, judge_model: str) -> dict:
    games = []
    for swap in (False, True):
        user = render(match, swap)
        text, verdict = judge.ask(match.prompt["system_prompt"], user, parse_verdict)
        if verdict is None:
            winner = "error"
        elif verdict == "tie":
            winner = "tie"
        else:  # position A is model_1 in game 1 and model_2 in the swapped game 2
            winner = "model_1" if (verdict == "A") != swap else "model_2"
        games.append((user, text, winner))
    (u1, t1, w1), (u2, t2, w2) = games
    return {"question_id": match.question["question_id"], "model_1": match.models[0], "model_2": match.models[1],
            "g1_winner": w1, "g2_winner": w2, "judge": [judge_model, match.prompt["name"]], "g1_user_prompt": u1,
            "g1_judgment": t1, "g2_user_prompt": u2, "g2_judgment": t2, "turn": match.turn, "tstamp": time.time()}


def is_error(record: dict) -> bool:
    if "score" in record:
        return record["score"] == -1
    return "error" in (record.get("g1_winner"), record.get("g2_winner"))


def record_key(record: dict) -> tuple:
    if "model" in record:
        return (record["question_id"], record["model"], record["turn"])
    return (record["question_id"], record["model_1"], record["model_2"], record["turn"])


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m eval.judge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--judge-base-url", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--judge-model", required=True, help="model name the endpoint serves")
    p.add_argument("--judge-api-key", default=os.environ.get("OPENAI_API_KEY", "EMPTY"),
                   help="API key (default: $OPENAI_API_KEY)")
    p.add_argument("--mode", choices=["single", "pairwise-baseline", "pairwise-all"], default="single")
    p.add_argument("--questions", default=str(DEFAULT_QUESTIONS))
    p.add_argument("--answer-dir", default="answers")
    p.add_argument("--model-list", nargs="+", help="models to judge (default: every answer file)")
    p.add_argument("--baseline-model", help="the baseline for --mode pairwise-baseline")
    p.add_argument("--judge-prompts", default=str(DEFAULT_JUDGE_PROMPTS))
    p.add_argument("--reference-answers", help="FastChat reference-answer file (answer format)")
    p.add_argument("--output", help="judgment file (default: judgments/JUDGE_single.jsonl or JUDGE_pair.jsonl)")
    p.add_argument("--parallel", type=int, default=1, help="requests in flight")
    p.add_argument("--judge-max-tokens", type=int, default=512)
    p.add_argument("--max-retries", type=int, default=3, help="client retries on connection errors, 429 and 5xx")
    p.add_argument("--parse-retries", type=int, default=2, help="new samples when a reply has no score/verdict")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--question-begin", type=int, help="index of the first question (as gen_answers)")
    p.add_argument("--question-end", type=int, help="index after the last question")
    p.add_argument("--first-n", type=int, help="judge only the first N matches (debugging)")
    args = p.parse_args(argv)
    if args.mode == "pairwise-baseline" and not args.baseline_model:
        p.error("--mode pairwise-baseline needs --baseline-model")
    if args.parallel < 1:
        p.error("--parallel must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    models = args.model_list
    if models and args.baseline_model and args.baseline_model not in models:
        models = [*models, args.baseline_model]
    try:
        questions = load_questions(args.questions, args.question_begin, args.question_end)
        answers = load_answers(args.answer_dir, models)
        if args.baseline_model and args.baseline_model not in answers:
            raise FormatError(f"--baseline-model {args.baseline_model}: no answers in {args.answer_dir}")
        prompts = load_judge_prompts(args.judge_prompts)
        matches, notes = make_matches(questions, answers, args.mode, prompts,
                                      references(questions, args.reference_answers), args.baseline_model)
    except (FormatError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.mode != "single" and len(answers) < 2:
        print("error: pairwise judging needs answers from at least two models", file=sys.stderr)
        return 1
    safe_name = args.judge_model.replace("/", "_")
    output = Path(args.output or f"judgments/{safe_name}_{'single' if args.mode == 'single' else 'pair'}.jsonl")
    done = set()
    if output.exists():
        try:
            done = {record_key(r) for r in read_jsonl(output, "judgment", tolerate_torn_tail=True) if not is_error(r)}
        except FormatError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    for note in notes:
        print(f"note: {note}", flush=True)
    todo = [m for m in matches if m.key() not in done][:args.first_n]
    already = sum(m.key() in done for m in matches)
    print(f"{len(matches)} judgments in this set; {already} already in {output}; judging {len(todo)}", flush=True)
    judge = Judge(args.judge_base_url, args.judge_model, args.judge_api_key, args.judge_max_tokens, args.max_retries,
                  args.parse_retries, args.timeout)
    run = judge_single if args.mode == "single" else judge_pair
    output.parent.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    errors = 0
    with open(output, "a", encoding="utf-8") as f, ThreadPoolExecutor(args.parallel) as pool:
        futures = [pool.submit(run, judge, m, args.judge_model) for m in todo]
        for fut in tqdm(as_completed(futures), total=len(futures), desc="judging",
                        disable=progress_disabled()):
            record = fut.result()
            errors += is_error(record)
            with lock:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
    print(f"wrote {len(todo)} judgments to {output} ({errors} without a usable score/verdict; rerun to retry them)",
          flush=True)
    return 0


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(main())
