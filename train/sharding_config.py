"""Leaf module: settings read from files and flags for the sharded backends (no imports from train/).

`train.config` validates flags with these functions before anything is loaded, and the FSDP2 and
DeepSpeed backends build on the parsed values, so every arrow points here and none points back:
config → sharding_config ← fsdp / deepspeed_backend.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


class ConfigError(ValueError):
    """A flag or config file is wrong; the message names the flag or file."""


class FSDPConfigError(ConfigError):
    pass


class DeepSpeedConfigError(ConfigError):
    pass


def load_mapping(path: str) -> dict:
    """A YAML (.yaml/.yml) or JSON file holding a mapping (config files, --fsdp_config)."""
    with open(path, encoding="utf-8") as f:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(f) or {}
        else:
            data = json.load(f)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of flag names to values")
    return data


# --- FSDP2 -----------------------------------------------------------------------------------------
FSDP_OPTIONS = {"full_shard", "shard_grad_op", "auto_wrap", "offload"}


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
            try:
                extra = load_mapping(config_path)
            except ConfigError as e:
                raise FSDPConfigError(f"--fsdp_config {e}") from None
            except (OSError, ValueError) as e:
                raise FSDPConfigError(f"--fsdp_config: {e}") from None
        layer = layer_cls or extra.get("transformer_layer_cls_to_wrap") or extra.get("fsdp_transformer_layer_cls_to_wrap")
        layers = tuple(layer if isinstance(layer, list) else [c.strip() for c in layer.split(",")]) if layer else ()
        reduce_dtype = extra.get("reduce_dtype", "fp32")
        if reduce_dtype not in ("fp32", "bf16"):
            raise FSDPConfigError(f"--fsdp_config: reduce_dtype must be fp32 or bf16, got {reduce_dtype!r}")
        unknown_keys = set(extra) - {"transformer_layer_cls_to_wrap", "fsdp_transformer_layer_cls_to_wrap", "reduce_dtype"}
        if unknown_keys:
            raise FSDPConfigError(f"--fsdp_config: unknown key(s) {sorted(unknown_keys)}")
        return cls("shard_grad_op" not in words, "offload" in words, layers, reduce_dtype)


# --- DeepSpeed -------------------------------------------------------------------------------------
def load_ds_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise DeepSpeedConfigError(f"--deepspeed {path}: no such file (shipped configs are in ds_configs/)") from None
    except json.JSONDecodeError as e:
        raise DeepSpeedConfigError(f"--deepspeed {path}:{e.lineno}: malformed JSON: {e.msg}") from None
    if not isinstance(cfg, dict):
        raise DeepSpeedConfigError(f"--deepspeed {path}: must hold a JSON object")
    scheduler = cfg.get("scheduler")
    if scheduler is not None and scheduler != "auto":
        # DeepSpeed would step its own schedule while chattune steps --lr_scheduler_type on the same optimizer
        raise DeepSpeedConfigError(
            f"--deepspeed {path}: its \"scheduler\" block would run alongside chattune's LR schedule; remove the "
            "block and set --lr_scheduler_type / --warmup_ratio / --warmup_steps instead")
    return cfg


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def fill_auto(ds_config: dict, cfg, world_size: int, hidden_size: int | None, precision: str = "fp32") -> dict:
    """Replace "auto" values with ones derived from our flags and the resolved `precision` (bf16 | fp16 |
    fp32, train/precision.py); reject values that contradict them."""
    filled = json.loads(json.dumps(ds_config))
    ours = {
        "train_micro_batch_size_per_gpu": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size,
        "gradient_clipping": cfg.max_grad_norm,
    }
    for key, value in ours.items():
        if filled.get(key, "auto") == "auto":
            filled[key] = value
        elif filled[key] != value:
            raise DeepSpeedConfigError(f"--deepspeed: {key}={filled[key]} contradicts the flags ({value}); use \"auto\"")
    bf16 = filled.setdefault("bf16", {"enabled": "auto"})
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = precision == "bf16"
    if bf16["enabled"]:
        # a step whose gradients are not finite is discarded by the engine; the recipe then counts it
        # against --max_nonfinite_skips (train/loop.py)
        bf16["check_grad_overflow"] = True
    fp16 = filled.setdefault("fp16", {"enabled": "auto"})
    if fp16.get("enabled", "auto") == "auto":
        fp16["enabled"] = precision == "fp16"
    if fp16["enabled"]:
        fp16.setdefault("loss_scale", 0)  # dynamic loss scaling
        fp16.setdefault("initial_scale_power", 16)
    if fp16["enabled"] and bf16["enabled"]:
        raise DeepSpeedConfigError("--deepspeed: the JSON enables both fp16 and bf16; set them to \"auto\"")
    zero = filled.setdefault("zero_optimization", {})
    h = hidden_size or 4096
    # ZeRO-3 keeps gathered parameters alive up to max_live_parameters (DeepSpeed's default 1e9 is the
    # whole of a 0.5B-1B model on every rank); "auto" is about two Llama-style decoder layers (~12 h² each)
    layers2 = 24 * h * h
    for key, value in {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
                       "stage3_param_persistence_threshold": 10 * h, "stage3_max_live_parameters": layers2,
                       "stage3_max_reuse_distance": layers2}.items():
        if zero.get(key) == "auto":
            zero[key] = value
    if "optimizer" in filled:  # the JSON's optimizer is used instead of --optim, its "auto" values from our flags
        params = filled["optimizer"].setdefault("params", {})
        for key, value in {"lr": cfg.learning_rate, "betas": [cfg.adam_beta1, cfg.adam_beta2], "eps": cfg.adam_epsilon,
                           "weight_decay": cfg.weight_decay}.items():
            if params.get(key, "auto") == "auto":
                params[key] = value
    else:
        filled["zero_allow_untested_optimizer"] = True
        filled["zero_force_ds_cpu_optimizer"] = False  # our torch AdamW runs on the offloaded fp32 partitions
    filled.pop("scheduler", None)  # only "auto" can be left here (load_ds_config refuses a real block)
    leftovers = [k for k, v in _walk(filled) if v == "auto"]
    if leftovers:
        raise DeepSpeedConfigError(f"--deepspeed: cannot fill \"auto\" for {leftovers}")
    return filled


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v
