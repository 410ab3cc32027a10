"""What each architecture we train looks like in GGUF: its llama.cpp name, the metadata keys llama.cpp reads,
the tensor names (gguf-py's own `TensorNameMap`) and the few tensors whose layout differs from HF's.

Only the mapping is ours; names and keys come from gguf-py. Layout differences, each undone by transformers'
GGUF loader and by llama.cpp:
- llama/mistral: llama.cpp's rotary embedding pairs adjacent dimensions (GPT-J style), HF's pairs the two halves
  of each head, so the rows of `q_proj`/`k_proj` are permuted per head. Qwen2/Qwen3/Gemma use NeoX-style rotary in
  llama.cpp, as HF does: no permutation.
- gemma2/gemma3: HF's RMSNorm multiplies by `1 + weight`, llama.cpp's by `weight`, so norm weights are stored plus
  one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gguf
import torch


class ArchExportError(ValueError):
    pass


def _rope(cfg) -> dict:
    """rope settings in transformers 5 (`rope_parameters`) or 4 (`rope_theta`, `rope_scaling`)."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    if "full_attention" in params:  # per layer type (Gemma-3): GGUF's rope settings are the global layers'
        params = dict(params["full_attention"])
    if "rope_theta" not in params and getattr(cfg, "rope_theta", None) is not None:
        params["rope_theta"] = cfg.rope_theta
    scaling = getattr(cfg, "rope_scaling", None)
    if isinstance(scaling, dict):
        params = {**scaling, **params}
    return params


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's half-split rotary layout -> llama.cpp's interleaved one, for q/k projection rows (weights or biases)."""
    rows = w.shape[0]
    return (w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool = False
    norm_plus_one: bool = False

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


# HF model_type -> GGUF. Mistral is written as llama, as llama.cpp's own converter does.
ARCHS = {
    "llama": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": ArchSpec(gguf.MODEL_ARCH.QWEN2),
    "qwen3": ArchSpec(gguf.MODEL_ARCH.QWEN3),
    "gemma2": ArchSpec(gguf.MODEL_ARCH.GEMMA2, norm_plus_one=True),
    "gemma3_text": ArchSpec(gguf.MODEL_ARCH.GEMMA3, norm_plus_one=True),
}
GEMMA3_GLOBAL_EVERY = 6  # llama.cpp's Gemma-3: every 6th layer attends globally, the others in a sliding window
GEMMA3_LOCAL_THETA = 10000.0  # and the sliding layers' rope base is fixed there


def arch_spec(cfg) -> ArchSpec:
    spec = ARCHS.get(cfg.model_type)
    if spec is None:
        raise ArchExportError(f"model type {cfg.model_type!r} cannot be exported to GGUF; supported: "
                              f"{', '.join(sorted(ARCHS))}")
    if cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None):
        raise ArchExportError(f"a Mistral with sliding_window={cfg.sliding_window} has no llama GGUF equivalent")
    if cfg.model_type == "gemma3_text":
        _check_gemma3(cfg)
    if cfg.model_type in ("gemma2", "gemma3_text") and cfg.query_pre_attn_scalar != head_dim(cfg):
        # llama.cpp scales Gemma-2's queries by 1/sqrt(head_dim) (27B's other scalar is special-cased by its layer
        # count) and transformers' loader assumes the default 256: the file has no key for another value
        raise ArchExportError(f"a Gemma with query_pre_attn_scalar={cfg.query_pre_attn_scalar} != head_dim="
                              f"{head_dim(cfg)} cannot be expressed in GGUF")
    return spec


def _check_gemma3(cfg) -> None:
    """What llama.cpp's Gemma-3 fixes rather than reads: the layer pattern and the sliding layers' rope base."""
    pattern = ["full_attention" if (i + 1) % GEMMA3_GLOBAL_EVERY == 0 else "sliding_attention"
               for i in range(cfg.num_hidden_layers)]
    if list(getattr(cfg, "layer_types", pattern)) != pattern:
        raise ArchExportError("a Gemma-3 whose layer_types are not every 6th layer global cannot be expressed in GGUF")
    local = (getattr(cfg, "rope_parameters", None) or {}).get("sliding_attention", {})
    if float(local.get("rope_theta", GEMMA3_LOCAL_THETA)) != GEMMA3_LOCAL_THETA:
        raise ArchExportError(f"a Gemma-3 whose sliding layers' rope_theta is {local['rope_theta']} (llama.cpp fixes "
                              f"{GEMMA3_LOCAL_THETA:g}) cannot be expressed in GGUF")


def add_metadata(writer: gguf.GGUFWriter, cfg, spec: ArchSpec) -> None:
    """The hyperparameters llama.cpp and transformers' GGUF loader read, from the HF config."""
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_block_count(int(cfg.num_hidden_layers))
    writer.add_feed_forward_length(int(cfg.intermediate_size))
    writer.add_head_count(int(cfg.num_attention_heads))
    writer.add_head_count_kv(int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(int(cfg.vocab_size))
    rope = _rope(cfg)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    hd = head_dim(cfg)
    writer.add_rope_dimension_count(hd)
    if hd != cfg.hidden_size // cfg.num_attention_heads or spec.gguf_arch in (
            gguf.MODEL_ARCH.QWEN3, gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3):
        writer.add_key_length(hd)
        writer.add_value_length(hd)
    _add_rope_scaling(writer, rope)
    if spec.gguf_arch == gguf.MODEL_ARCH.GEMMA2:
        writer.add_attn_logit_softcapping(float(cfg.attn_logit_softcapping or 0.0))
        writer.add_final_logit_softcapping(float(cfg.final_logit_softcapping or 0.0))
        writer.add_sliding_window(int(cfg.sliding_window))
    if spec.gguf_arch == gguf.MODEL_ARCH.GEMMA3:
        writer.add_sliding_window(int(cfg.sliding_window))


