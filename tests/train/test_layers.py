"""train/layers.py: decoder-layer detection and the frozen weights both sharded backends keep whole."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from train.layers import decoder_layer_classes, replicated_frozen_params
from train.sharding_config import FSDPConfigError


def test_decoder_layers_are_detected_and_a_wrong_name_is_refused(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert [c.__name__ for c in decoder_layer_classes(model, ())] == ["LlamaDecoderLayer"]
    with pytest.raises(FSDPConfigError, match="no module of class \\['GPT2Block'\\].*LlamaDecoderLayer"):
        decoder_layer_classes(model, ("GPT2Block",))


def test_only_frozen_parameters_outside_the_layer_units_are_replicated(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    units = list(model.model.layers)
    assert replicated_frozen_params(model, units) == set()  # full fine-tune: everything is sharded
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    assert replicated_frozen_params(model, units) == {model.model.embed_tokens.weight, model.model.norm.weight}
