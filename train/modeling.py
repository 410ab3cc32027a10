"""Loading causal LMs (HF dir, hub id, `.gguf`, `asset:NAME`) and preparing them for training.

A GGUF checkpoint is dequantized to float once and cached as an HF safetensors directory keyed by
the file's size and mtime, so later loads are fast and every loading option (quantization for QLoRA,
attention implementation, dtype) works on it like on any HF model. transformers marks a GGUF-loaded
model as quantized (`hf_quantizer`, `config.quantization_config`), which blocks saving and training;
the marker is cleared before the cache is written.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from data.assets import cached_conversion, resolve_source


class ModelLoadError(ValueError):
    pass


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def materialize_gguf(path: str | os.PathLike) -> Path:
    """HF directory holding the dequantized weights of a `.gguf` model (built once, then cached)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")

    def build(tmp: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)

    return cached_conversion(path, "models", "config.json", build)


def resolve_model_dir(source: str | os.PathLike) -> str:
    """An HF dir or hub id for any accepted model source (GGUF files are materialized)."""
    source = resolve_source(source)
    if source.endswith(".gguf"):
        return str(materialize_gguf(source))
    if os.path.isfile(source):
        raise ModelLoadError(f"model source {source} is a file but not a .gguf; pass a directory or hub id")
    if source.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(source)):
        raise ModelLoadError(f"model source {source} does not exist")
    return source


def load_causal_lm(source: str | os.PathLike, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                   **kwargs):
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model_dir(source)
    try:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as e:
        raise ModelLoadError(f"cannot load a model from {source!r}: {e}") from e


def disable_avx512bf16_repack(model) -> int:
    """Work around bitsandbytes' CPU AVX512-BF16 path (docs/design.md §4): a 4-bit forward in eval mode
    repacks weights and later backward silently gives no LoRA gradients for earlier layers."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False) is not False:
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def apply_rope_scaling(config, scaling: dict):
    """Extend a config's context with RoPE scaling (--rope_scaling): merged into `rope_parameters` (transformers
    5), the original context kept as `original_max_position_embeddings` and `max_position_embeddings` raised by
    the factor, so a saved config (and serving, which reads it) uses the scaled positions."""
    if not scaling:
        return config
    params = dict(getattr(config, "rope_parameters", None) or {})
    original = params.get("original_max_position_embeddings") or getattr(config, "max_position_embeddings", None)
    params.update(scaling)
    if scaling["rope_type"] != "linear" and original:
        params["original_max_position_embeddings"] = original
    config.rope_parameters = params
    if original and scaling.get("factor"):
        config.max_position_embeddings = int(original * scaling["factor"])
    return config


def run_config(model_dir: str | os.PathLike, record: dict | None = None):
    """A base model's config as a run trained it: with the --rope_scaling its chattune.json records (an adapter or
    a checkpoint was trained on the scaled positions; serving and export load the base this way)."""
    from transformers import AutoConfig

    return apply_rope_scaling(AutoConfig.from_pretrained(model_dir), ((record or {}).get("flags") or {}).get("rope_scaling"))
