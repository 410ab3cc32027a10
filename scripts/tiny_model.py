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
