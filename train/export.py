"""Final export (DESIGN.md §2): HF safetensors (full) or a PEFT adapter, the tokenizer whose
`chat_template` is the training template, and `chattune.json` describing the run."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from data.tokenize import export_chat_template
from train.config import TrainConfig, to_dict

FORMAT_VERSION = 1


def export_model(model, state_dict: dict | None, tokenizer, cfg: TrainConfig, mode: str, is_main: bool,
                 extra: dict | None = None) -> Path | None:
    """Write the final model. `model` is the unwrapped HF/peft model; `state_dict` the gathered full
    state on rank 0 (full fine-tune). Only rank 0 writes."""
    if not is_main:
        return None
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if mode == "full":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.save_dtype]
        cast = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}
        model.save_pretrained(out, state_dict=cast, safe_serialization=True)
        # save_pretrained records the in-memory (fp32 master) dtype; record what the file holds
        config = json.loads((out / "config.json").read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    else:  # adapter only (peft filters a full state dict down to the adapter weights)
        model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
    saved_template = tokenizer.chat_template
    try:  # the exported tokenizer carries the template the model was trained with
        tokenizer.chat_template = export_chat_template(cfg.template, tokenizer)
        tokenizer.save_pretrained(out)
    finally:
        tokenizer.chat_template = saved_template
    (out / "chattune.json").write_text(json.dumps(run_record(cfg, mode, extra), indent=2) + "\n")
    return out


def run_record(cfg: TrainConfig, mode: str, extra: dict | None = None) -> dict:
    import peft
    import transformers

    return {
        "format_version": FORMAT_VERSION,
        "template": cfg.template,
        "base_model": cfg.model_name_or_path,
        "mode": mode,
        "max_length": cfg.model_max_length,
        "mask": cfg.mask,
        "reasoning": cfg.reasoning,
        "flags": to_dict(cfg),
        "versions": {"chattune": _version(), "torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "python": platform.python_version()},
        **(extra or {}),
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("chattune")
    except PackageNotFoundError:
        return "unknown"
