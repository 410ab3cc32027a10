"""DeepSpeed ZeRO-2/3 backend (`--deepspeed ds_configs/<name>.json`).

"auto" values in the JSON are filled from our flags (micro-batch, accumulation, clipping, bf16, bucket
sizes from the model's hidden size), so the same hyperparameters mean the same run under every
backend. Unless the JSON has its own "optimizer"/"scheduler" blocks, the optimizer and LR schedule
are chattune's (`--optim`, `--lr_scheduler_type`), handed to `deepspeed.initialize`.

Gradient accumulation stays ours: every micro-batch calls `engine.backward(loss, scale_wrt_gas=False)`
(our loss is already divided by the step's global supervised-token count) and the engine's step at
the accumulation boundary is deferred until the recipe has checked the loss is finite.
"""

from __future__ import annotations

import json
from pathlib import Path

from train.backends import Backend
from train.distributed import DistInfo


class DeepSpeedConfigError(ValueError):
    pass


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
    return cfg


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def fill_auto(ds_config: dict, cfg, world_size: int, hidden_size: int | None) -> dict:
    """Replace "auto" values with ones derived from our flags; reject values that contradict them."""
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
        bf16["enabled"] = bool(cfg.bf16)
    if filled.get("fp16", {}).get("enabled") is True:
        raise DeepSpeedConfigError("--deepspeed: fp16 is not supported; use the bf16 block")
    zero = filled.setdefault("zero_optimization", {})
    h = hidden_size or 4096
    for key, value in {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
                       "stage3_param_persistence_threshold": 10 * h}.items():
        if zero.get(key) == "auto":
            zero[key] = value
    if "optimizer" in filled:
        params = filled["optimizer"].setdefault("params", {})
        for key, value in {"lr": cfg.learning_rate, "betas": [cfg.adam_beta1, cfg.adam_beta2], "eps": cfg.adam_epsilon,
                           "weight_decay": cfg.weight_decay}.items():
            if params.get(key, "auto") == "auto":
                params[key] = value
    else:
        filled["zero_allow_untested_optimizer"] = True
        filled["zero_force_ds_cpu_optimizer"] = False  # our torch AdamW runs on the offloaded fp32 partitions
    filled.pop("scheduler", None) if filled.get("scheduler") == "auto" else None
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


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, info: DistInfo, ds_config: dict, is_peft: bool):
        super().__init__(info, is_peft)
        self.ds_config = ds_config
        self.engine = None

    @property
    def loss_scale(self) -> float:
        return float(self.info.world_size)  # DeepSpeed averages gradients over data-parallel ranks

    def setup(self, model, make_optimizer):
        import deepspeed

        optimizer = None if "optimizer" in self.ds_config else make_optimizer(model)
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config,
            model_parameters=[p for p in model.parameters() if p.requires_grad] if optimizer is None else None)
        self.engine = engine
        # The recipe's LR scheduler drives the torch optimizer inside DeepSpeed's ZeRO wrapper (whose
        # param_groups are that optimizer's); the engine itself performs the steps.
        return engine, getattr(ds_optimizer, "optimizer", ds_optimizer)

    def unwrap(self, model):
        return model.module if hasattr(model, "module") else model

    def backward(self, loss) -> None:
        engine = self.engine
        engine.backward(loss, scale_wrt_gas=False)
        if not engine.is_gradient_accumulation_boundary():
            engine.step()  # only advances the engine's micro-step counter

    def clip_and_norm(self, model, max_norm: float) -> float:
        return 0.0  # DeepSpeed clips inside step(); the real norm is read after it (grad_norm_after_step)

    def step(self, optimizer) -> None:
        self.engine.step()

    def grad_norm_after_step(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def zero_grad(self, optimizer) -> None:
        pass  # the engine zeroes gradients in step()

    def full_state_dict(self, model):
        engine = self.engine
        if zero_stage(self.ds_config) == 3:
            sd = engine._zero3_consolidated_16bit_state_dict()  # gathered onto rank 0's CPU
        else:
            sd = engine.module.state_dict() if self.info.is_main else None
        if not self.info.is_main:
            return None
        return {k: v.detach().cpu() for k, v in sd.items()}

    def save_state(self, directory: Path, model, optimizer) -> None:
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state", save_latest=False)

    def load_state(self, directory: Path, model, optimizer) -> None:
        path, _ = self.engine.load_checkpoint(str(directory / "deepspeed"), tag="state", load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed state to resume from")
