"""scripts/merge_lora.py: a QLoRA adapter merged into the dequantized base gives the adapter model's logits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import ENV, ROOT, common, run


@pytest.mark.slow
def test_merged_qlora_matches_adapter_model(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "qlora"
    run("train_lora.py", common(tiny_llama, adapter, max_steps=3, per_device_train_batch_size=2, q_lora=True,
                                learning_rate=1e-2, save_strategy="no"))
    merged = tmp_path / "merged"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "merge_lora.py"), "--adapter", str(adapter),
                           "--output", str(merged), "--dtype", "fp32"], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    x = torch.tensor([[5, 900, 31, 2048, 77, 12]])
    with torch.no_grad():
        with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), adapter).eval()(x).logits
        standalone = AutoModelForCausalLM.from_pretrained(merged).eval()(x).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()(x).logits
    torch.testing.assert_close(standalone, with_adapter, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(base, with_adapter, atol=1e-4)  # the adapter changed something
    record = json.loads((merged / "chattune.json").read_text())
    assert record["mode"] == "merged" and record["merged_from"]["adapter_mode"] == "qlora"
    assert (merged / "tokenizer_config.json").is_file() and not (merged / "adapter_config.json").exists()
