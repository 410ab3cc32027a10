"""DeepSpeed ZeRO-2/3 backend (`--deepspeed ds_configs/<name>.json`).

"auto" values in the JSON are filled from our flags (train/sharding_config.py: micro-batch,
accumulation, clipping, bf16, bucket sizes from the model's hidden size), so the same hyperparameters
mean the same run under every backend. The optimizer is chattune's (`--optim`) unless the JSON has an
"optimizer" block, which is then used instead; a "scheduler" block is refused (the LR schedule is
always `--lr_scheduler_type`, stepped by the recipe on the optimizer inside the engine).

Scale rules (docs/design.md §3):
- ZeRO-3 partitions at construction: an `HfDeepSpeedConfig` is alive while the model is built, so
  transformers' `from_pretrained` builds under `deepspeed.zero.Init` and only rank 0 reads the weights.
- Saves gather collectively, one parameter at a time: every rank takes part in assembling each
  parameter's full fp32 master copy (`safe_get_full_fp32_param`), rank 0 streams it to the export.
  This is what makes the LoRA adapter real when ZeRO-3 keeps parameters partitioned
  (`stage3_param_persistence_threshold`), and what makes `--save_dtype fp32` really fp32.
- On gloo (CPU), ZeRO's all-gathers write into their output in place (train/gloo_allgather.py): gloo's
  own stages a copy of the whole output, which at the tied embedding was 0.2 × the model per rank.
- LoRA checkpoints leave the frozen base out (`exclude_frozen_parameters`).
- ZeRO-3 LoRA keeps the frozen weights outside the decoder layers (embeddings, final norm, LM head)
  whole on every rank, as FSDP2 does (train/layers.py): partitioned, the tied embedding was gathered
  whole at the embedding, at the LM head and again in backward, on top of its partition.

Gradient accumulation stays ours: every micro-batch calls `engine.backward(loss, scale_wrt_gas=False)`
(our loss is already divided by the step's global supervised-token count). The engine's step clips,
and discards the update when the gradients are not finite; a non-finite micro-batch loss is turned
into NaN gradients first, so the engine discards that step too (`optimizer_step` reports it not applied).

Resumable checkpoints are not DeepSpeed's own files (which load only on the same world size) but the
portable layout every backend shares (train/portable_state.py): each trainable parameter's fp32 master
copy and optimizer states are assembled one parameter at a time with DeepSpeed's public
`safe_get_full_fp32_param` / `safe_get_full_optimizer_state`, and each rank hands DCP only its slice
(a DTensor shard). Loading reads the slices back, assembles one full tensor at a time and sets it with
`safe_set_full_fp32_param` / `safe_set_full_optimizer_state`; the model's own (16-bit) weights are then
refreshed from the fp32 masters. So a ZeRO-3 checkpoint from 2 ranks resumes on 1, under FSDP2 or in a
single process, and the other way round.
"""

from __future__ import annotations

from pathlib import Path

import torch

from train import gloo_allgather
from train.backends import Backend, persistent_buffers
from train.distributed import DistInfo, print0
from train.layers import decoder_layer_classes, replicated_frozen_params
from train.sharding_config import FSDPConfigError, zero_stage


