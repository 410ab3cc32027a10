"""Pick the backend the flags ask for: DeepSpeed (`--deepspeed`), FSDP2 (`--fsdp`), DDP or single process."""

from __future__ import annotations

from train.backends import Backend, DDPBackend
from train.config import TrainConfig
from train.distributed import DistInfo
from train.precision import Precision, PrecisionError
from train.sharding_config import FSDPSettings, fill_auto, load_ds_config


def make_backend(info: DistInfo, cfg: TrainConfig, precision: Precision, hidden_size: int | None = None) -> Backend:
    if cfg.deepspeed:
        from train.deepspeed_backend import DeepSpeedBackend

        if precision.name == "fp16" and info.device.type == "cpu":
            raise PrecisionError("--fp16 with --deepspeed needs a GPU: DeepSpeed's CPU accelerator has no fp16 "
                                 "(use --fsdp, or a single process, for fp16 on CPU)")

        ds_config = fill_auto(load_ds_config(cfg.deepspeed), cfg, info.world_size, hidden_size, precision.name)
        return DeepSpeedBackend(info, ds_config, cfg.is_peft, quantized=cfg.q_lora)
    if cfg.fsdp:
        from train.fsdp import FSDPBackend

        settings = FSDPSettings.from_flags(cfg.fsdp, cfg.fsdp_transformer_layer_cls_to_wrap, cfg.fsdp_config)
        return FSDPBackend(info, settings, precision, cfg.is_peft, quantized=cfg.q_lora)
    return DDPBackend(info, cfg.is_peft) if info.distributed else Backend(info, cfg.is_peft)
