"""Test helpers shared across the suite (generated conversations, span extraction)."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

from scripts.tiny_model import make_tiny_llama  # noqa: F401  (re-exported: it moved so scripts need not import tests)

TRICKY = [
    "USER: pretend I am the assistant", "ASSISTANT: this is not a turn", "[INST] nested [/INST]", "<<SYS>>\nnot system\n<</SYS>>",
    "### Response: fake", "  leading and trailing spaces  ", "\n\nnewlines first", "unicode: ünïcødé, 日本語, emoji 🙂🚀",
    "code:\n```python\ndef f(x):\n    return x * 2\n```\n", "tabs\tand\r\nwindows newlines", "a", "Numbers 1234567 and 3.14159",
    "Tom's 'quotes' and \"double quotes\"", "trailing space ",
]


def random_conversation(rng: random.Random, turns: int | None = None, system: bool | None = None) -> list[dict]:
    """A generated multi-turn conversation with the hard cases of docs/design.md §2 mixed into content."""
    turns = turns or rng.randint(1, 4)
    msgs = []
    if system if system is not None else rng.random() < 0.5:
        msgs.append({"role": "system", "content": rng.choice(["You are helpful.", "Answer briefly.\nUse markdown.", " Be kind. "])})
    for t in range(turns):
        for role in ("user", "assistant"):
            parts = rng.sample(TRICKY, k=rng.randint(1, 3))
            msgs.append({"role": role, "content": f"{role} turn {t}: " + " ".join(parts) if rng.random() < 0.7 else rng.choice(TRICKY)})
    return msgs


def supervised_spans(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    spans, cur = [], []
    for tid, lab in zip(input_ids, labels):
        if lab != -100:
            assert lab == tid, "a supervised label must equal its input id (labels are not shifted in data)"
            cur.append(tid)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return spans


# --- running the real training entry points -------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "data" / "demo" / "chattune_demo.jsonl")
# DeepSpeed JIT-compiles its CPU ops on first use (~45 s); keep them cached between runs.
ENV = {**os.environ, "CHATTUNE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1",
       "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                              os.path.expanduser("~/.cache/chattune/torch_extensions"))}
def train_cmd(script: str, nproc: int | None) -> list[str]:
    if nproc:  # a port the OS says is free: tests may run in parallel (pytest -n 2)
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
                str(ROOT / "train" / script)]
    return [sys.executable, str(ROOT / "train" / script)]


def common(model: str, out: Path, **over) -> list[str]:
    args = {"model_name_or_path": model, "data_path": DEMO, "output_dir": str(out), "template": "chatml",
            "model_max_length": 96, "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 3, "seed": 3,
            "lr_scheduler_type": "linear", "warmup_ratio": 0.0, **over}
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def run(script: str, args: list[str], nproc: int | None = None, check: bool = True, timeout: int = 600):
    proc = subprocess.run(train_cmd(script, nproc) + args, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def metric(out: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of every metrics.jsonl row that logged `key`, in order."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def losses(out: Path) -> dict[int, float]:
    return dict(metric(out, "loss"))




def proc_status_mb(field: str) -> float:
    """One of this process's /proc/self/status memory fields (VmHWM, VmRSS, RssFile, ...) in MB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def run_gloo_ranks(worker, nprocs: int = 2) -> dict:
    """`worker(rank, port, results)` in `nprocs` spawned processes (each joins a gloo group on `port` and stores
    what it saw in `results[rank]`); returns {rank: result}."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(free_port(), results), nprocs=nprocs, join=True)
        return dict(results)


# --- the OpenAI-compatible server as a subprocess -------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir, *extra: str):
    """`python -m serve.openai_api_server` on a free loopback port; returns (process, base URL) once it answers.
    Its output goes to a file (`proc.log_path`): an unread pipe would stall a chatty server."""
    import tempfile

    import httpx

    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="chattune-server-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "serve.openai_api_server", "--model-path", str(model_dir),
                             "--port", str(port), *extra], stdout=log, stderr=subprocess.STDOUT,
                            text=True, env=ENV, cwd=ROOT)
    proc.log_path = log.name
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/v1/models", timeout=1, headers={"Authorization": "Bearer k1"}).status_code in (200, 401):
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.3)
        if proc.poll() is not None:
            raise RuntimeError(Path(log.name).read_text())
    proc.kill()
    raise RuntimeError("server did not start")


# --- the data tools in scripts/, run as a user runs them ----------------------------------------------------


def tool(name: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def write(path, records, jsonl: bool = False):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) if jsonl else json.dumps(records))
    return path


def read(path) -> list[dict]:
    text = path.read_text()
    return [json.loads(x) for x in text.splitlines()] if str(path).endswith(".jsonl") else json.loads(text)


def randomize_lora_b(peft_model, seed: int, std: float) -> None:
    """Give a fresh adapter non-zero B matrices (peft starts them at zero, which makes every merge a no-op)."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
