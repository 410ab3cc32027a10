"""Merge a LoRA/QLoRA adapter into its base and write a standalone model (FastChat's `apply_lora`).

    python scripts/merge_lora.py --adapter OUT --output merged [--base-model-path BASE] [--dtype bf16]

For QLoRA adapters the base is loaded *dequantized* (full precision), so the merged model is a plain HF
model; the tokenizer (with the training template) and chattune.json are copied along, marked merged.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from train.modeling import load_causal_lm, resolve_model_dir


def merge(adapter: str, output: str, base: str | None = None, dtype: str = "bf16") -> Path:
    from peft import PeftModel

    adapter_dir = Path(adapter)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise SystemExit(f"error: {adapter}: adapter_config.json names no base model; pass --base-model-path")
    model = load_causal_lm(resolve_model_dir(base), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    out = Path(output)
    model.to(torch.bfloat16 if dtype == "bf16" else torch.float32).save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (adapter_dir / name).is_file():
            shutil.copy(adapter_dir / name, out / name)
    record_path = adapter_dir / "chattune.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record.update({"mode": "merged", "merged_from": {"adapter": str(adapter_dir), "base": base,
                                                     "adapter_mode": record.get("mode")}})
    (out / "chattune.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, help="training output holding adapter_config.json")
    ap.add_argument("--output", required=True, help="directory for the merged model")
    ap.add_argument("--base-model-path", help="base model (default: from adapter_config.json)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    args = ap.parse_args(argv)
    out = merge(args.adapter, args.output, args.base_model_path, args.dtype)
    print(f"merged model written to {out}")
    return 0


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(main())
