"""train/long_rows.py and --rope_scaling: tiled MLPs, activation offloading and compiled layers give the same
loss and gradients; RoPE scaling reaches the model, the saved run record and serving."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from train.attention import register
from train.collate import collate_packed
from train.long_rows import compile_layers, mlp_modules, offload_activations, tile_mlps
from train.loop import token_loss_sum
from train.modeling import apply_rope_scaling

CPU = torch.device("cpu")


def _pair():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    a = AutoModelForCausalLM.from_config(cfg, attn_implementation=register())
    b = AutoModelForCausalLM.from_config(cfg, attn_implementation=register())
    b.load_state_dict(a.state_dict())
    return a, b


def _batch(lengths=(70, 45, 30)):
    g = torch.Generator().manual_seed(0)
    samples = []
    for n in lengths:
        ids = torch.randint(1, 256, (n,), generator=g).tolist()
        samples.append({"input_ids": ids, "labels": [-100] * 5 + ids[5:]})
    return collate_packed([samples], pad_id=0, varlen=True)


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = token_loss_sum(model, batch, CPU, None)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(a, b):
    assert abs(a[0] - b[0]) <= 1e-5 * abs(b[0])
    for n in b[1]:
        torch.testing.assert_close(a[1][n], b[1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_tiled_mlp_gives_the_same_loss_and_gradients():
    tiled, plain = _pair()
    assert tile_mlps(tiled, 32) == 2 and len(mlp_modules(tiled)) == 2
    batch = _batch()  # 145 positions: 5 tiles of 32
    _assert_same(_loss_and_grads(tiled, batch), _loss_and_grads(plain, batch))
    with torch.no_grad():  # eval: tiles without checkpoints
        torch.testing.assert_close(token_loss_sum(tiled, batch, CPU, None), token_loss_sum(plain, batch, CPU, None))


def test_tiled_mlp_keeps_only_one_tile_of_the_intermediate():
    """The MLP's saved intermediate (gate, up, their product: ~3 × L × I floats) is replaced by tile inputs."""
    tiled, plain = _pair()
    tile_mlps(tiled, 16)
    x = torch.randn(1, 512, 32, requires_grad=True)

    def saved_bytes(mlp) -> int:
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mlp(x).sum()
        return sum(total)

    plain_bytes, tiled_bytes = saved_bytes(mlp_modules(plain)[0]), saved_bytes(mlp_modules(tiled)[0])
    assert plain_bytes >= 3 * 512 * 96 * 4  # the whole row's intermediate
    assert tiled_bytes <= 2 * 512 * 32 * 4  # the tiles' inputs (hidden size), nothing of size I × L


def test_activation_offloading_gives_the_same_gradients():
    offloaded, plain = _pair()
    offload_activations(offloaded, pin_memory=False)  # pinned memory needs CUDA; the mechanism is the same
    batch = _batch()
    _assert_same(_loss_and_grads(offloaded, batch), _loss_and_grads(plain, batch))


@pytest.mark.slow
def test_compiled_layers_give_the_same_loss_and_gradients():
    compiled, plain = _pair()
    assert compile_layers(compiled) == 2
    batch = _batch((40, 24))
    _assert_same(_loss_and_grads(compiled, batch), _loss_and_grads(plain, batch))


def test_rope_scaling_extends_the_config():
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=2048)
    cfg = apply_rope_scaling(LlamaConfig(**small), {"rope_type": "yarn", "factor": 4})
    assert cfg.rope_parameters["rope_type"] == "yarn" and cfg.rope_parameters["factor"] == 4
    assert cfg.rope_parameters["original_max_position_embeddings"] == 2048 and cfg.max_position_embeddings == 8192
    model = AutoModelForCausalLM.from_config(cfg)
    plain = AutoModelForCausalLM.from_config(LlamaConfig(**small))
    assert not torch.allclose(model.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq)


def test_serving_and_exporting_a_lora_adapter_apply_the_runs_rope_scaling(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model

    from serve.loading import load_for_chat

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    adapter = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    adapter.peft_config["default"].base_model_name_or_path = tiny_llama
    adapter.save_pretrained(tmp_path)
    scaling = {"rope_type": "yarn", "factor": 2.0}
    (tmp_path / "chattune.json").write_text(json.dumps({"template": "chatml", "flags": {"rope_scaling": scaling}}))
    loaded = load_for_chat(str(tmp_path))
    params = loaded.model.config.rope_parameters
    assert params["rope_type"] == "yarn" and params["factor"] == 2.0
    assert loaded.context_length == 2 * 1024  # tiny_llama's 1024 positions, doubled
    from train.export_sources import open_weights  # and an export (GGUF, merged HF) of the adapter writes it

    exported = open_weights(str(tmp_path)).weights.config.rope_parameters
    assert exported["rope_type"] == "yarn" and exported["factor"] == 2.0
