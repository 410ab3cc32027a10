"""FSDP2 backend (`torch.distributed.fsdp.fully_shard`), FastChat's `--fsdp` flags mapped onto it.

`--fsdp "full_shard auto_wrap [offload]"` shards parameters, gradients and optimizer state and
reshards after forward; `"shard_grad_op auto_wrap"` keeps parameters gathered between forward and
backward (ZeRO-2-like). Each decoder layer (`--fsdp_transformer_layer_cls_to_wrap`, default: detected
from the model) is its own unit, then the root. bf16 uses `MixedPrecisionPolicy` (fp32 gradient
reduction unless `reduce_dtype` says otherwise); `offload` uses `CPUOffloadPolicy` (no pinned memory on
CPU). Final weights are gathered with `get_model_state_dict(full_state_dict=True, cpu_offload=True)`,
so only rank 0 ever holds a full copy, on CPU. Resumable checkpoints are sharded with
`torch.distributed.checkpoint` and can be loaded with a different world size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from train.backends import Backend
from train.distributed import DistInfo

FSDP_OPTIONS = {"full_shard", "shard_grad_op", "auto_wrap", "offload"}


class FSDPConfigError(ValueError):
    pass


@dataclass(frozen=True)
class FSDPSettings:
    reshard_after_forward: bool = True
    offload: bool = False
    layer_classes: tuple[str, ...] = ()
    reduce_dtype: str = "fp32"  # gradient reduction dtype under bf16: fp32 (default) or bf16

    @classmethod
    def from_flags(cls, fsdp: str, layer_cls: str | None, config_path: str | None) -> FSDPSettings:
        words = fsdp.split()
        unknown = [w for w in words if w not in FSDP_OPTIONS]
        if unknown:
            raise FSDPConfigError(f"--fsdp: unknown option(s) {unknown}; use 'full_shard auto_wrap [offload]' or "
                                  "'shard_grad_op auto_wrap'")
        if "full_shard" in words and "shard_grad_op" in words:
            raise FSDPConfigError("--fsdp: choose one of full_shard and shard_grad_op")
        if not ({"full_shard", "shard_grad_op"} & set(words)):
            raise FSDPConfigError("--fsdp must name full_shard or shard_grad_op")
        extra: dict = {}
        if config_path:
            extra = _load(config_path)
        layer = layer_cls or extra.get("transformer_layer_cls_to_wrap") or extra.get("fsdp_transformer_layer_cls_to_wrap")
        layers = tuple(layer if isinstance(layer, list) else [c.strip() for c in layer.split(",")]) if layer else ()
        reduce_dtype = extra.get("reduce_dtype", "fp32")
        if reduce_dtype not in ("fp32", "bf16"):
            raise FSDPConfigError(f"--fsdp_config: reduce_dtype must be fp32 or bf16, got {reduce_dtype!r}")
        unknown_keys = set(extra) - {"transformer_layer_cls_to_wrap", "fsdp_transformer_layer_cls_to_wrap", "reduce_dtype"}
        if unknown_keys:
            raise FSDPConfigError(f"--fsdp_config: unknown key(s) {sorted(unknown_keys)}")
        return cls("shard_grad_op" not in words, "offload" in words, layers, reduce_dtype)


def _load(path: str) -> dict:
    from train.config import ConfigError, load_mapping

    try:
        return load_mapping(path)
    except ConfigError as e:
        raise FSDPConfigError(f"--fsdp_config {e}") from None


def decoder_layer_classes(model, names: tuple[str, ...]) -> tuple[type, ...]:
    """Module classes to shard individually: the named ones, else the model's `_no_split_modules`."""
    wanted = set(names) or set(getattr(model, "_no_split_modules", None) or [])
    if not wanted:
        wanted = {type(m).__name__ for m in model.modules() if type(m).__name__.endswith("DecoderLayer")}
    found = {type(m) for m in model.modules() if type(m).__name__ in wanted}
    missing = wanted - {c.__name__ for c in found}
    if names and missing:
        raise FSDPConfigError(f"--fsdp_transformer_layer_cls_to_wrap: no module of class {sorted(missing)} in the model "
                              f"(decoder layers here: {sorted({type(m).__name__ for m in model.modules() if 'Layer' in type(m).__name__})})")
    if not found:
        raise FSDPConfigError("cannot detect the decoder layer class; pass --fsdp_transformer_layer_cls_to_wrap")
    return tuple(found)


class FSDPBackend(Backend):
    name = "fsdp"

    def __init__(self, info: DistInfo, settings: FSDPSettings, bf16: bool, is_peft: bool):
        super().__init__(info, is_peft)
        self.settings = settings
        self.bf16 = bf16

    @property
    def loss_scale(self) -> float:
        return float(self.info.world_size)  # FSDP averages gradients over ranks

    def prepare(self, model):
        kwargs: dict = {"reshard_after_forward": self.settings.reshard_after_forward}
        if self.bf16:
            reduce = torch.float32 if self.settings.reduce_dtype == "fp32" else torch.bfloat16
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce)
        if self.settings.offload:
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=self.info.device.type == "cuda")
        classes = decoder_layer_classes(model, self.settings.layer_classes)
        for module in list(model.modules()):
            if isinstance(module, classes):
                fully_shard(module, **kwargs)
        fully_shard(model, **kwargs)
        return model

    def sync_context(self, model, last_micro: bool):
        model.set_requires_gradient_sync(last_micro)
        return super().sync_context(model, last_micro)

    def clip_and_norm(self, model, max_norm: float) -> float:
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        return float(norm)

    def full_state_dict(self, model):
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if self.info.is_main else None

    # resumable, sharded: model + optimizer through DCP (resharded on load if the world size changed)
    def save_state(self, directory: Path, model, optimizer) -> None:
        options = StateDictOptions(ignore_frozen_params=self.is_peft)
        state = {"model": get_model_state_dict(model, options=options),
                 "optim": get_optimizer_state_dict(model, optimizer, options=options)}
        dcp.save(state, checkpoint_id=str(directory / "dcp"))

    def load_state(self, directory: Path, model, optimizer) -> None:
        options = StateDictOptions(ignore_frozen_params=self.is_peft, strict=not self.is_peft)
        state = {"model": get_model_state_dict(model, options=options),
                 "optim": get_optimizer_state_dict(model, optimizer, options=options)}
        dcp.load(state, checkpoint_id=str(directory / "dcp"))
        set_model_state_dict(model, state["model"], options=options)
        set_optimizer_state_dict(model, optimizer, state["optim"], options=options)

