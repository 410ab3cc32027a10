"""Answer an MT-bench-style question file with a model chattune trained (or any model it can load).

    python -m eval.gen_answers --model-path OUT --model-id my-model [--questions question.jsonl]
        → answers/my-model.jsonl  (FastChat's model_answer format)

Multi-turn: each question's turns are asked in one conversation, with the template recorded at training.
Temperature per category as MT-bench (greedy for math/coding/reasoning/extraction); `--temperature`
overrides. Resumable: questions already answered in the answer file are skipped; each answer is
appended as soon as it is done, and the file is rewritten sorted (one record per question) at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from pathlib import Path

from tqdm import tqdm

from data.progress import progress_disabled
from eval.mtbench import (
    DEFAULT_QUESTIONS,
    DEFAULT_TEMPERATURE,
    TEMPERATURE_BY_CATEGORY,
    FormatError,
    load_answer_file,
    load_questions,
    write_answer_file,
)
from serve.cli import trim_to_context
from serve.generation import GenerationResult, SamplingParams, stream_generate
from serve.loading import ServeLoadError, add_model_args, load_from_args


def answer_question(loaded, question: dict, params: SamplingParams, num_choices: int, seed: int | None) -> list[dict]:
    choices = []
    for index in range(num_choices):
        messages: list[dict] = []
        turns = []
        for turn in question["turns"]:
            messages.append({"role": "user", "content": turn})
            ids, dropped = trim_to_context(loaded, messages, params.max_new_tokens)
            if dropped:
                print(f"question {question['question_id']}: context full, the oldest {dropped} messages were left out",
                      file=sys.stderr, flush=True)
            result = GenerationResult()
            p = SamplingParams(params.temperature, params.top_p, params.repetition_penalty, params.max_new_tokens,
                               None if seed is None else seed + index, loaded.stop_strings)
            for _ in stream_generate(loaded.model, loaded.tokenizer, ids, p, loaded.stop_token_ids, result):
                pass
            text = result.text.strip()
            messages.append({"role": "assistant", "content": text})
            turns.append(text)
        choices.append({"index": index, "turns": turns})
    return choices


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m eval.gen_answers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--model-id", required=True, help="name of the answer file and of the model in judgments")
    p.add_argument("--questions", default=str(DEFAULT_QUESTIONS), help="question.jsonl (default: chattune's set)")
    p.add_argument("--answer-dir", default="answers", help="answers go to ANSWER_DIR/MODEL_ID.jsonl")
    p.add_argument("--answer-file", help="explicit answer file (overrides --answer-dir)")
    p.add_argument("--question-begin", type=int, help="index of the first question (debugging)")
    p.add_argument("--question-end", type=int, help="index after the last question")
    p.add_argument("--num-choices", type=int, default=1, help="answers per question (different seeds)")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, help="override the per-category temperature")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="base seed: choice i of question q uses seed+q-hash+i")
    args = p.parse_args(argv)
    if args.num_choices < 1:
        p.error("--num-choices must be >= 1")
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    if args.temperature is not None and not 0 <= args.temperature <= 2:
        p.error("--temperature must be in [0, 2]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    answer_file = Path(args.answer_file or os.path.join(args.answer_dir, f"{args.model_id}.jsonl"))
    try:
        questions = load_questions(args.questions, args.question_begin, args.question_end)
        done = load_answer_file(answer_file, tolerate_torn_tail=True) if answer_file.exists() else {}
    except (FormatError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    complete = {qid for qid, a in done.items() if len(a["choices"]) >= args.num_choices}
    pending = [q for q in questions if q["question_id"] not in complete]
    print(f"{len(questions)} questions; {len(questions) - len(pending)} already answered in {answer_file}; "
          f"{len(pending)} to go", flush=True)
    if pending:
        try:
            loaded = load_from_args(args)
        except (ServeLoadError, ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        answer_file.parent.mkdir(parents=True, exist_ok=True)
        if done:  # drop a torn last line before appending
            write_answer_file(answer_file, done)
        with open(answer_file, "a", encoding="utf-8") as f:
            for q in tqdm(pending, desc=args.model_id, disable=progress_disabled()):
                temperature = args.temperature if args.temperature is not None else TEMPERATURE_BY_CATEGORY.get(
                    q["category"], DEFAULT_TEMPERATURE)
                params = SamplingParams(temperature, args.top_p, args.repetition_penalty, args.max_new_tokens)
                seed = args.seed + _stable_hash(q["question_id"])
                try:
                    choices = answer_question(loaded, q, params, args.num_choices, seed)
                except ValueError as e:  # a question that cannot fit the context: reported, not fatal
                    print(f"question {q['question_id']}: skipped: {e}", file=sys.stderr, flush=True)
                    continue
                record = {"question_id": q["question_id"], "answer_id": secrets.token_hex(11),
                          "model_id": args.model_id, "choices": choices, "tstamp": time.time()}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
                done[q["question_id"]] = record
    if done:
        write_answer_file(answer_file, done)
    missing = [q["question_id"] for q in questions if q["question_id"] not in done]
    print(f"wrote {answer_file}: {len(done)} answers" + (f"; unanswered: {missing}" if missing else ""), flush=True)
    return 0 if not missing else 1


def _stable_hash(qid) -> int:
    """A seed offset per question that does not change between runs (Python's hash() of str does)."""
    return sum((i + 1) * ord(c) for i, c in enumerate(str(qid))) % 100_003


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(main())
