"""The GGUF vocabulary built from an HF tokenizer (train/gguf_vocab.py) against llama.cpp's own converter's output:
our test tokenizers were converted *from* llama.cpp's vocabulary files, so building the GGUF arrays back from the
HF tokenizer must give those files' arrays."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from data.assets import resolve_source
from train.gguf_vocab import VocabExportError, build_vocab, detect_pre


def _fields(name: str) -> dict:
    reader = gguf.GGUFReader(resolve_source(f"asset:{name}"))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.ggml.")}


@pytest.mark.parametrize("name,model,pre", [("smollm2", "gpt2", "smollm"), ("llama-spm", "llama", "default"),
                                            ("llama-bpe", "gpt2", "llama-bpe")])  # qwen2: same code as llama-bpe
def test_arrays_match_llama_cpps_converter(name, model, pre, tokenizers):
    tok = tokenizers[name]
    want = _fields(name)
    # SmolLM2's pre-tokenizer name comes from its GGUF (transformers' conversion drops its digit splitting); the
    # others' from their split regex (reading a 150k-token GGUF twice would double this test's time)
    vocab = build_vocab(tok, origin_gguf=resolve_source(f"asset:{name}") if name == "smollm2" else None)
    assert (vocab.model, vocab.pre) == (model, pre) == (want["tokenizer.ggml.model"], want["tokenizer.ggml.pre"])
    n = len(want["tokenizer.ggml.tokens"])  # transformers appends one token to Llama-3's 128256 on conversion
    assert vocab.tokens[:n] == want["tokenizer.ggml.tokens"]
    assert vocab.types[:n] == want["tokenizer.ggml.token_type"]
    assert vocab.merges == want.get("tokenizer.ggml.merges", [])
    assert vocab.add_bos == bool(want.get("tokenizer.ggml.add_bos_token", False))
    assert vocab.special_ids["eos"] == want["tokenizer.ggml.eos_token_id"]


def test_pre_tokenizer_named_from_the_split_regex(tokenizers):
    import json

    spec = json.loads(tokenizers["llama-bpe"].backend_tokenizer.to_str())
    assert detect_pre(spec) == "llama-bpe"
    assert detect_pre(json.loads(tokenizers["qwen2"].backend_tokenizer.to_str())) == "qwen2"
    assert detect_pre(json.loads(tokenizers["gpt-2"].backend_tokenizer.to_str())) == "gpt-2"
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\s+"
    assert detect_pre(spec) is None


def test_unknown_split_rule_and_too_small_embedding_are_one_line_errors(tokenizers, tmp_path):
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizers["qwen2"].backend_tokenizer.to_str())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\s+"
    odd = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                  eos_token="<|endoftext|>")
    with pytest.raises(VocabExportError, match="--pre-tokenizer NAME"):
        build_vocab(odd)
    with pytest.raises(VocabExportError, match="embedding has 1000 rows"):
        build_vocab(tokenizers["smollm2"], n_vocab=1000)


def test_padding_rows_become_unused_tokens(tokenizers):
    vocab = build_vocab(tokenizers["smollm2"], n_vocab=49152 + 64)
    assert len(vocab.tokens) == len(vocab.types) == 49152 + 64 and len(set(vocab.tokens)) == len(vocab.tokens)
    assert set(vocab.types[49152:]) == {int(gguf.TokenType.UNUSED)}


def test_sentencepiece_scores_tokenize_like_training(tokenizers, tmp_path):
    """Llama-2's scores are rebuilt from the merge ranks; a vocabulary-only GGUF written from them must tokenize
    as training's tokenizer does when transformers (which builds its merges from the scores) loads it."""
    from transformers import AutoTokenizer

    tok = tokenizers["llama-spm"]
    vocab = build_vocab(tok)
    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    vocab.add_to(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    texts = ["Hello world", "  leading spaces and\nnewlines\t tabs", "naïve café 1234567 🤖 ∑x²",
             "The quick brown fox jumps over the lazy dog. " * 3, "don't won't they'll"]
    for text in texts:
        assert back(text).input_ids == tok(text).input_ids, text
    assert Path(path).stat().st_size > 0
