"""Preprocessing throughput: chattune's pipeline vs FastChat's `preprocess`, same data, same tokenizer.

    python scripts/bench_preprocess.py [--conversations 5000] [--tokenizer asset:llama-spm]

Generates a ShareGPT file of multi-turn conversations (system prompts, unicode, code blocks,
whitespace and role words inside content), then in one run times:
  * chattune: tokenize_batch (vicuna_v1.1, max_length 2048), single process, from normalized records
  * chattune end to end: read + validate + tokenize from the file
  * FastChat 0.2.36 `fastchat.train.train.preprocess` (vicuna_v1.1), the same tokenizer
and prints (median of --repeats runs) conversations/s, tokens/s, the speed-up, how many samples FastChat silently zeroed
(all labels -100 after its `tokenization mismatch`), and how many of ours differ from the
tokenizer's own ids for the whole prompt (must be 0).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.templates import render_text  # noqa: E402
from data.tokenize import IGNORE_INDEX, tokenize_batch  # noqa: E402
from data.tokenizer import load_tokenizer, run_encoder  # noqa: E402
from data.validate import load_conversations  # noqa: E402

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


def _median_time(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=5000)
    ap.add_argument("--tokenizer", default="asset:llama-spm")
    ap.add_argument("--max_length", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per pipeline; the median is reported")
    args = ap.parse_args()

    rng = random.Random(args.seed)
    records_raw = [make_conversation(rng, i) for i in range(args.conversations)]
    tmp = Path(tempfile.mkdtemp()) / "bench.jsonl"
    tmp.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records_raw) + "\n")
    tok = load_tokenizer(args.tokenizer)
    tok.model_max_length = args.max_length
    run_encoder(tok)  # one-time proof of the tokenizer, not part of per-conversation cost

    records, _ = load_conversations(tmp)
    convs = [r["messages"] for r in records]

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


if __name__ == "__main__":
    main()
