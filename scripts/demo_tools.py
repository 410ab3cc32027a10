"""Tool use, learned on CPU: SmolLM2-135M-Instruct is fine-tuned on generated agent traces (question → a call to
the right tool → its result → an answer that uses it) with the `qwen2.5` template (Hermes `<tool_call>` blocks,
tools in the system turn), then scored on held-out questions (other cities, other numbers, other phrasings):

1. *calls*: given the question and the tools, does the reply parse (serve/tool_parsing.py, as the OpenAI server
   parses it) into exactly one call to the right function with the right arguments?
2. *uses the result*: given the question, the correct call and the tool's result, does the answer state the
   result (calling nothing, and not echoing the `<tool_response>` markup)?

    python scripts/demo_tools.py [--output_dir outputs/demo_tools] [--epochs 1] [--train_examples 32]

Not part of `make demo`. Exits 1 unless the call count rises and the result-use count does not fall.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "You are a helpful assistant. Use a tool when the question needs one."
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "calculator", "description": "Evaluate an arithmetic expression",
                                      "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                                                     "required": ["expression"]}}},
]
TRAIN_CITIES = ["Paris", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Warsaw", "Lisbon", "Dublin", "Athens",
                "Oslo", "Helsinki", "Cairo", "Nairobi", "Lima", "Quito", "Tokyo", "Seoul", "Hanoi", "Delhi"]
HELD_CITIES = ["Stockholm", "Budapest", "Toronto", "Sydney", "Santiago", "Manila"]
WEATHER_Q = ["What's the weather in {c}?", "How is the weather in {c} right now?", "Is it warm in {c} today?",
             "Tell me the weather for {c}."]
HELD_WEATHER_Q = ["What is the weather like in {c}?", "Weather report for {c}, please."]
CALC_Q = ["What is {a} times {b}?", "Compute {a} * {b}.", "How much is {a} multiplied by {b}?",
          "Calculate {a} times {b} for me."]
HELD_CALC_Q = ["What do you get when you multiply {a} by {b}?", "Please work out {a} * {b}."]
SKIES = ["sunny", "cloudy", "rainy", "windy"]


def weather(city: str) -> dict:
    h = sum(map(ord, city))
    return {"temp_c": h % 31 + 2, "sky": SKIES[h % 4]}


def trace(question: str, name: str, args: dict) -> list[dict]:
    if name == "get_weather":
        w = weather(args["city"])
        result, answer = w, f"It is {w['temp_c']} °C and {w['sky']} in {args['city']}."
    else:
        a, b = map(int, args["expression"].split("*"))
        value = a * b
        result, answer = {"result": value}, f"{args['expression'].replace('*', ' × ')} = {value}."
    call = {"id": "call_1", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": json.dumps(result)},
            {"role": "assistant", "content": answer}]


def examples(held_out: bool, n: int, seed: int) -> list[tuple[str, str, dict, list[dict]]]:
    """(question, tool, arguments, full trace), half weather, half arithmetic."""
    rng = random.Random(seed)
    cities, wq, cq = (HELD_CITIES, HELD_WEATHER_Q, HELD_CALC_Q) if held_out else (TRAIN_CITIES, WEATHER_Q, CALC_Q)
    out = []
    for k in range(n):
        if k % 2 == 0:
            c = cities[(k // 2) % len(cities)]
            q, name, args = rng.choice(wq).format(c=c), "get_weather", {"city": c}
        else:
            a, b = (rng.randint(13, 49), rng.randint(3, 9)) if held_out else (rng.randint(50, 99), rng.randint(3, 9))
            q, name, args = rng.choice(cq).format(a=a, b=b), "calculator", {"expression": f"{a}*{b}"}
        out.append((q, name, args, trace(q, name, args)))
    return out


def generate(loaded, messages: list[dict], max_new_tokens: int) -> str:
    from data.tokenize import encode_prompt
    from serve.generation import GenerationResult, SamplingParams, stream_generate
    from serve.tool_parsing import request_messages

    normalized = request_messages(messages, len(messages))  # OpenAI fields -> chattune's, as the server reads them
    ids = encode_prompt(normalized, loaded.tokenizer, loaded.template, tools=TOOLS)
    result = GenerationResult()
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop=loaded.stop_strings)
    for _ in stream_generate(loaded.model, loaded.tokenizer, ids, params, loaded.stop_token_ids, result):
        pass
    return result.text


def score(loaded, items, title: str) -> dict:
    from serve.tool_parsing import parse_reply

    known = {t["function"]["name"] for t in TOOLS}
    calls = uses = 0
    print(f"== {title}", flush=True)
    for question, name, args, msgs in items:
        reply = parse_reply(generate(loaded, msgs[:2], 48), "hermes", known)
        got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in reply.tool_calls]
        ok_call = got == [(name, args)]
        answer = parse_reply(generate(loaded, msgs[:4], 32), "hermes", known)
        expected = str(json.loads(msgs[3]["content"]).get("temp_c", json.loads(msgs[3]["content"]).get("result")))
        ok_use = not answer.tool_calls and expected in answer.content and "<tool" not in answer.content  # an answer,
        # not the result's markup echoed back
        calls += ok_call
        uses += ok_use
        shown = got or (reply.content[:60] + ("…" if len(reply.content) > 60 else ""))
        print(f"  {'ok ' if ok_call else 'MISS'} call  Q: {question}\n        -> {shown}", flush=True)
        print(f"  {'ok ' if ok_use else 'MISS'} use   -> {answer.content[:70]!r} (expects {expected})", flush=True)
    return {"calls": calls, "uses": uses, "total": len(items)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output_dir", default=str(ROOT / "outputs" / "demo_tools"))
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--learning_rate", type=float, default=2e-4)
    ap.add_argument("--train_examples", type=int, default=32)
    args = ap.parse_args()
    import torch

    from serve.loading import load_for_chat

    torch.set_num_threads(os.cpu_count() or 1)
    t_start = time.time()
    held = examples(True, 8, seed=2)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "tool_traces.jsonl"
    with open(data, "w") as f:
        for k, (_, _, _, msgs) in enumerate(examples(False, args.train_examples, seed=1)):
            f.write(json.dumps({"id": f"t{k}", "tools": TOOLS, "messages": msgs}) + "\n")

    before = score(load_for_chat("asset:smollm2", conv_template="qwen2.5"), held,
                   "base SmolLM2-135M-Instruct (qwen2.5 tool format) on held-out questions")
    print(f"\n== fine-tuning on {args.train_examples} generated tool traces (full fine-tune, qwen2.5, packing, CPU)",
          flush=True)
    t0 = time.time()
    subprocess.run([sys.executable, str(ROOT / "train" / "train.py"), "--model_name_or_path", "asset:smollm2",
                    "--data_path", str(data), "--output_dir", str(out / "model"), "--template", "qwen2.5",
                    "--bf16", "True", "--packing", "True", "--model_max_length", "1024",
                    "--per_device_train_batch_size", "1", "--num_train_epochs", str(args.epochs),
                    "--learning_rate", str(args.learning_rate), "--warmup_ratio", "0.1", "--lr_scheduler_type", "cosine",
                    "--logging_steps", "5", "--save_strategy", "no", "--seed", "1"], check=True, cwd=ROOT)
    train_min = (time.time() - t0) / 60
    after = score(load_for_chat(str(out / "model")), held, f"fine-tuned ({train_min:.1f} min of training)")
    n = before["total"]
    print(f"\nheld-out questions (N={n}): well-formed call to the right tool with the right arguments "
          f"{before['calls']}/{n} -> {after['calls']}/{n}; answer uses the tool's result {before['uses']}/{n} -> "
          f"{after['uses']}/{n}  (whole demo {(time.time() - t_start) / 60:.1f} min)", flush=True)
    return 0 if after["calls"] > before["calls"] and after["uses"] >= before["uses"] else 1


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(main())
