"""Final export (docs/design.md §2): HF safetensors (full) or a PEFT adapter, the tokenizer whose
`chat_template` is the training template, and `chattune.json` describing the run."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from data.tokenize import export_chat_template
from train.config import TrainConfig, to_dict

FORMAT_VERSION = 1


def export_model(model, tensors, spec: list[tuple[str, tuple, torch.dtype]], tokenizer, cfg: TrainConfig, mode: str,
                 is_main: bool, extra: dict | None = None) -> Path | None:
    """Write the final model. `model` is the unwrapped HF/peft model; `tensors` yields (name, tensor) in the
    order of `spec` (name, global shape, dtype), gathered one at a time onto rank 0 (None elsewhere); every
    rank calls, since gathering is collective. A full model streams into safetensors tensor by tensor; an
    adapter (small) is written by peft. Only rank 0 writes."""
    if not is_main:
        for _ in tensors:  # take part in every gather
            pass
        return None
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if mode == "full":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.save_dtype]
        files = save_safetensors_streamed(out, [(n, shape, dtype if d.is_floating_point else d) for n, shape, d in spec],
                                          tensors)
        model.config.save_pretrained(out)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(out)
        # the config records the in-memory (fp32 master) dtype; record what the files hold
        config = json.loads((out / "config.json").read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for stale in out.glob("model*.safetensors*"):  # an earlier export into this directory, sharded otherwise
            if stale.name not in files:
                stale.unlink()
    else:  # adapter only (peft filters a full state dict down to the adapter weights)
        state_dict = {name: t.clone() for name, t in tensors}
        model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
    saved_template = tokenizer.chat_template
    try:  # the exported tokenizer carries the template the model was trained with
        tokenizer.chat_template = export_chat_template(cfg.template, tokenizer)
        tokenizer.save_pretrained(out)
    finally:
        tokenizer.chat_template = saved_template
    (out / "chattune.json").write_text(json.dumps(run_record(cfg, mode, extra), indent=2) + "\n")
    return out


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                       torch.bool: "BOOL"}
MAX_SHARD_BYTES = 5 * 10**9  # save_pretrained's default shard size


def save_safetensors_streamed(out: Path, spec: list[tuple[str, tuple, torch.dtype]], tensors,
                              max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write tensors that arrive one at a time into safetensors file(s) without holding them together.

    The safetensors header (names, dtypes, shapes, byte offsets) needs only `spec`, so it is written first
    and each tensor's bytes are appended as it arrives: peak memory is one tensor, not the model (the
    safetensors package writes only whole dicts). Files over `max_shard_bytes` are split as Hugging Face
    does (`model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`). Returns the file names."""
    import math

    shards: list[list[tuple[str, tuple, torch.dtype, int]]] = [[]]
    size = 0
    for name, shape, dtype in spec:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(shape), dtype, nbytes))
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    stream = iter(tensors)
    for file_name, shard in zip(names, shards):
        header, offset = {}, 0
        for name, shape, dtype, nbytes in shard:
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        with open(out / file_name, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for name, shape, dtype, _ in shard:
                got_name, tensor = next(stream)
                if got_name != name or tuple(tensor.shape) != shape:
                    raise RuntimeError(f"export: expected {name} {list(shape)}, got {got_name} {list(tensor.shape)}")
                data = tensor.to(dtype).contiguous().reshape(-1).view(torch.uint8)
                f.write(memoryview(data.numpy()))
                del tensor, data
    if len(names) > 1:
        total = sum(n for shard in shards for *_, n in shard)
        index = {"metadata": {"total_size": total},
                 "weight_map": {name: file for file, shard in zip(names, shards) for name, *_ in shard}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        names.append("model.safetensors.index.json")
    return names


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
