"""scripts/export.py as a user runs it: a LoRA training output exported to GGUF (with an Ollama Modelfile) and to a
merged HF directory, the parity gate running by default, and bad input as one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import randomize_lora_b

from scripts import export

DEMO = Path(__file__).resolve().parents[2] / "data" / "demo" / "chattune_demo.jsonl"


@pytest.fixture(scope="module")
def spm_base(tmp_path_factory, tokenizers) -> str:
    """A tiny random Llama on the Llama-2 SentencePiece vocabulary (32k tokens, no merges: the cheapest GGUF
    vocabulary to read back), with peaked logits so that greedy choices are clear of ties."""
    from scripts.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("spm-base"), "llama", tokenizers["llama-spm"], scale=8.0,
                           template="llama-2", data=[str(DEMO)])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, spm_base, tokenizers) -> Path:
    """What a LoRA run writes: the adapter, the tokenizer with the training template, chattune.json."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("lora-run")
    model = AutoModelForCausalLM.from_pretrained(spm_base)  # the adapter records this base, as a real run's does
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "up_proj"]))
    randomize_lora_b(peft_model, seed=2, std=1.0)
    peft_model.save_pretrained(out)
    tokenizers["llama-spm"].save_pretrained(out)
    (out / "chattune.json").write_text(json.dumps({"template": "llama-2", "mode": "lora", "base_model": spm_base,
                                                   "flags": {"data_path": [str(DEMO)]}}))
    return out


def test_gguf_with_modelfile_passes_the_default_gate(lora_run, tmp_path, capsys):
    path = tmp_path / "run-f16.gguf"
    assert export.main(["--model-path", str(lora_run), "--outtype", "f16", "--output", str(path), "--ollama"]) == 0
    text = capsys.readouterr().out
    assert "[transformers] PASSED" in text and "[jinja2-sandboxed] PASSED" in text and "parity gate passed" in text
    assert "[llama.cpp] PASSED" in text or "[llama.cpp] skipped" in text
    modelfile = (tmp_path / "Modelfile").read_text()
    assert "\nFROM ./run-f16.gguf\n" in modelfile
    assert 'PARAMETER stop "</s>"' in modelfile and "[INST]" in modelfile


def test_hf_export_merges_the_adapter(lora_run, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert export.main(["--model-path", str(lora_run), "--format", "hf", "--dtype", "fp32", "--output", str(out)]) == 0
    assert "[transformers] PASSED" in capsys.readouterr().out
    record = json.loads((out / "chattune.json").read_text())
    assert record["mode"] == "merged" and record["template"] == "llama-2"
    base = AutoModelForCausalLM.from_pretrained(record["base_model"])
    want = PeftModel.from_pretrained(base, str(lora_run)).merge_and_unload().state_dict()
    got = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_a_failed_gate_fails_the_command(lora_run, tmp_path, capsys):
    """An export compared with another model (the base without its adapter) must make the command fail."""
    path = tmp_path / "x.gguf"
    assert export.main(["--model-path", str(lora_run), "--outtype", "f32", "--output", str(path), "--no-check"]) == 0
    other = tmp_path / "other"
    shutil.copytree(lora_run, other)
    (other / "adapter_model.safetensors").unlink()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = json.loads((lora_run / "chattune.json").read_text())["base_model"]
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "up_proj"])).save_pretrained(other)  # B = 0
    from eval import parity

    assert parity.main(["--model-path", str(other), "--export", str(path), "--runtimes", "transformers",
                        "--n", "2", "--greedy-tokens", "4"]) == 1
    assert "parity: FAILED in transformers" in capsys.readouterr().out


def test_full_checkpoint_exports_and_passes_the_gate(spm_base, tmp_path, capsys):
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    state = {k: v + 0.01 for k, v in AutoModelForCausalLM.from_pretrained(spm_base).state_dict().items()
             if k != "lm_head.weight"}  # tied: the portable layout holds the embedding once
    ckpt = tmp_path / "run" / "checkpoint-7"
    dcp.save({"model": state}, checkpoint_id=str(ckpt / "dcp"), no_dist=True)
    (ckpt / "trainer_state.json").write_text("{}")
    argv = ["--model-path", str(ckpt), "--base-model-path", spm_base, "--template", "llama-2", "--outtype", "f32",
            "--data", str(DEMO)]
    assert export.main(argv) == 0
    out = capsys.readouterr().out
    assert "[transformers] PASSED" in out and (tmp_path / "run" / "run-checkpoint-7-f32.gguf").is_file()


@pytest.mark.parametrize("argv,message", [
    (["--model-path", "/nonexistent/run"], "--model-path /nonexistent/run: no such directory or file"),
    (["--model-path", "{run}", "--format", "hf", "--output", "{run}"], "exists and is not empty"),
])
def test_bad_input_is_one_line(lora_run, argv, message, capsys):
    argv = [a.replace("{run}", str(lora_run)) for a in argv]
    assert export.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_ollama_needs_gguf():
    with pytest.raises(SystemExit):
        export.main(["--model-path", "x", "--format", "hf", "--ollama"])
