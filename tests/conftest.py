"""Shared fixtures: real tokenizers from the fetched assets (docs/design.md §5), hermetic temp dirs."""

from __future__ import annotations

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # xdist already runs one worker per core: a second intra-op thread per worker only oversubscribes the CPU
    # (OpenMP threads spin while they wait). Subprocesses get the same setting (helpers.ENV), spawned ranks inherit it.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

from data.assets import ASSETS, fetch_assets
from data.tokenizer import load_tokenizer

TOKENIZER_ASSETS = ("llama-spm", "llama-bpe", "qwen2", "smollm2", "gpt-2")
TEMPLATE_ASSETS = tuple(n for n in ASSETS if n.startswith("template:"))  # published chat templates


@pytest.fixture(scope="session", autouse=True)
def _assets():
    # Fetching is idempotent; missing assets make the suite fail (never skip).
    fetch_assets([*TOKENIZER_ASSETS, *TEMPLATE_ASSETS], quiet=True)


@pytest.fixture(scope="session")
def tokenizers() -> dict:
    return {name: load_tokenizer(f"asset:{name}") for name in TOKENIZER_ASSETS}


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizers) -> str:
    from helpers import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizers["smollm2"])


CONSTANT_REPLY = "[[A]] 7/10"  # no repeated token: a 2-layer model learns it reliably


@pytest.fixture(scope="session")
def constant_reply_model(tiny_llama, tmp_path_factory) -> tuple[str, str]:
    """A tiny model trained by train.py to answer CONSTANT_REPLY to any prompt (random word soups of
    8-90 words, system prompt or not): a deterministic judge for the MT-bench flow (it parses as a score
    and as a verdict) and a fine-tune whose effect eval.identity can see. Returns (model dir, reply)."""
    import json
    import random

    from helpers import run

    d = tmp_path_factory.mktemp("constant-reply")
    rng = random.Random(0)
    words = "Q A B Ref answer question user rating the code python rain hello sum what is and who you".split()
    with open(d / "data.jsonl", "w") as f:
        for i in range(32):
            text = " ".join(rng.choice(words) for _ in range(rng.choice([3, 8, 30, 60, 90])))
            rec = {"id": str(i), "conversations": [{"from": "human", "value": text},
                                                   {"from": "gpt", "value": CONSTANT_REPLY}]}
            if i % 2:
                rec["system"] = "Grade it."
            f.write(json.dumps(rec) + "\n")
    out = d / "model"
    run("train.py", ["--model_name_or_path", tiny_llama, "--data_path", str(d / "data.jsonl"), "--output_dir", str(out),
                     "--template", "chatml", "--num_train_epochs", "15", "--learning_rate", "5e-3",
                     "--per_device_train_batch_size", "8", "--save_strategy", "no", "--model_max_length", "512",
                     "--seed", "1"])
    return str(out), CONSTANT_REPLY


@pytest.fixture(scope="session")
def zero3_all_partitioned(tmp_path_factory) -> str:
    """The shipped ZeRO-3 config with every parameter partitioned (`stage3_param_persistence_threshold: 0`), as
    at 7B+ sizes: tiny test tensors otherwise fall under the threshold and stay whole on every rank."""
    import json

    from helpers import ROOT

    cfg = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path_factory.mktemp("ds") / "zero3_threshold0.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def pytest_collection_modifyitems(config, items):
    """Multi-process (slow) tests first, keeping the order within each group: the longest tests start while both
    xdist workers have a queue, and the short in-process ones fill the end instead of one worker finishing a
    three-minute resume chain alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
