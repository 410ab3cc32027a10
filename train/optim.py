"""Optimizer (`--optim`) and LR schedule (`--lr_scheduler_type`, `--lr_scheduler_kwargs`, via transformers).

Both are checked while the flags are validated (train/config.py), before anything is loaded:
`optimizer_problem` says why an `--optim` cannot run in this setup, and `check_scheduler` builds the
schedule on a one-parameter optimizer and evaluates it, so a missing, unknown or ill-typed scheduler
kwarg is one line naming both flags instead of a TypeError in the middle of a run.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from train.config import TrainConfig

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
# transformers' other schedule types, and why chattune does not accept them
UNSUPPORTED_SCHEDULERS = {
    "reduce_lr_on_plateau": "it steps on an eval metric, and chattune steps the schedule once per optimizer step",
    "greedy": "it steps on a training metric, and chattune steps the schedule once per optimizer step",
}
# the schedules get_scheduler calls without any scheduler_specific_kwargs (it would drop them silently)
NO_KWARGS = ("constant", "constant_with_warmup")
# get_scheduler's arguments that come from other flags
RESERVED_KWARGS = {
    "optimizer": "it is the run's optimizer (--optim)",
    "num_warmup_steps": "it comes from --warmup_steps / --warmup_ratio",
    "num_training_steps": "it comes from --max_steps / --num_train_epochs",
    "last_epoch": "it is set when resuming (--resume_from_checkpoint)",
}
WSD_DEFAULT_DECAY = 0.1  # warmup_stable_decay without num_decay_steps: decay over the last 10% of the steps

BNB_OPTIMIZERS = {"adamw_bnb_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit",
                  "paged_adamw_32bit": "PagedAdamW32bit"}
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "sgd", "adafactor", *BNB_OPTIMIZERS)
# these step FSDP2's sharded DTensor parameters with plain-tensor state: refused with --fsdp
_NOT_WITH_FSDP = {
    "adafactor": "its factored second-moment statistics are plain tensors, which cannot be combined with FSDP2's "
                 "sharded (DTensor) parameters",
    **{name: "bitsandbytes' update kernels have no sharding rule for FSDP2's sharded (DTensor) parameters"
       for name in BNB_OPTIMIZERS},
    "adamw_torch_fused": "chattune steps FSDP2's sharded (DTensor) parameters with the foreach AdamW "
                         "(adamw_torch), the same update rule",
}


# --- optimizer ---------------------------------------------------------------------------------------
def param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def optimizer_problem(optim: str, fsdp: bool) -> str | None:
    """Why `--optim optim` cannot run in this setup, as one line naming the flag (None: it can)."""
    if optim in BNB_OPTIMIZERS and importlib.util.find_spec("bitsandbytes") is None:
        return f"--optim {optim} needs the bitsandbytes package (pip install bitsandbytes); or use adamw_torch"
    if fsdp and optim in _NOT_WITH_FSDP:
        return f"--optim {optim} cannot be used with --fsdp: {_NOT_WITH_FSDP[optim]}; use adamw_torch (or --deepspeed)"
    return None


def optimizer_note(optim: str, cuda: bool) -> str | None:
    """A line for the start of a run when `--optim` runs differently from its name here."""
    if optim.startswith("paged_") and not cuda:
        return (f"[config] --optim {optim}: paging moves optimizer state between GPU and host memory; without CUDA "
                "the state already is host memory, so bitsandbytes runs the same optimizer unpaged")
    return None


def make_optimizer(cfg: TrainConfig, model) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optim in ("adamw_torch", "adamw_hf", "adamw_torch_fused"):
        # The fused kernel exists for CPU and CUDA and is ~8x faster than foreach on CPU (measured on
        # SmolLM2's 135M parameters: 0.08 s vs 0.6 s per step); same update rule.
        params = [p for g in groups for p in g["params"]]
        from torch.distributed.tensor import DTensor

        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") and not isinstance(p, DTensor)
                    for p in params)
        if cfg.optim == "adamw_torch_fused" and not fused:
            raise ValueError("--optim adamw_torch_fused needs plain floating-point parameters on CPU or CUDA "
                             "(not FSDP2's sharded ones); use adamw_torch")
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_epsilon,
                                 fused=True if fused else None)
    if cfg.optim == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate)
    if cfg.optim == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=cfg.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False)
    if cfg.optim in BNB_OPTIMIZERS:
        # bitsandbytes >= 0.45 runs its 8-bit and 32-bit optimizers on CPU too (paged ones unpaged there)
        import bitsandbytes as bnb

        cls = getattr(bnb.optim, BNB_OPTIMIZERS[cfg.optim])
        return cls(groups, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_epsilon)
    raise ValueError(f"--optim must be one of {', '.join(OPTIMIZERS)}, got {cfg.optim!r}")


# --- LR schedule -------------------------------------------------------------------------------------
def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    return cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)


class ScheduleError(ValueError):
    """The LR schedule cannot be built or gives an invalid factor; the message names the flags."""


def _flags(name: str, kwargs: dict) -> str:
    given = f" --lr_scheduler_kwargs '{json.dumps(kwargs)}'" if kwargs else ""
    return f"--lr_scheduler_type {name}{given}"


def accepted_kwargs(name: str) -> list[str]:
    """The scheduler_specific_kwargs transformers' `get_scheduler` passes on for `name`."""
    if name in NO_KWARGS:
        return []
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
    from transformers.trainer_utils import SchedulerType

    params = inspect.signature(TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]).parameters
    return [p for p in params if p not in RESERVED_KWARGS]


