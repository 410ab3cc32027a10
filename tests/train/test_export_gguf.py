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

from eval import parity
from train.export_gguf import tensor_type, write_gguf
from train.export_sources import ExportError, open_weights
from train.gguf_arch import ArchExportError, permute_rope_rows

DEMO = Path(__file__).resolve().parents[2] / "data" / "demo" / "chattune_demo.jsonl"


def _config(arch: str, vocab: int, tok):
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

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
    }[arch]()


def _model_dir(tmp: Path, arch: str, tok, scale: float = 1.0) -> Path:
    """A tiny random model saved like a training output (weights, tokenizer, chattune.json)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(arch, len(tok), tok))
    with torch.no_grad():  # larger weights than the init's: logits far apart, so ties are rare
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "chattune.json").write_text(json.dumps({"template": "chatml", "mode": "full",
                                                   "flags": {"data_path": [str(DEMO)]}}))
    return tmp


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma2"])
def test_gate_passes_for_each_architecture(arch, tmp_path, tokenizers):
    out = _model_dir(tmp_path / arch, arch, tokenizers["smollm2"], scale=8.0)
    src = open_weights(str(out))
    gguf_path = write_gguf(src, tokenizers["smollm2"], "chatml", tmp_path / f"{arch}.gguf", "f32")
    reader = gguf.GGUFReader(gguf_path)
    assert reader.fields["general.architecture"].contents() == ("llama" if arch == "mistral" else arch)
    assert "<|im_start|>" in reader.fields["tokenizer.chat_template"].contents()
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) == (arch in ("mistral", "qwen2"))  # tied embeddings write no output matrix
    reports = parity.run(str(out), str(gguf_path), n=3, n_greedy=8, runtimes={"transformers", "jinja2-sandboxed"})
    assert [r.status for r in reports] == ["passed", "passed"], parity.format_reports(reports, str(gguf_path))
    logits = next(c for c in reports[0].checks if c.name.startswith("max"))
    assert float(logits.value) < 1e-3


def test_runtime_that_cannot_load_a_shape_is_skipped_with_its_reason(tmp_path, tokenizers):
    """A Qwen3 whose head_dim is not 128: the file says so (key_length, which llama.cpp reads), transformers'
    loader cannot, and the gate says why instead of passing or crashing."""
    out = _model_dir(tmp_path / "q", "qwen3-wide-heads", tokenizers["smollm2"], scale=8.0)
    path = write_gguf(open_weights(str(out)), tokenizers["smollm2"], "chatml", tmp_path / "q.gguf", "f16")
    assert gguf.GGUFReader(path).fields["qwen3.attention.key_length"].contents() == 32
    reports = parity.run(str(out), str(path), n=2, n_greedy=4, runtimes={"transformers", "jinja2-sandboxed"})
    assert reports[0].status.startswith("skipped: transformers' GGUF loader reads no head_dim for qwen3")
    assert reports[1].status == "passed"


def test_gate_fails_loudly_on_a_wrong_export(tmp_path, tokenizers):
    """Two different models: the gate must fail on logits and replies, not pass on matching prompt ids."""
    a = _model_dir(tmp_path / "a", "llama", tokenizers["smollm2"], scale=8.0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(a)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(-1)  # what a wrong rotary permutation looks like
    b = tmp_path / "b"
    model.save_pretrained(b)
    tokenizers["smollm2"].save_pretrained(b)
    bad = write_gguf(open_weights(str(b)), tokenizers["smollm2"], "chatml", tmp_path / "b.gguf", "f32")
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
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
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


def test_unsupported_architecture_is_one_line(tmp_path, tokenizers):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizers["smollm2"]))).save_pretrained(
        tmp_path / "g")
    tokenizers["smollm2"].save_pretrained(tmp_path / "g")
    with pytest.raises(ArchExportError, match="model type 'gpt2' cannot be exported to GGUF; supported: gemma2, llama"):
        write_gguf(open_weights(str(tmp_path / "g")), tokenizers["smollm2"], "chatml", tmp_path / "g.gguf", "f16")
    assert not (tmp_path / "g.gguf").exists() and not list(tmp_path.glob(".g.gguf*"))
