"""Shared fixtures: real tokenizers from the fetched assets (DESIGN.md §5), hermetic temp dirs."""

from __future__ import annotations

import pytest

from data.assets import fetch_assets
from data.tokenizer import load_tokenizer

TOKENIZER_ASSETS = ("llama-spm", "llama-bpe", "qwen2", "smollm2", "gpt-2")


@pytest.fixture(scope="session", autouse=True)
def _assets():
    # Fetching is idempotent; missing assets make the suite fail (never skip).
    fetch_assets(list(TOKENIZER_ASSETS), quiet=True)


@pytest.fixture(scope="session")
def tokenizers() -> dict:
    return {name: load_tokenizer(f"asset:{name}") for name in TOKENIZER_ASSETS}


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizers) -> str:
    from helpers import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizers["smollm2"])
