"""GGUF export (train/export_gguf.py, train/gguf_arch.py, train/export_sources.py) and the parity gate
(eval/parity.py) on tiny random models of every architecture we export, in the transformers runtime.
llama.cpp's half runs in `make export-demo` (docs/export.md): building it does not fit the suite's time."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from helpers import randomize_lora_b

from eval import parity
from scripts.tiny_model import make_tiny_model
from train.export_gguf import tensor_type, write_gguf
from train.export_sources import ExportError, open_weights
from train.gguf_arch import ArchExportError, permute_rope_rows

DEMO = Path(__file__).resolve().parents[2] / "data" / "demo" / "chattune_demo.jsonl"


def _model_dir(tmp: Path, arch: str, tok, scale: float = 1.0, template: str = "chatml") -> Path:
    return Path(make_tiny_model(tmp, arch, tok, scale=scale, template=template, data=[str(DEMO)]))


@pytest.mark.parametrize("arch,tokenizer,template", [
    ("llama", "llama-spm", "llama-2"),  # SentencePiece vocabulary, automatic BOS
    ("mistral", "llama-spm", "vicuna_v1.1"),
    ("qwen2", "smollm2", "chatml"),  # byte-level BPE
    # the smaller vocabulary for the rest: reading a GGUF's 49k tokens and merges is most of each test's time
    ("qwen3", "llama-spm", "chatml"),
    ("gemma2", "llama-spm", "zephyr"),
    ("gemma3", "llama-spm", "chatml"),
])
def test_gate_passes_for_each_architecture(arch, tokenizer, template, tmp_path, tokenizers):
    tok = tokenizers[tokenizer]
    out = _model_dir(tmp_path / arch, arch, tok, scale=8.0, template=template)
    src = open_weights(str(out))
    gguf_path = write_gguf(src, tok, template, tmp_path / f"{arch}.gguf", "f32")
    reader = gguf.GGUFReader(gguf_path)
    assert reader.fields["general.architecture"].contents() == {"mistral": "llama"}.get(arch, arch)
    assert reader.fields["tokenizer.ggml.model"].contents() == ("llama" if tokenizer == "llama-spm" else "gpt2")
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) == (arch in ("mistral", "qwen2"))  # tied embeddings write no output matrix
    reports = parity.run(str(out), str(gguf_path), n=3, n_greedy=8, runtimes={"transformers", "jinja2-sandboxed"})
    assert [r.status for r in reports] == ["passed", "passed"], parity.format_reports(reports, str(gguf_path))
    logits = next(c for c in reports[0].checks if c.name.startswith("max"))
    assert float(logits.value) < 1e-3


def test_runtime_that_cannot_load_a_shape_is_skipped_with_its_reason(tmp_path, tokenizers):
    """A Qwen3 whose head_dim is not 128: the file says so (key_length, which llama.cpp reads), transformers'
    loader cannot, and the gate says why instead of passing or crashing."""
    out = _model_dir(tmp_path / "q", "qwen3-wide-heads", tokenizers["llama-spm"], scale=8.0)
    path = write_gguf(open_weights(str(out)), tokenizers["llama-spm"], "chatml", tmp_path / "q.gguf", "f16")
    assert gguf.GGUFReader(path).fields["qwen3.attention.key_length"].contents() == 32
    reports = parity.run(str(out), str(path), n=2, n_greedy=4, runtimes={"transformers", "jinja2-sandboxed"})
    assert reports[0].status.startswith("skipped: transformers' GGUF loader reads no head_dim for qwen3")
    assert reports[1].status == "passed"


def test_gate_fails_loudly_on_a_wrong_export(tmp_path, tokenizers):
    """Two different models: the gate must fail on logits and replies, not pass on matching prompt ids."""
    tok = tokenizers["llama-spm"]
    a = _model_dir(tmp_path / "a", "llama", tok, scale=8.0, template="llama-2")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(a)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(-1)  # what a wrong rotary permutation looks like
    b = tmp_path / "b"
    model.save_pretrained(b)
    tok.save_pretrained(b)
    bad = write_gguf(open_weights(str(b)), tok, "llama-2", tmp_path / "b.gguf", "f32")
    reports = parity.run(str(a), str(bad), n=3, n_greedy=8, runtimes={"transformers"})
    assert reports[0].status == "failed"
    failed = {c.name for c in reports[0].checks if c.ok is False}
    assert "max |logit difference|" in failed and "prompt ids identical" not in failed


def test_missing_runtime_is_skipped_not_passed(tmp_path, tokenizers, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_llama_cpp(name, *args, **kwargs):
        if name == "llama_cpp" or name.startswith("llama_cpp."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    out = _model_dir(tmp_path / "m", "llama", tokenizers["smollm2"], scale=8.0)
    path = write_gguf(open_weights(str(out)), tokenizers["smollm2"], "chatml", tmp_path / "m.gguf", "f16")
    monkeypatch.setattr(builtins, "__import__", no_llama_cpp)
    reports = parity.run(str(out), str(path), n=2, n_greedy=4, runtimes={"llama.cpp"})
    assert [(r.runtime, r.status.split(":")[0]) for r in reports] == [("llama.cpp", "skipped")]
    text = parity.format_reports(reports, str(path))
    assert "skipped" in text and "PASSED" not in text


def test_quantized_types_follow_the_rules_and_load(tmp_path, tokenizers):
    assert tensor_type("blk.0.attn_norm.weight", (64,), "q4_0") == gguf.GGMLQuantizationType.F32
    assert tensor_type("blk.0.attn_q.weight", (64, 64), "q4_0") == gguf.GGMLQuantizationType.Q4_0
    assert tensor_type("token_embd.weight", (100, 64), "q4_0") == gguf.GGMLQuantizationType.Q8_0
    assert tensor_type("blk.0.ffn_down.weight", (64, 48), "q8_0") == gguf.GGMLQuantizationType.F16  # 48 % 32
    out = _model_dir(tmp_path / "m", "llama", tokenizers["smollm2"])
    src = open_weights(str(out))
    path = write_gguf(src, tokenizers["smollm2"], "chatml", tmp_path / "m.gguf", "q8_0")
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_up.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    back = gguf.quants.dequantize(t.data, t.tensor_type)
    ref = src.weights.load("model.layers.1.mlp.up_proj.weight").numpy()
    assert np.abs(back - ref).max() <= np.abs(ref).max() / 127 + 1e-6  # one q8_0 step at most


def test_rope_permutation_is_the_inverse_of_transformers_loader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(4 * 16, 64)
    ours = permute_rope_rows(w, 4).numpy()
    back = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 4}).process(
        ours, "blk.0.attn_q.weight").weights
    np.testing.assert_array_equal(back, w.numpy())
    assert not np.array_equal(ours, w.numpy())


def test_lora_adapter_merges_like_peft(tmp_path, tokenizers):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = _model_dir(tmp_path / "base", "llama", tokenizers["smollm2"])
    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 3})
    peft_model = get_peft_model(model, cfg)
    randomize_lora_b(peft_model, seed=1, std=0.5)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    merged = peft_model.merge_and_unload().state_dict()
    src = open_weights(str(adapter), base_model_path=str(base))
    assert src.kind == "adapter" and len(src.weights.deltas) == 3 * 2
    for name in src.weights.names:
        torch.testing.assert_close(src.weights.load(name), merged[name], rtol=1e-5, atol=1e-6, msg=name)


def test_checkpoint_source_reads_the_portable_layout(tmp_path, tokenizers):
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    base = _model_dir(tmp_path / "base", "llama", tokenizers["smollm2"])
    model = AutoModelForCausalLM.from_pretrained(base)
    state = {k: v.clone() + 1 for k, v in model.state_dict().items() if k != "lm_head.weight"}
    ckpt = tmp_path / "run" / "checkpoint-3"
    dcp.save({"model": state}, checkpoint_id=str(ckpt / "dcp"), no_dist=True)
    (ckpt / "trainer_state.json").write_text("{}")
    with pytest.raises(ExportError, match="--base-model-path"):
        open_weights(str(ckpt))
    src = open_weights(str(ckpt), base_model_path=str(base))
    assert src.kind == "checkpoint"
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight", "model.norm.weight"):
        torch.testing.assert_close(src.weights.load(name), state[name])


def test_lora_checkpoint_merges_its_adapter_into_the_base(tmp_path, tokenizers):
    """A LoRA run's checkpoint holds only the trained tensors (train/portable_state.py's layout); the export
    merges them into the base as peft would."""
    import torch.distributed.checkpoint as dcp
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from train.portable_state import torch_state

    base = _model_dir(tmp_path / "base", "llama", tokenizers["smollm2"])
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), cfg)
    randomize_lora_b(model, seed=3, std=0.5)
    run = tmp_path / "run"
    state = torch_state(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), is_peft=True)
    dcp.save(state, checkpoint_id=str(run / "checkpoint-4" / "dcp"), no_dist=True)
    (run / "checkpoint-4" / "trainer_state.json").write_text("{}")
    with pytest.raises(ExportError, match="adapter_config.json, which the run writes when it ends"):
        open_weights(str(run / "checkpoint-4"), base_model_path=str(base))
    cfg.save_pretrained(run)
    src = open_weights(str(run / "checkpoint-4"), base_model_path=str(base))
    merged = model.merge_and_unload().state_dict()
    assert src.kind == "checkpoint" and len(src.weights.deltas) == 2 * 2
    for name in src.weights.names:
        torch.testing.assert_close(src.weights.load(name), merged[name], rtol=1e-5, atol=1e-6, msg=name)


def test_unsupported_architecture_is_one_line(tmp_path, tokenizers):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizers["smollm2"]))).save_pretrained(
        tmp_path / "g")
    tokenizers["smollm2"].save_pretrained(tmp_path / "g")
    with pytest.raises(ArchExportError, match="model type .gpt2. cannot be exported to GGUF; supported: gemma2, gemma3_text, llama"):
        write_gguf(open_weights(str(tmp_path / "g")), tokenizers["smollm2"], "chatml", tmp_path / "g.gguf", "f16")
    assert not (tmp_path / "g.gguf").exists() and not list(tmp_path.glob(".g.gguf*"))


def test_qlora_base_is_merged_as_training_saw_it(tmp_path, tokenizers):
    """A QLoRA run trained against NF4 base weights: the export merges into those (dequantized), every block
    matrix included, not into the full-precision base."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = _model_dir(tmp_path / "base", "llama", tokenizers["smollm2"])
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(base)
    get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "chattune.json").write_text(json.dumps({"mode": "qlora", "precision": "fp32",
                                                              "flags": {"bits": 4}}))
    src = open_weights(str(tmp_path / "a"), base_model_path=str(base))
    q4 = AutoModelForCausalLM.from_pretrained(base, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32), device_map={"": "cpu"})
    import bitsandbytes.functional as bnbf

    layer = q4.model.layers[1].mlp.down_proj  # not a LoRA target: still NF4 in training
    want = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    got = src.weights.load("model.layers.1.mlp.down_proj.weight")
    torch.testing.assert_close(got, want)
    full = src.weights.files.load("model.layers.1.mlp.down_proj.weight")
    assert not torch.equal(got, full)
    torch.testing.assert_close(src.weights.load("model.embed_tokens.weight"), src.weights.files.load(
        "model.embed_tokens.weight"))
