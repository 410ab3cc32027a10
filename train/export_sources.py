"""The model an export reads, one tensor at a time: a full or merged model directory, a LoRA/QLoRA adapter (merged
into its base here, one weight at a time; a QLoRA base first goes through the same NF4 quantization training saw),
a checkpoint (`OUT/checkpoint-N`, read from its DCP files) or a `.gguf`/`asset:` model.

Nothing here holds the whole model, so the GGUF and HF exports built on it (train/export_gguf.py,
train/export.py) peak at the largest tensor a few times over, not at the model's size.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from train.modeling import resolve_model_dir, run_config


class ExportError(ValueError):
    pass


_ST_DTYPES = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
              "BF16": (np.int16, torch.bfloat16), "F64": (np.float64, torch.float64)}


class SafetensorsFiles:
    """Tensors of a safetensors model, read with plain file reads. safetensors' own loader maps the whole file,
    and every page it touches then counts as the process's memory; reading each tensor's byte range keeps the
    export's footprint to the tensors it holds."""

    def __init__(self, directory: Path):
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise ExportError(f"{directory}: no *.safetensors weights")
        self.entries: dict[str, tuple[Path, int, dict]] = {}
        for path in files:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for name, info in header.items():
                self.entries[name] = (path, 8 + n, info)

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][2]["shape"])

    def load(self, name: str) -> torch.Tensor:
        path, base, info = self.entries[name]
        if info["dtype"] not in _ST_DTYPES:
            raise ExportError(f"{path}: tensor {name} has dtype {info['dtype']}, not a float type")
        np_dtype, torch_dtype = _ST_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        with open(path, "rb") as f:
            data = os.pread(f.fileno(), end - start, base + start)
        arr = np.frombuffer(data, dtype=np_dtype).reshape(info["shape"])
        t = torch.from_numpy(arr.copy())
        return (t.view(torch_dtype) if torch_dtype == torch.bfloat16 else t).float()


