"""A tiny random Llama for tests, benchmarks and demos that need a real model without downloading one.

    from scripts.tiny_model import make_tiny_llama
"""

from __future__ import annotations


def make_tiny_llama(out_dir, tokenizer, seed: int = 0, layers: int = 2, context: int = 1024) -> str:
    """A tiny random Llama sized for the real tokenizer's vocab, saved with the tokenizer (hermetic)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                      tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def _arch_config(arch: str, vocab: int, tok):
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id)
    return {
        "llama": lambda: LlamaConfig(**common, tie_word_embeddings=True),
        "mistral": lambda: MistralConfig(**common, tie_word_embeddings=False, sliding_window=None),
        "qwen2": lambda: Qwen2Config(**common, tie_word_embeddings=False),
        # transformers' GGUF loader assumes Qwen3's head_dim 128, as every released Qwen3 has
        "qwen3": lambda: Qwen3Config(**common, head_dim=128, tie_word_embeddings=True),
        "qwen3-wide-heads": lambda: Qwen3Config(**common, head_dim=32, tie_word_embeddings=True),
        # transformers' GGUF loader assumes Gemma-2's query scalar 256, as the released 2B/9B have
        "gemma2": lambda: Gemma2Config(**common, head_dim=256, query_pre_attn_scalar=256, sliding_window=64,
                                       tie_word_embeddings=True),
        # 6 layers: llama.cpp's Gemma-3 pattern makes every 6th layer global, so both kinds are present
        "gemma3": lambda: Gemma3TextConfig(**{**common, "num_hidden_layers": 6}, head_dim=256, query_pre_attn_scalar=256,
                                           sliding_window=8, tie_word_embeddings=True),
    }[arch]()


def make_tiny_model(out_dir, arch: str, tokenizer, scale: float = 1.0, template: str = "chatml",
                    data: list[str] | None = None) -> str:
    """A tiny random model of an exported architecture (llama, mistral, qwen2, qwen3, gemma2, gemma3), saved like a
    training output: weights, tokenizer and a chattune.json naming the template and data. `scale` multiplies
    the matrices: a random model's logits are nearly flat, and larger weights keep greedy choices clear of ties."""
    import json
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_arch_config(arch, len(tokenizer), tokenizer))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "chattune.json").write_text(json.dumps({"template": template, "mode": "full",
                                                   "flags": {"data_path": data or []}}))
    return str(out)
