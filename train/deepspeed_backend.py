"""DeepSpeed ZeRO-2/3 backend (`--deepspeed ds_configs/<name>.json`).

"auto" values in the JSON are filled from our flags (train/sharding_config.py: micro-batch,
accumulation, clipping, bf16, bucket sizes from the model's hidden size), so the same hyperparameters
mean the same run under every backend. The optimizer is chattune's (`--optim`) unless the JSON has an
"optimizer" block, which is then used instead; a "scheduler" block is refused (the LR schedule is
always `--lr_scheduler_type`, stepped by the recipe on the optimizer inside the engine).

Scale rules (DESIGN.md §3):
- ZeRO-3 partitions at construction: an `HfDeepSpeedConfig` is alive while the model is built, so
  transformers' `from_pretrained` builds under `deepspeed.zero.Init` and only rank 0 reads the weights.
- Saves gather collectively: every rank takes part in assembling each parameter's full fp32 master
  copy (`safe_get_full_fp32_param`), rank 0 keeps it on CPU. This is what makes the LoRA adapter real
  when ZeRO-3 keeps parameters partitioned (`stage3_param_persistence_threshold`), and what makes
  `--save_dtype fp32` really fp32.
- On gloo (CPU), ZeRO's all-gathers write into their output in place (train/gloo_allgather.py): gloo's
  own stages a copy of the whole output, which at the tied embedding was 0.2 × the model per rank.
- LoRA checkpoints leave the frozen base out (`exclude_frozen_parameters`).
- ZeRO-3 LoRA keeps the frozen weights outside the decoder layers (embeddings, final norm, LM head)
  whole on every rank, as FSDP2 does (train/layers.py): partitioned, the tied embedding was gathered
  whole at the embedding, at the LM head and again in backward, on top of its partition.

Gradient accumulation stays ours: every micro-batch calls `engine.backward(loss, scale_wrt_gas=False)`
(our loss is already divided by the step's global supervised-token count). The engine's step clips,
and discards the update when the gradients are not finite; a non-finite micro-batch loss is turned
into NaN gradients first, so the engine discards that step too (`steps_itself`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from train import gloo_allgather
from train.backends import Backend
from train.distributed import DistInfo, print0
from train.layers import decoder_layer_classes, replicated_frozen_params
from train.sharding_config import FSDPConfigError, zero_stage


class DeepSpeedBackend(Backend):
    name = "deepspeed"
    steps_itself = True

    def __init__(self, info: DistInfo, ds_config: dict, is_peft: bool, quantized: bool = False):
        super().__init__(info, is_peft)
        self.ds_config = ds_config
        self.quantized = quantized
        self.engine = None
        self._hf_ds_config = None  # kept alive: transformers checks it through a weak reference

    @property
    def loss_scale(self) -> float:
        return float(self.info.world_size)  # DeepSpeed averages gradients over data-parallel ranks

    @property
    def stage(self) -> int:
        return zero_stage(self.ds_config)

    def build_model(self, build):
        import deepspeed

        deepspeed.init_distributed()  # zero.Init reads the world size from DeepSpeed's comm layer
        gloo_allgather.use_for_deepspeed()  # gloo's own all-gather stages the whole output in a copy
        # a 4-bit base cannot be built under zero.Init: each rank loads its own quantized copy (~S/8)
        if self.stage == 3 and not self.quantized:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)  # from_pretrained now builds under zero.Init
        return build("device")

    def setup(self, model, make_optimizer):
        import deepspeed

        if self.stage == 3:
            self._replicate_frozen_root(model)
        optimizer = None if "optimizer" in self.ds_config else make_optimizer(model)
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config,
            model_parameters=[p for p in model.parameters() if p.requires_grad] if optimizer is None else None)
        self.engine = engine
        # The recipe's LR scheduler drives the torch optimizer inside DeepSpeed's ZeRO wrapper (whose
        # param_groups are that optimizer's); the engine itself performs the steps.
        return engine, getattr(ds_optimizer, "optimizer", ds_optimizer)

    @torch.no_grad()
    def _replicate_frozen_root(self, model) -> None:
        """ZeRO-3: the frozen weights outside the decoder layers (train/layers.py) become whole tensors on
        every rank, out of ZeRO's reach: non-persistent buffers, so the engine neither partitions them
        again nor puts them in LoRA checkpoints (the export gathers trainable weights only)."""
        import deepspeed

        try:
            classes = decoder_layer_classes(model, ())
        except FSDPConfigError:  # no detectable decoder layers: everything stays partitioned
            return
        frozen = {id(p) for p in replicated_frozen_params(model, [m for m in model.modules() if isinstance(m, classes)])}
        owners = [(m, name, p) for m in model.modules() for name, p in m._parameters.items()
                  if p is not None and id(p) in frozen]
        whole: dict[int, torch.Tensor] = {}
        for _, _, param in owners:
            if id(param) in whole:  # tied: one tensor for all its modules
                continue
            if hasattr(param, "ds_id"):  # built under zero.Init (a 4-bit base is not)
                with deepspeed.zero.GatheredParameters([param]):
                    whole[id(param)] = param.data  # the gathered tensor itself: ZeRO drops only its reference
                param.ds_tensor.data = torch.empty(0, dtype=param.ds_tensor.dtype)  # this rank's partition
            else:
                whole[id(param)] = param.data
        for module, name, param in owners:
            del module._parameters[name]
            module.register_buffer(name, whole[id(param)], persistent=False)
        if whole:
            mb = sum(t.numel() * t.element_size() for t in whole.values()) / 2**20
            print0(f"[deepspeed] ZeRO-3: {len(whole)} frozen tensor(s) outside the decoder layers ({mb:,.0f} MB) "
                   "kept whole on every rank")

    def unwrap(self, model):
        return model.module if hasattr(model, "module") else model

    def backward(self, loss) -> None:
        engine = self.engine
        # NaN gradients (rather than possibly finite ones from an infinite loss) make the engine's
        # overflow check discard the whole step; no host sync is needed to decide
        # (a constant factor: torch.where over `loss * nan` would leak NaN into the finite case's gradient)
        loss = loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))
        engine.backward(loss, scale_wrt_gas=False)
        if not engine.is_gradient_accumulation_boundary():
            engine.step()  # only advances the engine's micro-step counter

    def clip_and_norm(self, model, max_norm: float) -> float:
        raise NotImplementedError("DeepSpeed clips inside its step; read grad_norm_after_step()")

    def step(self, optimizer) -> bool:
        skipped = self.engine.skipped_steps
        self.engine.step()
        return self.engine.skipped_steps == skipped

    def grad_norm_after_step(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        if isinstance(norm, torch.Tensor):
            norm = norm.item()
        return float(norm) if norm is not None else None

    def make_grad_scaler(self):
        return None  # the JSON's fp16 block: DeepSpeed's own dynamic loss scaler

    def zero_grad(self, optimizer) -> None:
        pass  # the engine zeroes gradients in step()

    @torch.no_grad()
    def export_state(self, model, trainable_only: bool):
        """Gather every (trainable) parameter's full fp32 master copy collectively; rank 0 keeps it."""
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.unwrap(model)
        out: dict[str, torch.Tensor] = {}
        for name, param in module.named_parameters():
            if trainable_only and not param.requires_grad:
                continue
            full = safe_get_full_fp32_param(param) if param.requires_grad else None
            if full is None:  # frozen (not in the optimizer): its 16-bit value, gathered if partitioned
                full = self._gather_frozen(param)
            if self.info.is_main:
                out[name] = full.detach().float().cpu().clone() if full.is_floating_point() else full.cpu().clone()
        if not trainable_only:
            persistent = set(module.state_dict().keys())
            for name, buf in module.named_buffers():
                if name in persistent and self.info.is_main:
                    out[name] = buf.detach().cpu().clone()
        return out if self.info.is_main else None

    def _gather_frozen(self, param) -> torch.Tensor:
        if hasattr(param, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                return param.data.detach().cpu().clone()
        return param.data

    def save_state(self, directory: Path, model, optimizer) -> None:
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state", save_latest=False,
                                    exclude_frozen_parameters=self.is_peft)

    def load_state(self, directory: Path, model, optimizer) -> None:
        path, _ = self.engine.load_checkpoint(str(directory / "deepspeed"), tag="state", load_optimizer_states=True,
                                              load_lr_scheduler_states=False, load_module_strict=not self.is_peft)
        if path is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed state to resume from")
