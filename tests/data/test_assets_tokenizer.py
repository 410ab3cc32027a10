"""Assets are fetched idempotently; `.gguf` and `asset:` sources load; the run encoder proves itself."""

from __future__ import annotations

import subprocess
import sys

import pytest

from data.assets import ASSETS, asset_path, cache_dir, fetch_assets, resolve_source
from data.tokenizer import RunEncoder, TokenizerError, load_tokenizer


def test_fetch_is_idempotent_and_paths_resolve():
    before = {n: asset_path(n).stat().st_mtime_ns for n in ("llama-spm", "qwen2")}
    paths = fetch_assets(["llama-spm", "qwen2"], quiet=True)
    assert {n: p.stat().st_mtime_ns for n, p in paths.items()} == before  # nothing re-downloaded
    assert resolve_source("asset:qwen2") == str(cache_dir() / ASSETS["qwen2"].filename)
    assert resolve_source("some/dir") == "some/dir"


def test_unknown_or_missing_asset_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown asset 'nope'"):
        asset_path("nope")
    monkeypatch.setenv("CHATTUNE_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"run `python -m data.assets`"):
        asset_path("gpt-2")


def test_assets_cli_prints_paths():
    proc = subprocess.run([sys.executable, "-m", "data.assets", "llama-spm"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("llama-spm\t") and proc.stdout.strip().endswith(".gguf")
    bad = subprocess.run([sys.executable, "-m", "data.assets", "llama-99"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown asset" in bad.stderr


def test_gguf_path_and_asset_name_load_the_same_tokenizer(tokenizers):
    from_path = load_tokenizer(str(asset_path("llama-spm")))
    text = "Hello world</s> again"
    assert from_path(text).input_ids == tokenizers["llama-spm"](text).input_ids
    assert len(tokenizers["llama-bpe"]) == 128257 and len(tokenizers["llama-spm"]) == 32000
    assert tokenizers["qwen2"].chat_template and tokenizers["smollm2"].chat_template


def test_bad_tokenizer_sources(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.gguf")
    weird = tmp_path / "vocab.txt"
    weird.write_text("x")
    with pytest.raises(TokenizerError, match="not a .gguf"):
        load_tokenizer(weird)


def test_run_encoder_refuses_whitespace_stripping_added_tokens():
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from data.assets import asset_path as ap

    tok = AutoTokenizer.from_pretrained(ap("gpt-2").parent, gguf_file=ap("gpt-2").name)
    tok.add_special_tokens({"additional_special_tokens": [AddedToken("<|turn|>", lstrip=True)]})
    with pytest.raises(TokenizerError, match="strips whitespace"):
        RunEncoder(tok)


@pytest.mark.parametrize("asset", ["llama-spm", "llama-bpe", "qwen2", "smollm2"])
def test_run_encoder_prefix_matches_tokenizer(asset, tokenizers):
    tok = tokenizers[asset]
    enc = RunEncoder(tok)
    assert enc.prefix_ids + tok("x", add_special_tokens=False).input_ids + enc.suffix_ids == tok("x").input_ids
