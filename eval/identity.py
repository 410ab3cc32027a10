"""Quick identity / format eval: ask held-out questions, score exact facts and well-formed replies.

    python -m eval.identity --model-path OUT [--spec data/demo/heldout_identity.json] [--output score.json]

A spec is `{"items": [{"question": str, "expect": [str, ...]}, ...]}`: an answer is *correct* when it
contains every expected string (case-insensitive). It is *well formed* when it is non-empty, ended with
the template's end-of-turn (not cut by --max-new-tokens) and leaks no chat-template markup. `make demo`
runs this on the base model and on the fine-tuned one with the demo's held-out facts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from serve.generation import GenerationResult, SamplingParams, stream_generate
from serve.loading import LoadedModel, ServeLoadError, add_model_args, load_from_args

DEFAULT_SPEC = Path(__file__).resolve().parent.parent / "data" / "demo" / "heldout_identity.json"
# Markup of common chat templates; finding one in a reply means the model is imitating a template
# (trained on the wrong one, or its end-of-turn was not learned).
TEMPLATE_MARKUP = ("<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|start_header_id|>", "[INST]", "[/INST]",
                   "<|user|>", "<|assistant|>", "<|endoftext|>", "</s>", "USER:", "ASSISTANT:", "### Instruction")


def load_spec(path: str | Path) -> list[dict]:
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--spec {path}: {e}") from None
    items = spec.get("items") if isinstance(spec, dict) else None
    if not isinstance(items, list) or not items:
        raise ValueError(f"--spec {path}: expected {{\"items\": [{{\"question\", \"expect\"}}, ...]}}")
    for i, item in enumerate(items):
        ok = (isinstance(item, dict) and isinstance(item.get("question"), str) and isinstance(item.get("expect"), list)
              and item["expect"] and all(isinstance(e, str) for e in item["expect"]))
        if not ok:
            raise ValueError(f"--spec {path}: items[{i}] needs a 'question' string and a non-empty 'expect' list of strings")
    return items


def ask(loaded: LoadedModel, question: str, max_new_tokens: int) -> GenerationResult:
    from data.tokenize import encode_prompt

    ids = encode_prompt([{"role": "user", "content": question}], loaded.tokenizer, loaded.template)
    result = GenerationResult()
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop=loaded.stop_strings)
    for _ in stream_generate(loaded.model, loaded.tokenizer, ids, params, loaded.stop_token_ids, result):
        pass
    return result


def score_answer(text: str, finish_reason: str, expect: list[str]) -> dict:
    leaked = [m for m in TEMPLATE_MARKUP if m in text]
    problems = ([] if text.strip() else ["empty"]) + ([] if finish_reason == "stop" else ["cut at max tokens"]) + (
        [f"template markup {', '.join(leaked)}"] if leaked else [])
    return {"correct": all(e.lower() in text.lower() for e in expect), "well_formed": not problems,
            "problems": problems}


def run_identity_eval(loaded: LoadedModel, items: list[dict], max_new_tokens: int = 64) -> dict:
    rows = []
    for item in items:
        result = ask(loaded, item["question"], max_new_tokens)
        text = result.text.strip()
        rows.append({"question": item["question"], "expect": item["expect"], "answer": text,
                     **score_answer(text, result.finish_reason, item["expect"])})
    return _summary(rows)


def run_identity_eval_llama_cpp(gguf_path: str, items: list[dict], max_new_tokens: int = 64) -> dict:
    """The same questions asked through llama.cpp (llama-cpp-python's chat completion: the GGUF's own chat
    template, tokenizer and end-of-generation tokens), greedy, as a llama.cpp or Ollama user would ask them."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=1024, verbose=False, seed=0)
    try:
        rows = []
        for item in items:
            out = llm.create_chat_completion([{"role": "user", "content": item["question"]}], temperature=0.0,
                                             top_k=1, max_tokens=max_new_tokens)
            choice = out["choices"][0]
            text = (choice["message"]["content"] or "").strip()
            rows.append({"question": item["question"], "expect": item["expect"], "answer": text,
                         **score_answer(text, choice["finish_reason"], item["expect"])})
    finally:
        llm.close()
    return _summary(rows)


def _summary(rows: list[dict]) -> dict:
    n = len(rows)
    return {"items": rows, "correct": sum(r["correct"] for r in rows), "well_formed": sum(r["well_formed"] for r in rows),
            "total": n, "accuracy": sum(r["correct"] for r in rows) / n, "format_rate": sum(r["well_formed"] for r in rows) / n}


def print_report(report: dict, title: str) -> None:
    print(f"== {title}: facts {report['correct']}/{report['total']}, well formed {report['well_formed']}/{report['total']}",
          flush=True)
    for r in report["items"]:
        mark = "ok " if r["correct"] else "MISS"
        extra = f"  [{'; '.join(r['problems'])}]" if r["problems"] else ""
        print(f"  {mark} Q: {r['question']}\n       A: {r['answer']}{extra}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.identity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--spec", default=str(DEFAULT_SPEC), help="questions and expected facts (JSON)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--output", help="write the scored answers as JSON")
    p.add_argument("--runtime", choices=["transformers", "llama.cpp"], default="transformers",
                   help="llama.cpp: ask a .gguf --model-path through llama-cpp-python's chat completion")
    args = p.parse_args(argv)
    try:
        items = load_spec(args.spec)
        if args.runtime == "llama.cpp":
            if not args.model_path.endswith(".gguf"):
                raise ValueError(f"--runtime llama.cpp needs a .gguf --model-path, got {args.model_path}")
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                raise ValueError("--runtime llama.cpp needs llama-cpp-python (make llama-cpp installs it)") from None
            report = run_identity_eval_llama_cpp(args.model_path, items, args.max_new_tokens)
        else:
            report = run_identity_eval(load_from_args(args), items, args.max_new_tokens)
    except (ServeLoadError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_report(report, args.model_path)
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(main())
