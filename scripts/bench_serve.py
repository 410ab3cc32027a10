"""Load test of the OpenAI-compatible server: throughput under concurrency, then a hostile run.

    python scripts/bench_serve.py [--params 150e6 | --model OUT] [--clients 1 8] [--max-tokens 64]
                                  [--limit-concurrency 8] [--max-queue 16] [--no-hostile]

Starts `python -m serve.openai_api_server` on a random Llama of about `--params` parameters (SmolLM2's tokenizer
and chat template) or on `--model`, then:
1. for each N in --clients: N streaming clients (the `openai` package, one thread each) at once, greedy, each with
   its own prompt; N=1 runs the same prompts one after another. Prints p50/p95 time to first token, per-client and
   aggregate completion tokens/s, status codes, and whether every concurrent reply equals its reply alone.
2. hostile: a body over the size limit, a huge stop list, 3x more concurrent requests than can be admitted, and
   20 clients that drop mid-stream; then checks that no response was a 5xx, no slot is stuck (/health, then a
   normal reply), and that the server's RSS is back within 10% of where it was before the hostile run.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = "why does the sky look blue rain tea maps owls jazz python code history river mountain music".split()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(model: str, args) -> tuple[subprocess.Popen, str]:
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(Path(tempfile.gettempdir()) / f"bench_serve_{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "serve.openai_api_server", "--model-path", model, "--port", str(port),
                             "--limit-concurrency", str(args.limit_concurrency), "--max-queue", str(args.max_queue),
                             "--model-name", "bench"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: see {log.name}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start within 300 s")


def prompt(i: int) -> list[dict]:
    words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(8 + i % 5)]
    return [{"role": "user", "content": f"Question {i}: " + " ".join(words) + "?"}]


def make_client(base: str):
    import openai

    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)


def stream_one(client, i: int, max_tokens: int, codes: collections.Counter) -> dict:
    """One streaming client; returns its text, token count, time to first token and total time."""
    import openai

    t0 = time.perf_counter()
    first, parts, tokens = None, [], 0
    try:
        stream = client.chat.completions.create(model="bench", messages=prompt(i), temperature=0, max_tokens=max_tokens,
                                                stream=True)
        for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            for c in chunk.choices:
                if c.delta.content:
                    first = first or time.perf_counter() - t0
                    parts.append(c.delta.content)
        codes[200] += 1
    except openai.APIStatusError as e:
        codes[e.status_code] += 1
    return {"text": "".join(parts), "tokens": tokens, "ttft": first, "total": time.perf_counter() - t0}


def concurrent(base: str, n: int, max_tokens: int, codes: collections.Counter) -> tuple[list[dict], float]:
    """n clients, built beforehand (an openai client costs tens of ms to create), released together."""
    clients = [make_client(base) for _ in range(n)]
    out: list[dict | None] = [None] * n
    go = threading.Barrier(n + 1)

    def run(i: int) -> None:
        go.wait()
        out[i] = stream_one(clients[i], i, max_tokens, codes)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return out, time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    values = sorted(v for v in values if v is not None)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def throughput(base: str, clients: list[int], max_tokens: int) -> list[dict]:
    rows, alone = [], None
    for n in clients:
        codes: collections.Counter = collections.Counter()
        if n == 1:  # the same prompts the largest N uses, one after another: the replies alone, and 1-client speed
            client = make_client(base)
            runs = [stream_one(client, i, max_tokens, codes) for i in range(max(clients))]
            wall = sum(r["total"] for r in runs)
            alone = [r["text"] for r in runs]
        else:
            runs, wall = concurrent(base, n, max_tokens, codes)
        tokens = sum(r["tokens"] for r in runs)
        same = None if n == 1 or alone is None else all(r["text"] == alone[i] for i, r in enumerate(runs))
        rows.append({"clients": n, "ttft_p50": pct([r["ttft"] for r in runs], 0.5),
                     "ttft_p95": pct([r["ttft"] for r in runs], 0.95),
                     "per_client_tps": statistics.mean(r["tokens"] / r["total"] for r in runs),
                     "aggregate_tps": tokens / wall, "codes": dict(codes), "same_as_alone": same})
    return rows


def hostile(base: str, proc: subprocess.Popen, args) -> dict:
    import httpx

    codes: collections.Counter = collections.Counter()
    msgs = prompt(0)
    before = rss_mb(proc.pid)
    with httpx.Client(timeout=120) as c:
        r = c.post(f"{base}/v1/chat/completions", content=b"x" * (8 * 1024 * 1024),
                   headers={"Content-Type": "application/json"})
        codes[r.status_code] += 1
        r = c.post(f"{base}/v1/chat/completions", json={"messages": msgs, "stop": ["stop"] * 10000})
        codes[r.status_code] += 1
    # 3x over-admission: more concurrent requests than can run or wait
    over = 3 * (args.limit_concurrency + args.max_queue)

    over_codes: collections.Counter = collections.Counter()  # the over-admission burst alone

    def one():
        try:
            r = httpx.post(f"{base}/v1/chat/completions", timeout=600,
                           json={"messages": msgs, "max_tokens": args.max_tokens, "temperature": 0})
            codes[r.status_code] += 1
            over_codes[r.status_code] += 1
        except httpx.HTTPError as e:
            codes[type(e).__name__] += 1
            over_codes[type(e).__name__] += 1

    threads = [threading.Thread(target=one) for _ in range(over)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for _ in range(20):  # clients that drop mid-stream
        with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=120,
                          json={"messages": msgs, "max_tokens": 100000, "stream": True}) as resp:
            codes[resp.status_code] += 1
            for k, _ in enumerate(resp.iter_lines()):
                if k == 4:
                    break
    deadline, health = time.time() + 30, {}
    while time.time() < deadline:
        health = httpx.get(f"{base}/health").json()
        if not (health["admitted"] or health["running"] or health["waiting"]):
            break
        time.sleep(0.1)
    after_ok = httpx.post(f"{base}/v1/chat/completions", timeout=120,
                          json={"messages": msgs, "max_tokens": 4}).status_code
    time.sleep(1.0)
    after = rss_mb(proc.pid)
    return {"codes": dict(codes), "over_admission": over, "over_admission_codes": dict(over_codes),
            "dropped_streams": 20, "stuck_slots": health.get("admitted", -1),
            "normal_reply_after": after_ok, "rss_before_mb": before, "rss_after_mb": after,
            "no_5xx": not any(isinstance(k, int) and k >= 500 for k in codes),
            "rss_within_10pct": abs(after - before) <= 0.1 * before}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a model directory the server can load (default: a random Llama of --params)")
    ap.add_argument("--params", type=float, default=150e6, help="size of the random model (parameters)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--limit-concurrency", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=16)
    ap.add_argument("--no-hostile", action="store_true")
    args = ap.parse_args()

    import torch

    model = args.model
    if model is None:
        from data.tokenizer import load_tokenizer
        from scripts.bench_memory import make_model

        cache = Path(tempfile.gettempdir()) / "chattune-bench-serve"
        model, n = make_model(cache / f"llama-{args.params:.2g}", args.params, load_tokenizer("asset:smollm2"))
        print(f"[bench_serve] random Llama, {n / 1e6:.0f}M parameters, fp32, {torch.get_num_threads()} threads")
    proc, base = start(model, args)
    try:
        stream_one(make_client(base), 0, 4, collections.Counter())  # warm-up
        rows = throughput(base, sorted(set(args.clients)), args.max_tokens)
        print(f"\n{'clients':>8} {'TTFT p50':>9} {'TTFT p95':>9} {'tok/s/client':>13} {'aggregate tok/s':>16} "
              f"{'same as alone':>14}  status codes")
        for r in rows:
            same = "-" if r["same_as_alone"] is None else ("yes" if r["same_as_alone"] else "NO")
            print(f"{r['clients']:>8} {r['ttft_p50']:>8.3f}s {r['ttft_p95']:>8.3f}s {r['per_client_tps']:>13.1f} "
                  f"{r['aggregate_tps']:>16.1f} {same:>14}  {r['codes']}")
        if len(rows) > 1:
            print(f"aggregate speed-up, {rows[-1]['clients']} clients vs 1: "
                  f"{rows[-1]['aggregate_tps'] / rows[0]['aggregate_tps']:.2f}x")
        if not args.no_hostile:
            h = hostile(base, proc, args)
            print(f"\nhostile run: status codes {h['codes']} in all; the {h['over_admission']} concurrent requests against "
                  f"{args.limit_concurrency} running + {args.max_queue} queued alone: {h['over_admission_codes']}; "
                  f"then {h['dropped_streams']} streams dropped by their clients")
            print(f"  no 5xx: {h['no_5xx']}; stuck slots after: {h['stuck_slots']}; normal reply after: "
                  f"{h['normal_reply_after']}; server RSS {h['rss_before_mb']:.0f} MB -> {h['rss_after_mb']:.0f} MB "
                  f"(within 10%: {h['rss_within_10pct']})")
            ok = h["no_5xx"] and h["stuck_slots"] == 0 and h["normal_reply_after"] == 200 and h["rss_within_10pct"]
            return 0 if ok else 1
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(main())