def _add_rope_scaling(writer: gguf.GGUFWriter, rope: dict) -> None:
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default":
        return
    factor = float(rope.get("factor", 1.0))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        if rope.get("original_max_position_embeddings"):
            writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    else:
        # llama3-style frequency scaling is a precomputed rope_freqs tensor in llama.cpp: not written yet
        raise ArchExportError(f"rope scaling {kind!r} cannot be exported to GGUF yet (linear and yarn can)")


def tensor_plan(cfg, spec: ArchSpec, hf_names: list[str]) -> list[tuple[str, str, Callable | None]]:
    """[(hf_name, gguf_name, transform)] in file order; a tied lm_head is left out (llama.cpp reuses the
    embedding), buffers such as rotary `inv_freq` are recomputed by every runtime."""
    names = gguf.get_tensor_name_map(spec.gguf_arch, int(cfg.num_hidden_layers))
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    plan = []
    for hf in hf_names:
        if hf.endswith(".rotary_emb.inv_freq"):
            continue
        if hf == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False):
            continue
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ArchExportError(f"tensor {hf!r} of a {cfg.model_type} model has no GGUF name in gguf-py's map")
        transform = None
        if spec.permute_qk and ".self_attn.q_proj." in hf:
            transform = _permuter(int(cfg.num_attention_heads))
        elif spec.permute_qk and ".self_attn.k_proj." in hf:
            transform = _permuter(kv_heads)
        elif spec.norm_plus_one and hf.endswith("norm.weight"):
            transform = _plus_one
        plan.append((hf, name, transform))
    if not any(g == "token_embd.weight" for _, g, _ in plan):
        raise ArchExportError("the model has no token embedding (model.embed_tokens.weight)")
    return plan


def _permuter(n_heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda w: permute_rope_rows(w, n_heads)


def _plus_one(w: torch.Tensor) -> torch.Tensor:
    return w + 1
