"""A `.gguf` model source loads as an ordinary float model that saves and reloads in plain transformers."""

from __future__ import annotations

import pytest
import torch

from train.modeling import ModelLoadError, load_causal_lm


def test_smollm2_gguf_loads_saves_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    model = load_causal_lm("asset:smollm2")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576 and model.config.vocab_size == 49152
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reloaded(x).logits)


def test_bad_model_sources(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_causal_lm(tmp_path / "nope.gguf")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_causal_lm(tmp_path / "w.bin")