def scheduler_kwargs(name: str, given: dict, total_steps: int, warmup: int) -> dict:
    """`--lr_scheduler_kwargs` checked against the schedule's signature, with chattune's defaults filled in:
    warmup_stable_decay's num_decay_steps (transformers requires it) is the steps left after warmup and
    num_stable_steps when only that is given, else 10% of the steps (rounded up, at least 1)."""
    for key in given:
        if key in RESERVED_KWARGS:
            raise ScheduleError(f"--lr_scheduler_kwargs: {key!r} cannot be set there: {RESERVED_KWARGS[key]}")
    accepted = accepted_kwargs(name)
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        takes = f"it takes {', '.join(accepted)}" if accepted else "it takes none"
        raise ScheduleError(f"--lr_scheduler_kwargs: unknown key(s) {unknown} for --lr_scheduler_type {name}; {takes}")
    kwargs = dict(given)
    if name == "warmup_stable_decay" and "num_decay_steps" not in kwargs:
        stable = kwargs.get("num_stable_steps")
        if isinstance(stable, int) and not isinstance(stable, bool):
            kwargs["num_decay_steps"] = max(0, total_steps - warmup - stable)
        else:
            kwargs["num_decay_steps"] = min(max(1, math.ceil(WSD_DEFAULT_DECAY * total_steps)),
                                            max(0, total_steps - warmup))
    if name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr") and "min_lr" not in kwargs \
            and "min_lr_rate" not in kwargs:
        raise ScheduleError(f"--lr_scheduler_type {name} needs --lr_scheduler_kwargs with min_lr (an absolute "
                            "learning rate) or min_lr_rate (a fraction of --learning_rate), e.g. '{\"min_lr_rate\": 0.1}'")
    if name == "warmup_stable_decay":
        decay, stable = kwargs["num_decay_steps"], kwargs.get("num_stable_steps", 0)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in (decay, stable)) \
                and (decay < 0 or stable < 0 or warmup + stable + decay > total_steps):
            raise ScheduleError(f"{_flags(name, given)}: warmup ({warmup}) + num_stable_steps ({stable}) + "
                                f"num_decay_steps ({decay}) must be non-negative and fit the run's {total_steps} steps")
    return kwargs


def _sample_steps(total: int, warmup: int, kwargs: dict) -> list[int]:
    """Steps at which to evaluate a schedule: every step of a short run; for a long one the start, the
    end, the phase boundaries and 200 points in between."""
    if total <= 2000:
        return list(range(total + 2))
    points = set(range(201)) | {total + k for k in range(-2, 2)} | {total * k // 200 for k in range(201)}
    edges = [warmup]
    if isinstance(kwargs.get("num_stable_steps"), int):
        edges.append(warmup + kwargs["num_stable_steps"])
    for edge in edges:
        points |= {edge - 1, edge, edge + 1}
    return sorted(p for p in points if p >= 0)


def build_scheduler(name: str, given: dict, optimizer, total_steps: int, warmup: int):
    """transformers' schedule, with every lambda evaluated over the run's steps: an exception or a factor
    that is not a finite number >= 0 is a ScheduleError naming the flags (not a crash at step N)."""
    import warnings

    from transformers import get_scheduler

    kwargs = scheduler_kwargs(name, given, total_steps, warmup)
    try:
        with warnings.catch_warnings():  # we always pass num_training_steps; num_stable_steps is the user's
            warnings.filterwarnings("ignore", message="Both num_training_steps and num_stable_steps")
            scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                                      scheduler_specific_kwargs=kwargs)
    except (TypeError, ValueError, ArithmeticError) as e:
        raise ScheduleError(f"{_flags(name, given)}: {' '.join(str(e).split())}") from None
    for step in _sample_steps(total_steps, warmup, kwargs):
        for fn in getattr(scheduler, "lr_lambdas", []):
            try:
                factor = fn(step)
            except (TypeError, ValueError, ArithmeticError) as e:
                factor = f"an error ({' '.join(str(e).split())})"
            if isinstance(factor, str) or isinstance(factor, bool) or not isinstance(factor, int | float) \
                    or not math.isfinite(factor) or factor < 0:
                shown = factor if isinstance(factor, str) else repr(factor)
                raise ScheduleError(f"{_flags(name, given)}: the learning-rate factor at step {step} of a {total_steps}-"
                                    f"step run with {warmup} warmup steps is {shown}, not a finite number >= 0 "
                                    "(see --warmup_steps / --warmup_ratio / --max_steps)")
    return scheduler


def check_scheduler(cfg: TrainConfig) -> None:
    """Build the schedule on a one-parameter optimizer before anything is loaded. The run's length is
    known only after the data is read unless --max_steps is set; then a long placeholder run is used
    (make_scheduler checks again with the real one)."""
    given = cfg.lr_scheduler_kwargs
    steps_given = sum(v for v in given.values() if isinstance(v, int) and not isinstance(v, bool) and v > 0)
    total = cfg.max_steps if cfg.max_steps > 0 else max(100_000, 2 * (cfg.warmup_steps + steps_given))
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    build_scheduler(cfg.lr_scheduler_type, given, dummy, total, warmup_steps(cfg, total))


def make_scheduler(cfg: TrainConfig, optimizer, total_steps: int):
    return build_scheduler(cfg.lr_scheduler_type, cfg.lr_scheduler_kwargs, optimizer, total_steps,
                           warmup_steps(cfg, total_steps))
