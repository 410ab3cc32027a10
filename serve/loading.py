"""Load what training wrote (full model, LoRA/QLoRA adapter, merged model), any HF model or `.gguf`,
with the chat template recorded at training time. The template is never guessed from the path:
`--conv-template` > `chattune.json` > the tokenizer's own `chat_template` > error.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from data.assets import resolve_source
from data.templates import TEMPLATE_NAMES, TemplateError, recorded_template
from data.tokenize import end_of_turn
from data.tokenizer import load_tokenizer
from train.modeling import load_causal_lm, resolve_model_dir, run_config

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class ServeLoadError(ValueError):
    pass


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    template: str
    stop_token_ids: set[int]
    stop_strings: list[str]
    source: str
    kind: str  # "full", "adapter" or "merged-adapter"
    context_length: int


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def check_device(device: str) -> None:
    """Fail early, naming the flag, when the requested accelerator is not there."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ServeLoadError("--device cuda: no CUDA GPU is visible to torch on this machine (use --device cpu)")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ServeLoadError("--device mps: Apple's Metal backend is not available on this machine (use --device cpu)")


def add_model_args(p) -> None:
    """The model-loading flags shared by serve.cli, serve.openai_api_server and eval."""
    p.add_argument("--model-path", required=True, help="training output dir, HF model dir/id, .gguf or asset:NAME")
    p.add_argument("--base-model-path", help="base model for a LoRA adapter (default: from adapter_config.json)")
    p.add_argument("--conv-template", "--template", dest="conv_template", choices=TEMPLATE_NAMES,
                   help="override the template recorded at training")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights dtype (default: bfloat16 on cuda, float32 otherwise)")
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--load-8bit", action="store_true", help="8-bit weights via bitsandbytes")
    quant.add_argument("--load-4bit", action="store_true", help="4-bit NF4 weights via bitsandbytes")
    p.add_argument("--merge", action="store_true", help="merge a LoRA adapter into the base at load")


def load_from_args(args) -> LoadedModel:
    return load_for_chat(args.model_path, args.base_model_path, args.conv_template, args.device, args.dtype,
                         args.load_8bit, args.load_4bit, args.merge)


def load_for_chat(model_path: str, base_model_path: str | None = None, conv_template: str | None = None,
                  device: str = "cpu", dtype: str | None = None, load_8bit: bool = False, load_4bit: bool = False,
                  merge: bool = False) -> LoadedModel:
    check_device(device)
    if load_8bit and load_4bit:
        raise ServeLoadError("--load-8bit and --load-4bit are exclusive; pick one")
    source = resolve_source(model_path)
    directory = Path(source) if os.path.isdir(source) else None
    if directory is None and not source.endswith(".gguf") and source.startswith(("/", "./", "../")):
        raise ServeLoadError(f"--model-path {model_path}: no such directory or .gguf file")
    record = _read_json(directory / "chattune.json") if directory else {}
    adapter_cfg = _read_json(directory / "adapter_config.json") if directory else {}
    torch_dtype = DTYPES[dtype] if dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    kwargs: dict = {}
    if load_8bit or load_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise ServeLoadError("--load-8bit/--load-4bit need bitsandbytes: pip install bitsandbytes") from e
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=load_8bit, load_in_4bit=load_4bit,
                                                           bnb_4bit_compute_dtype=torch_dtype)
        kwargs["device_map"] = {"": device}

    if adapter_cfg:
        base = base_model_path or adapter_cfg.get("base_model_name_or_path")
        if not base:
            raise ServeLoadError(f"{model_path} is a LoRA adapter without a recorded base model; pass --base-model-path")
        from peft import PeftModel

        base_dir = resolve_model_dir(base)
        kwargs["config"] = run_config(base_dir, record)  # trained with --rope_scaling: the base runs scaled too
        model = load_causal_lm(base_dir, dtype=torch_dtype, **kwargs)
        model = PeftModel.from_pretrained(model, str(directory))
        kind = "adapter"
        if merge:
            model = model.merge_and_unload()
            kind = "merged-adapter"
        tokenizer_source = str(directory) if (directory / "tokenizer_config.json").is_file() else base
    else:
        model = load_causal_lm(source, dtype=torch_dtype, **kwargs)
        kind = "full"
        tokenizer_source = source
    if "quantization_config" not in kwargs:  # a quantized model is placed by device_map
        model.to(device)
    model.eval()
    tokenizer = load_tokenizer(tokenizer_source)

    try:
        template = recorded_template(conv_template, record.get("template"), tokenizer, model_path, "--conv-template")
    except TemplateError as e:
        raise ServeLoadError(str(e)) from None
    stop_ids, stop_strings = end_of_turn(tokenizer, template)
    context = int(getattr(model.config, "max_position_embeddings", 0) or record.get("max_length") or 2048)
    return LoadedModel(model, tokenizer, template, stop_ids, stop_strings, str(model_path), kind, context)
