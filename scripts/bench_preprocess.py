"""Preprocessing throughput: chattune's pipeline vs FastChat's `preprocess`, same data, same tokenizer.

    python scripts/bench_preprocess.py [--conversations 5000] [--tokenizer asset:llama-spm]
    python scripts/bench_preprocess.py --scale [--sizes 10000 100000] [--workers 1 2]

Generates a ShareGPT file of multi-turn conversations (system prompts, unicode, code blocks,
whitespace and role words inside content), then in one run times:
  * tools + reasoning vs plain chat (`--tools-template`, default qwen3, on the Qwen2 tokenizer): agent traces (tools,
    parallel calls, results, reasoning; Qwen3 turns the conversations into several samples) against plain chat
    conversations of about the same number of tokens, the same template and tokenizer: tokens/s and their ratio
  * chattune: tokenize_batch (vicuna_v1.1, max_length 2048), single process, from normalized records
  * chattune end to end: read + validate + tokenize from the file
  * FastChat 0.2.36 `fastchat.train.train.preprocess` (vicuna_v1.1), the same tokenizer
and prints (median of --repeats runs) conversations/s, tokens/s, the speed-up, how many samples FastChat silently zeroed
(all labels -100 after its `tokenization mismatch`), and how many of ours differ from the
tokenizer's own ids for the whole prompt (must be 0).

`--scale` measures the whole training-data build at size instead (data.dataset.build_dataset: read, validate,
tokenize with N worker processes, write the Arrow cache), each run in a fresh process: conversations/s, peak RSS of
the main process and of its largest worker; FastChat's `preprocess` on the same file alongside (it pads every
sample to max_length in memory, as its training script does).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from data.templates import render_text
from data.tokenize import IGNORE_INDEX, tokenize_batch
from data.tokenizer import load_tokenizer, run_encoder
from data.validate import load_conversations

WORDS = ("the model learns to answer questions about data training loss tokens python function returns "
         "value list dictionary because therefore example result simple clear fast").split()
EXTRAS = ["USER: not a turn", "ASSISTANT: not a reply", "ünïcødé 日本語 🙂", "```python\nprint('hi')\n```",
          "  padded  ", "trailing space ", "\n\nleading newlines", "tab\tseparated", "[INST] x [/INST]"]


def make_conversation(rng: random.Random, i: int) -> dict:
    turns = []
    for _ in range(rng.randint(1, 5)):
        for who in ("human", "gpt"):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 120)))
            if rng.random() < 0.4:
                text += " " + rng.choice(EXTRAS)
            turns.append({"from": who, "value": text})
    rec = {"id": f"bench-{i}", "conversations": turns}
    if rng.random() < 0.3:
        rec["system"] = "You are a careful assistant."
    return rec


TOOLS = [{"type": "function", "function": {"name": n, "description": d, "parameters": {
    "type": "object", "properties": {"q": {"type": "string"}}}}}
    for n, d in (("search", "Search the web"), ("calc", "Evaluate arithmetic"), ("weather", "Weather in a city"))]


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def make_agent_conversation(rng: random.Random, i: int) -> dict:
    """A normalized record: 1-4 user turns, each answered after 0-2 tool steps (1-2 parallel calls, their
    results), reasoning on about half of the assistant turns."""
    msgs = [{"role": "system", "content": "You are a careful assistant."}]
    n = 0
    for _ in range(rng.randint(1, 4)):
        msgs.append({"role": "user", "content": _words(rng, 5, 60)})
        for _ in range(rng.choice([0, 1, 1, 2])):
            calls = [{"id": f"c{(n := n + 1)}", "type": "function",
                      "function": {"name": rng.choice(TOOLS)["function"]["name"], "arguments": {"q": _words(rng, 1, 6)}}}
                     for _ in range(rng.choice([1, 1, 2]))]
            step = {"role": "assistant", "content": "", "tool_calls": calls}
            if rng.random() < 0.5:
                step["reasoning"] = _words(rng, 10, 60)
            msgs.append(step)
            msgs += [{"role": "tool", "content": _words(rng, 5, 80), "tool_call_id": c["id"]} for c in calls]
        reply = {"role": "assistant", "content": _words(rng, 5, 120)}
        if rng.random() < 0.5:
            reply["reasoning"] = _words(rng, 10, 80)
        msgs.append(reply)
    return {"id": f"agent-{i}", "messages": msgs, "tools": TOOLS}


def tools_vs_plain(args, plain_convs: list) -> None:
    """tokens/s of tool + reasoning traces vs plain chat at about the same token count (same template/tokenizer)."""
    tok = load_tokenizer(args.tools_tokenizer)
    run_encoder(tok)
    rng = random.Random(args.seed + 1)
    agents = [make_agent_conversation(rng, i) for i in range(args.conversations // 4)]
    template = args.tools_template

    def run(convs):
        out = []
        for i in range(0, len(convs), 256):
            out += tokenize_batch(convs[i:i + 256], tok, template, args.max_length)
        return out

    agent_s, agent_res = _median_time(lambda: run(agents), args.repeats)
    agent_tokens = sum(len(ex.input_ids) for r in agent_res for ex in r.samples)
    probe = run(plain_convs[:200])  # then as many plain conversations as hold the agent traces' token count
    per_conv = sum(len(ex.input_ids) for r in probe for ex in r.samples) / 200
    plain = plain_convs[:max(1, round(agent_tokens / per_conv))]
    plain_s, plain_res = _median_time(lambda: run(plain), args.repeats)
    plain_tokens = sum(len(ex.input_ids) for r in plain_res for ex in r.samples)
    samples = sum(len(r.samples) for r in agent_res)
    print(f"\ntools + reasoning vs plain chat ({template}, {args.tools_tokenizer}, median of {args.repeats} runs):")
    print(f"{'pipeline':<34}{'conversations':>14}{'samples':>9}{'tokens':>10}{'seconds':>9}{'tokens/s':>10}")
    print(f"{'plain chat':<34}{len(plain):>14}{sum(len(r.samples) for r in plain_res):>9}{plain_tokens:>10}"
          f"{plain_s:>9.2f}{plain_tokens / plain_s:>10.0f}")
    print(f"{'tools + reasoning':<34}{len(agents):>14}{samples:>9}{agent_tokens:>10}{agent_s:>9.2f}"
          f"{agent_tokens / agent_s:>10.0f}")
    print(f"tools + reasoning / plain chat tokens/s: {(agent_tokens / agent_s) / (plain_tokens / plain_s):.2f}x "
          f"(goal >= 0.8x)")


def _median_time(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], result


def _child(kind: str, path: str, workers: int, tokenizer: str, max_length: int) -> None:
    """One measured run in this (fresh) process; prints a JSON line."""
    import resource

    tok = load_tokenizer(tokenizer)
    tok.model_max_length = max_length
    t0 = time.perf_counter()
    if kind == "chattune":
        from data.dataset import DataConfig, build_dataset

        ds, stats, _ = build_dataset(path, tok, DataConfig("vicuna_v1.1", max_length), num_proc=workers,
                                     cache=tempfile.mkdtemp(), verbose=False)
        n, tokens = stats.conversations, stats.tokens
    else:
        import io
        from contextlib import redirect_stdout

        from fastchat.train.train import preprocess

        tok.pad_token, tok.legacy = tok.unk_token, False
        sources = [json.loads(line)["conversations"] for line in open(path)]
        with redirect_stdout(io.StringIO()):
            out = preprocess(sources, tok)
        n, tokens = len(sources), int(out["attention_mask"].sum())
    seconds = time.perf_counter() - t0
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "conversations": n, "tokens": tokens, "peak_mb": own, "worker_peak_mb": worker}))


def scale(args) -> None:
    import subprocess

    rng = random.Random(args.seed)
    print(f"tokenizer {args.tokenizer}, vicuna_v1.1, max_length {args.max_length}; each run a fresh process")
    print(f"{'pipeline':<34}{'conversations':>14}{'workers':>8}{'seconds':>9}{'conv/s':>8}{'peak RSS':>10}"
          f"{'worker peak':>12}")
    made = 0
    path = Path(tempfile.mkdtemp()) / "bench.jsonl"
    with open(path, "w") as f:
        for size in sorted(args.sizes):
            for i in range(made, size):  # the larger file extends the smaller: same first conversations
                f.write(json.dumps(make_conversation(rng, i), ensure_ascii=False) + "\n")
            f.flush()
            made = size
            runs = [("chattune", w) for w in args.workers] + ([("fastchat", 1)] if not args.no_fastchat else [])
            for kind, workers in runs:
                cmd = [sys.executable, __file__, "--child", kind, str(path), str(workers), "--tokenizer",
                       args.tokenizer, "--max_length", str(args.max_length)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                name = "chattune build_dataset" if kind == "chattune" else "FastChat 0.2.36 preprocess"
                if proc.returncode != 0:  # FastChat pads every sample in memory: at size the OOM killer ends it
                    why = "killed by SIGKILL (out of memory)" if proc.returncode == -9 else proc.stderr[-300:]
                    print(f"{name:<34}{size:>14,}{workers:>8}  {why}", flush=True)
                    continue
                r = json.loads(proc.stdout.splitlines()[-1])
                worker = f"{r['worker_peak_mb']:>10.0f} MB" if kind == "chattune" and workers > 1 else f"{'-':>13}"
                print(f"{name:<34}{size:>14,}{workers:>8}{r['seconds']:>9.1f}{size / r['seconds']:>8.0f}"
                      f"{r['peak_mb']:>7.0f} MB{worker}", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        ap = argparse.ArgumentParser()
        ap.add_argument("--child", nargs=3)
        ap.add_argument("--tokenizer")
        ap.add_argument("--max_length", type=int)
        a = ap.parse_args()
        return _child(a.child[0], a.child[1], int(a.child[2]), a.tokenizer, a.max_length)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", action="store_true", help="build the training data at --sizes with --workers")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-fastchat", action="store_true", help="--scale without FastChat's preprocess")
    ap.add_argument("--conversations", type=int, default=5000)
    ap.add_argument("--tokenizer", default="asset:llama-spm")
    ap.add_argument("--max_length", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per pipeline; the median is reported")
    ap.add_argument("--tools-template", default="qwen3", help="template of the tools + reasoning row")
    ap.add_argument("--tools-tokenizer", default="asset:qwen2", help="tokenizer of the tools + reasoning row")
    ap.add_argument("--tools-only", action="store_true", help="only the tools + reasoning vs plain chat row")
    args = ap.parse_args()
    if args.scale:
        return scale(args)

    rng = random.Random(args.seed)
    records_raw = [make_conversation(rng, i) for i in range(args.conversations)]
    tmp = Path(tempfile.mkdtemp()) / "bench.jsonl"
    tmp.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records_raw) + "\n")
    tok = load_tokenizer(args.tokenizer)
    tok.model_max_length = args.max_length
    run_encoder(tok)  # one-time proof of the tokenizer, not part of per-conversation cost

    records, _ = load_conversations(tmp)
    convs = [r["messages"] for r in records]
    if args.tools_only:
        return tools_vs_plain(args, convs)

    def ours() -> list:
        out = []
        for i in range(0, len(convs), 256):
            out += tokenize_batch(convs[i:i + 256], tok, "vicuna_v1.1", args.max_length)
        return out

    def ours_e2e() -> None:
        recs, _ = load_conversations(tmp)
        for i in range(0, len(recs), 256):
            tokenize_batch([r["messages"] for r in recs[i:i + 256]], tok, "vicuna_v1.1", args.max_length)

    ours_s, results = _median_time(ours, args.repeats)
    ours_e2e_s, _ = _median_time(ours_e2e, args.repeats)
    ours_tokens = sum(len(ex.input_ids) for r in results for ex in r.samples)
    ours_dropped = sum(len(r.dropped) for r in results)
    mismatches = 0
    for conv, res in zip(convs, results):
        if res.samples and not res.samples[0].truncated:
            mismatches += res.samples[0].input_ids != tok(render_text(conv, "vicuna_v1.1")).input_ids

    import io
    from contextlib import redirect_stdout

    from fastchat.train.train import preprocess

    fc_tok = load_tokenizer(args.tokenizer)
    fc_tok.model_max_length = args.max_length
    fc_tok.pad_token = fc_tok.unk_token  # what FastChat's train.py does
    # FastChat reads `tokenizer.legacy`; this tokenizer adds no `▁` after special tokens, which is the
    # non-legacy behaviour, so legacy=False is FastChat's most favourable (and correct) setting here.
    fc_tok.legacy = False
    sources = [r["conversations"] for r in records_raw]
    def fastchat():
        with redirect_stdout(io.StringIO()):  # in case FastChat prints mismatch warnings (rank-0 only)
            return preprocess(sources, fc_tok)

    fc_s, out = _median_time(fastchat, args.repeats)
    fc_tokens = int(out["attention_mask"].sum())
    fc_zeroed = int((out["labels"] == IGNORE_INDEX).all(dim=1).sum())

    n = len(convs)
    print(f"conversations: {n}  tokenizer: {args.tokenizer}  template: vicuna_v1.1  max_length: {args.max_length}  "
          f"(median of {args.repeats} runs each)")
    print(f"{'pipeline':<34}{'seconds':>9}{'conv/s':>10}{'tokens/s':>12}")
    print(f"{'chattune tokenize_batch':<34}{ours_s:>9.2f}{n / ours_s:>10.0f}{ours_tokens / ours_s:>12.0f}")
    print(f"{'chattune read+validate+tokenize':<34}{ours_e2e_s:>9.2f}{n / ours_e2e_s:>10.0f}{ours_tokens / ours_e2e_s:>12.0f}")
    print(f"{'FastChat preprocess (0.2.36)':<34}{fc_s:>9.2f}{n / fc_s:>10.0f}{fc_tokens / fc_s:>12.0f}")
    print(f"speed-up vs FastChat: {fc_s / ours_s:.1f}x (tokenize), {fc_s / ours_e2e_s:.1f}x (end to end)")
    print(f"FastChat silently zeroed samples (all labels -100, no message printed): {fc_zeroed} of {n}")
    print(f"chattune samples dropped (counted, with reasons): {ours_dropped}; "
          f"ids differing from whole-prompt tokenization: {mismatches}")
    tools_vs_plain(args, convs)


if __name__ == "__main__":
    main()