def init_deepspeed_distributed(**kwargs) -> None:
    """`deepspeed.init_distributed`, without DeepSpeed's shared-memory all-reduce kernel on CPU.

    With the CPU accelerator, DeepSpeed JIT-compiles that kernel while it sets up its comm layer: a C++
    toolchain is required and the first run spends about a minute of both cores of a 2-core CPU compiling
    (measured: 45–78 s), again whenever the Python environment changes. Only DeepSpeed's inference
    all-reduce uses it; training's collectives go through torch.distributed. The op is marked incompatible
    for this process, so `deepspeed/comm/torch.py`'s `build_shm_op` skips it. Elsewhere nothing changes."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        compatible = getattr(deepspeed.ops, "__compatible_ops__", None)  # computed once per process, then a dict
        if isinstance(compatible, dict):
            compatible["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(**kwargs)


class DeepSpeedBackend(Backend):
    name = "deepspeed"

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
        init_deepspeed_distributed()  # zero.Init reads the world size from DeepSpeed's comm layer
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

    def optimizer_step(self, model, optimizer, max_norm: float, loss_is_finite: bool, scaler=None) -> tuple[bool, float]:
        """The engine clips (gradient_clipping from --max_grad_norm) and discards a non-finite update itself."""
        skipped = self.engine.skipped_steps
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if isinstance(norm, torch.Tensor):
            norm = norm.item()
        return self.engine.skipped_steps == skipped, float("nan") if norm is None else float(norm)

    def make_grad_scaler(self):
        return None  # the JSON's fp16 block: DeepSpeed's own dynamic loss scaler

    def zero_grad(self, optimizer) -> None:
        pass  # the engine zeroes gradients in step()

    def global_shape(self, tensor):
        return getattr(tensor, "ds_shape", tensor.shape)  # a ZeRO-3 partitioned parameter is empty here

    def _full(self, tensor) -> torch.Tensor:
        """The whole tensor on every rank (collective): a trainable parameter's fp32 master copy, a frozen one's
        16-bit value (gathered if partitioned) in fp32, a buffer as it is."""
        from deepspeed.utils import safe_get_full_fp32_param

        full = tensor
        if isinstance(tensor, torch.nn.Parameter):
            full = safe_get_full_fp32_param(tensor) if tensor.requires_grad else None
            if full is None:
                full = self._gather_frozen(tensor)
        full = full.detach()
        return full.float() if full.is_floating_point() else full

    @torch.no_grad()
    def gather_full(self, tensor):
        full = self._full(tensor)
        return full.cpu() if self.info.is_main else None

    def _gather_frozen(self, param) -> torch.Tensor:
        if hasattr(param, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                return param.data.detach().cpu().clone()
        return param.data

    # --- the portable checkpoint (train/portable_state.py) --------------------------------------------
    def _checkpointed(self, model) -> list[tuple[list[str], torch.nn.Parameter]]:
        """(every name of, parameter) for what a checkpoint holds: trainable parameters (LoRA) or all of them;
        a tied weight is stored under each of its names, as torch's model state dicts do."""
        module = self.unwrap(model)
        names: dict[int, list[str]] = {}
        params: dict[int, torch.nn.Parameter] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            if p.requires_grad or not self.is_peft:
                names.setdefault(id(p), []).append(name)
                params[id(p)] = p
        return [(names[k], params[k]) for k in names]

    def _state_keys(self, optimizer) -> list[str]:
        """Optimizer state tensors kept per parameter (exp_avg, exp_avg_sq for Adam; none for plain SGD)."""
        for state in optimizer.state.values():
            return sorted(k for k, v in state.items() if k != "step" and isinstance(v, torch.Tensor) and v.dim() > 0)
        return []

    def _ensure_optimizer_state(self, optimizer, keys: list[str]) -> None:
        """ZeRO creates optimizer states lazily, at the first step; a resume sets them before that, so they
        are created here as the optimizer would (zeros; the step count as a tensor for torch's optimizers,
        an int for DeepSpeed's CPU Adam) and ZeRO-1/2 is told to link its per-parameter views to them."""
        zero = self.engine.optimizer
        flats = getattr(zero, "fp32_partitioned_groups_flat", None) or getattr(zero, "single_partition_of_fp32_groups", [])
        torch_optim = type(optimizer).__module__.startswith("torch.optim")
        on_device = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
        for flat in flats:
            state = optimizer.state[flat]
            if state:
                continue
            state["step"] = torch.zeros((), dtype=torch.float32, device=flat.device if on_device else "cpu") \
                if torch_optim else 0
            for key in keys:
                state[key] = torch.zeros_like(flat)
        self._link_optimizer_state()

    def _link_optimizer_state(self) -> None:
        """ZeRO-1/2 links each parameter's view of the optimizer state once, right after the first step of the
        first parameter group, when the other groups have no state yet; their views stay empty ("exp_avg not
        found in optimizer state fragment"). Link again, now that every group's state exists."""
        zero = self.engine.optimizer
        if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    def _step_count(self, optimizer) -> torch.Tensor:
        for state in optimizer.state.values():
            if "step" in state:
                return torch.as_tensor(state["step"], dtype=torch.float32).detach().clone().cpu()
        for group in optimizer.param_groups:
            if "step" in group:
                return torch.tensor(float(group["step"]))
        return torch.tensor(0.0)

    def _mesh(self):
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.info.device.type, (self.info.world_size,))

    @torch.no_grad()
    def checkpoint_state(self, model, optimizer) -> dict:
        return self._portable_state(model, optimizer, fill=True)

    def _portable_state(self, model, optimizer, fill: bool) -> dict:
        """This rank's shards of the portable state: this run's values (`fill`, collective: one parameter is
        assembled at a time), or, to load into, the same layout left empty (no gathering)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        mesh = self._mesh()
        self._link_optimizer_state()
        keys = self._state_keys(optimizer)
        step = self._step_count(optimizer)

        def shard(full, tensor) -> torch.Tensor:
            return _my_shard(full if fill else torch.empty(tuple(self.global_shape(tensor))), mesh)

        weights: dict[str, torch.Tensor] = {}
        optim: dict[str, dict] = {}
        for names, param in self._checkpointed(model):
            weights.update(dict.fromkeys(names, shard(self._full(param) if fill else None, param)))
            if param.requires_grad:
                entry = {"step": step}
                for key in keys:
                    entry[key] = shard(safe_get_full_optimizer_state(param, key) if fill else None, param)
                optim[names[0]] = entry  # torch keys a tied parameter's optimizer state by its first name
        if not self.is_peft:
            for name, buf in persistent_buffers(self.unwrap(model)):
                weights[name] = shard(buf.detach().float() if fill else None, buf)
        return {"model": weights, "optim": optim}

    @torch.no_grad()
    def load_checkpoint_state(self, directory: Path, model, optimizer) -> None:
        import torch.distributed.checkpoint as dcp
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        from train.portable_state import DCP_DIR, check_matches, saved_optimizer_keys

        self._ensure_optimizer_state(optimizer, saved_optimizer_keys(directory))
        target = self._portable_state(model, optimizer, fill=False)
        check_matches(directory, target)
        dcp.load(target, checkpoint_id=str(directory / DCP_DIR))
        keys = self._state_keys(optimizer)
        module = self.unwrap(model)
        for names, param in self._checkpointed(model):
            full = target["model"][names[0]].full_tensor()
            if param.requires_grad:
                safe_set_full_fp32_param(param, full)
                for key in keys:
                    safe_set_full_optimizer_state(param, target["optim"][names[0]][key].full_tensor(), key)
            if not hasattr(param, "ds_id"):  # ZeRO-1/2: every rank holds the whole 16-bit weight
                param.data.copy_(full.to(param.dtype))
        if not self.is_peft:
            for name, buf in persistent_buffers(module):
                buf.copy_(target["model"][name].full_tensor().to(buf.dtype))
        step = next(iter(target["optim"].values()), {}).get("step")
        if step is not None:
            for state in optimizer.state.values():
                if "step" in state:
                    state["step"] = step.to(state["step"].device).clone() if isinstance(state["step"], torch.Tensor) \
                        else int(step.item())
            for group in optimizer.param_groups:
                if "step" in group:
                    group["step"] = int(step.item())
        inner = self.engine.optimizer
        if hasattr(inner, "fp16_partitioned_groups_flat"):  # ZeRO-3: partitioned 16-bit weights from the masters
            for low, master in zip(inner.fp16_partitioned_groups_flat, inner.fp32_partitioned_groups_flat):
                low.data.copy_(master.data)


def _my_shard(full: torch.Tensor, mesh):
    """This rank's row slice of a tensor every rank holds whole, as a DTensor (a copy: `full` can be freed)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    full = full.detach()
    if full.dim() == 0:
        return DTensor.from_local(full.clone(), mesh, [Replicate()])
    shard = distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None)
    return DTensor.from_local(shard.to_local().clone(), mesh, [Shard(0)], shape=shard.shape, stride=shard.stride())
