"""Loading causal LMs from an HF dir, a hub id, a `.gguf` file or `asset:NAME` (DESIGN.md §2, §5).

A GGUF checkpoint is dequantized to float on load. transformers marks such a model as quantized
(`hf_quantizer`, `config.quantization_config`), which blocks saving and training, so the marker is
cleared: after loading, the model is an ordinary float model.
"""

from __future__ import annotations

import os

import torch

from data.assets import resolve_source


class ModelLoadError(ValueError):
    pass


def load_causal_lm(source: str | os.PathLike, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                   **kwargs):
    from transformers import AutoModelForCausalLM

    source = resolve_source(source)
    if source.endswith(".gguf"):
        if not os.path.isfile(source):
            raise ModelLoadError(f"model file {source} does not exist")
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(os.path.abspath(source)), gguf_file=os.path.basename(source), dtype=dtype, **kwargs)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        for attr in ("is_quantized", "quantization_method"):
            if hasattr(model, attr):
                try:
                    delattr(model, attr)
                except AttributeError:
                    pass
        return model
    if os.path.isfile(source):
        raise ModelLoadError(f"model source {source} is a file but not a .gguf; pass a directory or hub id")
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as e:
        raise ModelLoadError(f"cannot load a model from {source!r}: {e}") from e