class CheckpointFiles:
    """The model entries of a checkpoint's portable DCP state (train/portable_state.py), one tensor per read."""

    def __init__(self, dcp_dir: Path):
        from torch.distributed.checkpoint import FileSystemReader

        self.dir = dcp_dir
        meta = FileSystemReader(str(dcp_dir)).read_metadata()
        self.shapes = {k[len("model."):]: tuple(v.size) for k, v in meta.state_dict_metadata.items()
                       if k.startswith("model.") and hasattr(v, "size")}
        if not self.shapes:
            raise ExportError(f"{dcp_dir}: no model tensors in this checkpoint")

    def names(self) -> list[str]:
        return list(self.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def load(self, name: str) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp

        target = {"model": {name: torch.empty(self.shapes[name], dtype=torch.float32)}}
        dcp.load(target, checkpoint_id=str(self.dir), no_dist=True)
        return target["model"][name]


@dataclass
class LoraDelta:
    a: str
    b: str
    scale: float


@dataclass
class Weights:
    """A model as HF names -> tensors, read lazily; LoRA deltas are merged into their base weights on read."""

    config: object
    files: object  # SafetensorsFiles | CheckpointFiles
    names: list[str]
    lora_files: object | None = None
    deltas: dict[str, LoraDelta] = field(default_factory=dict)
    replaced: dict[str, str] = field(default_factory=dict)  # name -> adapter tensor (modules_to_save)
    nf4_round_trip: Callable[[torch.Tensor], torch.Tensor] | None = None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files.shape(name)

    def load(self, name: str) -> torch.Tensor:
        if name in self.replaced:
            return self.lora_files.load(self.replaced[name])
        w = self.files.load(name)
        if self.nf4_round_trip is not None and _quantized_by_qlora(name, w):
            w = self.nf4_round_trip(w)
        delta = self.deltas.get(name)
        if delta is not None:
            w = w + self.lora_files.load(delta.b) @ self.lora_files.load(delta.a) * delta.scale
        return w


def _lora_scale(cfg: dict, module: str) -> float:
    """peft's scaling for one module: alpha / r (or / sqrt(r) with rsLoRA), per-module patterns first."""
    def pick(patterns: dict, default):
        for key, value in (patterns or {}).items():
            if re.fullmatch(rf"(.*\.)?{key}", module):
                return value
        return default

    r = pick(cfg.get("rank_pattern"), cfg["r"])
    alpha = pick(cfg.get("alpha_pattern"), cfg["lora_alpha"])
    return alpha / (r ** 0.5 if cfg.get("use_rslora") else r)


def _plan_lora(names: list[str], adapter_names: list[str], adapter_cfg: dict, where: str
               ) -> tuple[dict[str, LoraDelta], dict[str, str]]:
    """Which base weight each adapter tensor changes (peft's saved names: `base_model.model.<module>.lora_A.weight`)."""
    if adapter_cfg.get("use_dora"):
        raise ExportError(f"{where}: DoRA adapters cannot be merged here yet; merge with peft and export the result")
    if adapter_cfg.get("fan_in_fan_out"):
        raise ExportError(f"{where}: fan_in_fan_out adapters (GPT-2 Conv1D) are not supported")
    deltas: dict[str, LoraDelta] = {}
    replaced: dict[str, str] = {}
    known = set(names)
    for key in adapter_names:
        inner = re.sub(r"^base_model\.model\.", "", key)
        inner = inner.replace(".default.", ".").replace(".modules_to_save.", ".")
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", inner)
        if m:
            target = m.group(1) + ".weight"
            if target not in known:
                raise ExportError(f"{where}: adapter tensor {key} targets {target}, which the base model lacks")
            if m.group(2) == "A":
                deltas[target] = LoraDelta(key, key.replace("lora_A", "lora_B"),
                                           _lora_scale(adapter_cfg, m.group(1)))
        elif "lora_embedding" in inner or "lora_magnitude" in inner:
            raise ExportError(f"{where}: adapter tensor {key} (embedding LoRA / DoRA) is not supported yet")
        elif inner in known:
            replaced[inner] = key
        else:
            raise ExportError(f"{where}: adapter tensor {key} matches no weight of the base model")
    return deltas, replaced


def _quantized_by_qlora(name: str, w: torch.Tensor) -> bool:
    """transformers' bitsandbytes loading quantizes every Linear but the output head: the blocks' matrices."""
    return w.dim() == 2 and not name.endswith(("embed_tokens.weight", "lm_head.weight"))


def _nf4_round_trip(compute_dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a QLoRA run's frozen base weight was during training: NF4 with double quantization, blocks of 64
    (train/model_setup.py's BitsAndBytesConfig), dequantized to the compute dtype."""
    import bitsandbytes.functional as bnbf

    def round_trip(w: torch.Tensor) -> torch.Tensor:
        q, state = bnbf.quantize_4bit(w.to(compute_dtype), blocksize=64, compress_statistics=True, quant_type="nf4")
        return bnbf.dequantize_4bit(q, state).float()

    return round_trip


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


@dataclass
class Source:
    weights: Weights
    tokenizer_dir: str  # where the tokenizer (with the training template) is
    record: dict  # chattune.json of the run, {} for a plain model
    base: str | None  # the base model source, for adapters and checkpoints
    kind: str  # full | adapter | checkpoint


def open_weights(model_path: str, base_model_path: str | None = None) -> Source:
    """The model to export, read lazily, with where its tokenizer and run record are."""
    from data.assets import resolve_source

    source = resolve_source(model_path)
    path = Path(source)
    if not path.exists():
        raise ExportError(f"--model-path {model_path}: no such directory or file")
    if path.is_file() or source.endswith(".gguf"):
        directory = resolve_model_dir(source)
        return Source(Weights(run_config(directory), f := SafetensorsFiles(Path(directory)), f.names()), directory, {},
                      None, "full")
    if (path / "dcp").is_dir() and (path / "trainer_state.json").is_file():
        return _open_checkpoint(path, base_model_path)
    record = _read_json(path / "chattune.json")
    adapter_cfg = _read_json(path / "adapter_config.json")
    if adapter_cfg:
        base = base_model_path or adapter_cfg.get("base_model_name_or_path")
        if not base:
            raise ExportError(f"{model_path}: the adapter names no base model; pass --base-model-path")
        base_dir = resolve_model_dir(base)
        files = SafetensorsFiles(Path(base_dir))
        lora = SafetensorsFiles(path)
        deltas, replaced = _plan_lora(files.names(), lora.names(), adapter_cfg, str(path))
        weights = Weights(run_config(base_dir, record), files, files.names(), lora, deltas, replaced)
        weights = _qlora_base(weights, record, path)
        return Source(weights, str(path), record, base, "adapter")
    if not (path / "config.json").is_file():
        raise ExportError(f"--model-path {model_path}: not a model directory (no config.json), adapter or checkpoint")
    files = SafetensorsFiles(path)
    return Source(Weights(run_config(str(path)), files, files.names()), str(path), record, None, "full")


def _qlora_base(weights: Weights, record: dict, path: Path) -> Weights:
    """A QLoRA run's base weights as its training saw them (NF4 and back), so the merge is the trained model."""
    if record.get("mode") == "qlora":
        if record.get("flags", {}).get("bits", 4) != 4:
            raise ExportError(f"{path}: an 8-bit QLoRA adapter is not merged here yet (its base's int8 rounding "
                              f"is not reproduced); merge it with scripts/merge_lora.py")
        weights.nf4_round_trip = _nf4_round_trip(_compute_dtype(record))
    return weights


def _compute_dtype(record: dict) -> torch.dtype:
    """The dtype training computed in (chattune.json's `precision`): a QLoRA base is dequantized to it."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(record.get("precision", ""), torch.float32)


def _open_checkpoint(path: Path, base_model_path: str | None) -> Source:

    run = path.parent
    record = _read_json(run / "chattune.json")
    base = base_model_path or record.get("base_model")
    if not base:
        raise ExportError(f"{path}: a checkpoint of a run that has not finished records no model; pass "
                          f"--base-model-path (the run's --model_name_or_path)")
    base_dir = resolve_model_dir(base)
    files = CheckpointFiles(path / "dcp")
    peft_names = [n for n in files.names() if n.startswith("base_model.model.")]
    if not peft_names:
        return Source(Weights(run_config(base_dir, record), files, files.names()), base_dir, record, base, "checkpoint")
    # A LoRA run checkpoints only what it trains (train/portable_state.py): the base comes from the base model.
    adapter_cfg = _read_json(run / "adapter_config.json")
    if not adapter_cfg:
        raise ExportError(f"{path}: a LoRA checkpoint holds only the adapter's tensors, and their rank and alpha are "
                          f"in {run / 'adapter_config.json'}, which the run writes when it ends; export a LoRA run's "
                          f"final output, or a full fine-tune's checkpoint")
    base_files = SafetensorsFiles(Path(base_dir))
    deltas, replaced = _plan_lora(base_files.names(), peft_names, adapter_cfg, str(path))
    weights = Weights(run_config(base_dir, record), base_files, base_files.names(), files, deltas, replaced)
    return Source(_qlora_base(weights, record, path), base_dir, record, base, "checkpoint")
