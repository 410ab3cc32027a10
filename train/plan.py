"""Memory planner: what each rank of a training run will hold, term by term, before anything is loaded.

    python -m train.plan <training flags> --world_size N [--device cpu|cuda] [--memory_gb G] [--json]

It takes the training flags themselves (the same parser as train/train.py; --data_path and --output_dir may be
left out), reads only the model's config, and builds the model on the meta device (LoRA included): parameter
counts per decoder layer and outside the layers come from the module tree, and the activations one decoder
layer keeps for backward from autograd itself (train/activations.py). Each term is placed on the device or
the host, for the rank that loads the checkpoint ("loading", rank 0) and the others ("other"), and at the
phase of a step where it is held: the whole run, loading, the end of forward, the end of backward, the
optimizer step. A place's peak is what is held the whole run plus the largest phase.

`--json` prints one object; `peak_mb` maps "loading" and "other" (null with one process) to
{"host": MB, "device": MB} (on CPU runs everything is host). The error against measured runs is in
docs/memory.md (`python scripts/bench_plan.py`). The constants below are measured or taken from the
libraries' source; each says which.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

MB = 2**20
# Phases of a run: "load" (building and sharding the model, before the first step); "forward" (the end of
# forward and the start of backward, when every activation is held); "backward" (its end, every gradient held);
# "optimizer" (the step). Terms held in every phase are "always"; those held from the first step on, "train".
PHASES = ("load", "forward", "backward", "optimizer")

# Framework overhead: the resident memory of a training process besides the model's terms (Python, torch,
# transformers, peft, the tokenizer, the data, the backend's own state): a 2-layer hidden-64 model's measured
# peak minus its planned terms (`python scripts/bench_plan.py --overhead`, CPU, torch 2.13, transformers 5.24,
# deepspeed 0.19.8, 2026-12-03: single 560, FSDP2 565 / 562, ZeRO-3 590 / 586 MB). DDP is not measured: FSDP2's.
HOST_OVERHEAD_MB = {"single": 560.0, "ddp": 565.0, "fsdp": 565.0, "deepspeed": 590.0}
# CUDA: the context and cuBLAS/cuDNN workspaces live outside torch's allocator (torch.cuda.memory_allocated
# does not see them; nvidia-smi does): about 0.5 GB on an H100 with CUDA 12 (PyTorch's CUDA semantics notes),
# and the caching allocator holds blocks it cannot reuse (fragmentation), budgeted at 5% of the rest.
CUDA_CONTEXT_MB = 500.0
CUDA_FRAGMENTATION = 0.05
# DeepSpeed ZeRO-3 hooks every module (two autograd Function classes and closures each): about 18 KB per
# module, measured (45 MB over the ~2,500 modules of a LoRA-wrapped 35-layer Llama; docs/distributed.md).
DS_BYTES_PER_MODULE = 18 * 1024


OUTSIDE_ALLOCATOR = ("CUDA context and workspaces", "allocator fragmentation")
TOLERANCE = 0.15  # the error bound the planner is measured against (scripts/bench_plan.py)


class PlanError(ValueError):
    """The flags cannot be planned; the message names the flag."""


@dataclass
class Term:
    name: str
    mb: float
    phase: str  # "always" or one of PHASES
    why: str


@dataclass
class Facts:
    """What the meta-device build says about the model."""
    params: int
    layers: int
    layer_bytes: int  # all decoder layers' weights as stored for training (4-bit where QLoRA quantizes)
    root_bytes: int  # weights outside the decoder layers (embeddings, final norm, LM head), as stored
    trainable: int  # trainable parameters (fp32)
    trainable_outside_layers: int
    largest_bytes: int  # the largest single weight tensor as stored
    buffer_bytes: int
    modules: int
    hidden: int
    vocab: int
    per_layer_act: int  # bytes one decoder layer saves for backward (the largest layer)
    mlp_act: int
    mlp_input: int
    outside_act: int
    layer_input: int
    compute_bytes: int  # bytes per element of the compute dtype
    compute_layer_bytes: int  # one decoder layer's weights in the compute dtype (what a gather holds)
    tied: bool  # the LM head is the input embedding
    checkpoint_bytes: int  # the weights as the checkpoint stores them (the config's dtype)
    chunked_loss: bool  # train/loss.py computes the loss in chunks (else whole logits)
    head_cast: int  # bytes of the LM head cast to 16 bits for each use (a frozen fp32 head under autocast: QLoRA)
    names: dict = field(default_factory=dict)


def _plan_cfg(argv: list[str]):
    from train.config import parse_args

    defaults = {"data_path": ["planned.jsonl"], "output_dir": "planned-run"}
    return parse_args(argv, defaults)


def _precision(cfg, device: str):
    """What the run will compute in: this CPU's answer, or a bf16-capable GPU's (the planner may run without one)."""
    from train.precision import resolve_precision

    return resolve_precision(cfg.bf16, cfg.fp16, torch.device(device), cuda_bf16=True)


def model_facts(cfg, precision, length: int) -> Facts:
    """Build the model on the meta device as training would (LoRA included) and count; activations are those of
    one row of `length` positions (they grow linearly with the rows of a micro-batch)."""
    from train.activations import trace_activations
    from train.distributed import DistInfo
    from train.long_rows import decoder_layers
    from train.loss import chunkable
    from train.model_setup import build_model

    meta_cfg = dataclasses.replace(cfg, q_lora=False, bits=4, lora=cfg.is_peft, gradient_checkpointing=False,
                                   tiled_mlp=False, torch_compile=False, activation_offloading=False, packing=False,
                                   sequence_parallel_size=1, neftune_noise_alpha=0.0)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    model = build_model(meta_cfg, info, "meta", precision)
    layers = decoder_layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    quantized = {id(m.weight) for layer in layers for m in layer.modules()
                 if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad} if cfg.q_lora else set()
    # QLoRA: peft's prepare_model_for_kbit_training casts every weight bitsandbytes did not quantize (embeddings,
    # norms, LM head) to fp32, and the residual stream that starts at the fp32 embedding stays fp32 under autocast
    upcast = cfg.q_lora and precision.autocast_dtype is not None
    layer_bytes = root_bytes = trainable = trainable_outside = largest = params = 0
    for p in model.parameters():  # tied weights once
        params += p.numel()
        size = _quantized_bytes(p.numel(), cfg.bits) if id(p) in quantized else p.numel() * (
            4 if upcast else p.element_size())
        largest = max(largest, size)
        if id(p) in in_layers:
            layer_bytes += size
        else:
            root_bytes += size
        if p.requires_grad:
            trainable += p.numel()
            if id(p) not in in_layers:
                trainable_outside += p.numel()
    compute = precision.compute_dtype
    one_layer = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    # activations in the compute dtype: under autocast / mixed precision the matmuls' outputs are 16-bit
    model.to(compute)
    acts = trace_activations(model, 1, length)
    if upcast and acts.hidden_16bit and max(acts.hidden_16bit):
        # hidden-size tensors are fp32 (the residual stream), twice their 16-bit trace
        per_layer = [a + h for a, h in zip(acts.per_layer, acts.hidden_16bit)]
        acts = dataclasses.replace(acts, per_layer=per_layer, layer_input=2 * acts.layer_input)
    config = model.config
    return Facts(params=params, layers=len(layers), layer_bytes=layer_bytes, root_bytes=root_bytes, trainable=trainable,
                 trainable_outside_layers=trainable_outside, largest_bytes=largest,
                 buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
                 modules=sum(1 for _ in model.modules()), hidden=config.hidden_size,
                 vocab=config.vocab_size, per_layer_act=max(acts.per_layer), mlp_act=max(acts.mlp),
                 mlp_input=acts.mlp_input, outside_act=acts.outside, layer_input=acts.layer_input,
                 compute_bytes=torch.tensor([], dtype=compute).element_size(),
                 compute_layer_bytes=one_layer * torch.tensor([], dtype=compute).element_size(),
                 tied=_tied(model), checkpoint_bytes=params * _checkpoint_element_size(config),
                 chunked_loss=chunkable(model),
                 head_cast=config.vocab_size * config.hidden_size * 2 if upcast else 0,
                 names={"model_type": config.model_type, "layer": type(layers[0]).__name__})


def _checkpoint_element_size(config) -> int:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, torch.float32)
    return torch.tensor([], dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 4


def _tied(model) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def _quantized_bytes(numel: int, bits: int) -> float:
    """bitsandbytes storage: NF4 = 4 bits + one 8-bit absmax per 64 values, double-quantized (fp32 scale per
    256 blocks); int8 (LLM.int8) = 8 bits + one fp32 scale per row (~0)."""
    if bits == 4:
        return numel * (0.5 + 1 / 64 + 4 / (64 * 256))
    return numel


class Setup(NamedTuple):
    """How the flags distribute the model, read once per plan."""
    backend: str  # single | ddp | fsdp | deepspeed
    stage: int  # ZeRO stage (0 elsewhere)
    reshard: bool  # FSDP2 reshards after forward (full_shard)
    offload: bool  # parameters / optimizer state in host memory (FSDP2 offload, DeepSpeed offload_* blocks)


def _backend(cfg, world_size: int) -> Setup:
    if cfg.deepspeed:
        from train.sharding_config import load_ds_config, zero_stage

        ds = load_ds_config(cfg.deepspeed)
        zero = ds.get("zero_optimization", {})
        return Setup("deepspeed", zero_stage(ds), True, bool(zero.get("offload_optimizer") or zero.get("offload_param")))
    if cfg.fsdp:
        from train.sharding_config import FSDPSettings

        settings = FSDPSettings.from_flags(cfg.fsdp, cfg.fsdp_transformer_layer_cls_to_wrap, cfg.fsdp_config)
        return Setup("fsdp", 0, settings.reshard_after_forward, settings.offload)
    return Setup("ddp" if world_size > 1 else "single", 0, True, False)


def _optimizer_bytes_per_param(optim: str) -> tuple[float, str]:
    if optim in ("adamw_torch", "adamw_torch_fused", "adamw_hf", "paged_adamw_32bit"):
        return 8.0, "AdamW: two fp32 moments"
    if optim in ("adamw_bnb_8bit", "paged_adamw_8bit"):
        return 2.0, "8-bit AdamW: two 8-bit moments (block scales ~0)"
    if optim == "sgd":
        return 0.0, "SGD without momentum: no state"
    return 4.0, "Adafactor: factored second moment, ~1 fp32 value per parameter budgeted"


def plan(cfg, world_size: int, device: str = "cpu", memory_gb: float | None = None, facts: Facts | None = None) -> dict:
    """The per-rank plan of `cfg` on `world_size` processes; see the module docstring. `facts` (from
    `model_facts` for the same model, precision and row length) skips the meta-device build."""
    if world_size < 1:
        raise PlanError(f"--world_size must be >= 1, got {world_size}")
    if device not in ("cpu", "cuda"):
        raise PlanError(f"--device must be cpu or cuda, got {device!r}")
    sp = cfg.sequence_parallel_size
    if world_size % sp:
        raise PlanError(f"--sequence_parallel_size {sp} must divide --world_size {world_size}")
    setup = _backend(cfg, world_size)
    precision = _precision(cfg, device)
    batch, length = cfg.per_device_train_batch_size, cfg.model_max_length
    rank_length = math.ceil(length / sp)
    facts = facts or model_facts(cfg, precision, rank_length)
    terms = {role: _terms(cfg, facts, setup, world_size, device, precision, role, rank_length)
             for role in (("loading", "other") if world_size > 1 else ("loading",))}
    peaks: dict = {}
    for role, places in terms.items():
        peaks[role] = {place: _peak(ts)[0] for place, ts in places.items()}
    for_json = {
        "world_size": world_size, "device": device,
        "backend": f"zero{setup.stage}" if setup.stage else setup.backend,
        "mode": "qlora" if cfg.q_lora else "lora" if cfg.is_peft else "full", "precision": precision.name,
        "micro_batch": batch, "model_max_length": length, "gradient_checkpointing": cfg.gradient_checkpointing,
        "sequence_parallel_size": sp, "offload": setup.offload,
        "model": {"params": facts.params, "layers": facts.layers, "trainable": facts.trainable,
                  "hidden": facts.hidden, "vocab": facts.vocab, **facts.names},
        "terms": {role: {place: [dataclasses.asdict(t) for t in ts] for place, ts in places.items()}
                  for role, places in terms.items()},
        "peak_mb": {"loading": peaks["loading"], "other": peaks.get("other")},
        "phase_mb": {role: {place: _phase_totals(ts) for place, ts in places.items()} for role, places in terms.items()},
        "peak_phase": {role: {place: _peak(ts)[1] for place, ts in places.items()} for role, places in terms.items()},
    }
    # what torch's CUDA allocator itself will report (torch.cuda.max_memory_allocated): the device peak without
    # the context and the cached-but-unused blocks
    for_json["device_allocated_mb"] = {
        role: _peak([t for t in places["device"] if t.name not in OUTSIDE_ALLOCATOR])[0] for role, places in terms.items()}
    if memory_gb is not None:
        for_json["memory_gb"] = memory_gb
        place = "device" if device == "cuda" else "host"
        worst = max(p[place] for p in peaks.values())
        for_json["fits"] = worst <= memory_gb * 1024
    return for_json


def _phase_totals(terms: list[Term]) -> dict[str, float]:
    """What a place holds in each phase."""
    always = sum(t.mb for t in terms if t.phase == "always")
    training = sum(t.mb for t in terms if t.phase == "train")
    return {p: always + (training if p != "load" else 0.0) + sum(t.mb for t in terms if t.phase == p) for p in PHASES}


def _peak(terms: list[Term]) -> tuple[float, str]:
    totals = _phase_totals(terms)
    worst = max(PHASES, key=lambda p: totals[p])
    return totals[worst], worst


def _terms(cfg, f: Facts, setup: Setup, world: int, device: str, precision, role: str,
           length: int) -> dict[str, list[Term]]:
    """Each term of one rank role, on the device and on the host."""
    backend, stage, reshard, offload = setup
    cuda = device == "cuda"
    dev: list[Term] = []
    host: list[Term] = []
    on_dev = dev if cuda else host

    def add(place: list[Term], name: str, nbytes: float, phase: str, why: str) -> None:
        if nbytes > 0:
            place.append(Term(name, nbytes / MB, phase, why))

    lora = cfg.is_peft
    head_grad = 0  # the LM head's fp32 gradient, allocated by the loss's backward (full fine-tunes)
    sharded = backend == "fsdp" or (backend == "deepspeed" and stage == 3)
    n = world if sharded else 1
    params_place = host if (offload and sharded) else on_dev
    state_place = host if offload else on_dev
    train_b = 4 * f.trainable  # trainable weights, their gradients and master copies are fp32
    full = not lora

    # --- weights ---
    if full:
        weights = f.layer_bytes + f.root_bytes
        why = "fp32 master weights"
        if backend == "deepspeed" and precision.autocast_dtype is not None:
            weights, why = f.params * f.compute_bytes, "DeepSpeed's 16-bit weights (its fp32 master copy is below)"
        if sharded:
            add(params_place, f"weights, sharded 1/{n}", weights / n, "always", why + ", split over the ranks")
        else:
            add(on_dev, "weights, replicated", weights, "always", why)
    else:
        layers_frozen = f.layer_bytes - 4 * (f.trainable - f.trainable_outside_layers)
        quant = ("4-bit NF4 + absmax" if cfg.bits == 4 else "8-bit") + "; what bitsandbytes does not quantize is fp32"
        if sharded:
            add(params_place, f"frozen decoder layers, sharded 1/{n}", layers_frozen / n, "always",
                quant if cfg.q_lora else "frozen base in the storage dtype")
            add(on_dev, "frozen root (embeddings, norm, LM head), replicated", f.root_bytes - 4 * f.trainable_outside_layers,
                "always", "kept whole on every rank: needed at both ends of every step (train/layers.py)")
            add(params_place, f"adapters, sharded 1/{n}", train_b / n, "always", "fp32 LoRA weights")
        else:
            add(on_dev, "frozen base, replicated", layers_frozen + f.root_bytes - 4 * f.trainable_outside_layers,
                "always", quant if cfg.q_lora else "frozen base in the storage dtype")
            add(on_dev, "adapters", train_b, "always", "fp32 LoRA weights")
    add(on_dev, "buffers", f.buffer_bytes, "always", "rotary inv_freq and the like")

    # --- optimizer state, gradients, master copies ---
    per_param, opt_why = _optimizer_bytes_per_param(cfg.optim)
    if backend == "deepspeed":
        states = world if stage >= 1 else 1  # ZeRO-1 partitions the optimizer's states (master copy included)
        grads = world if stage >= 2 else 1  # ZeRO-2 the gradients too
        add(state_place, f"fp32 master copy of trained weights, 1/{states}", train_b / states, "always",
            "DeepSpeed keeps its own fp32 copy of what it trains, even of fp32 weights")
        add(state_place, f"optimizer state, 1/{states}", per_param * f.trainable / states, "train",
            opt_why + ", allocated at the first step")
        add(state_place, f"gradient partition, 1/{grads}", train_b / grads, "always",
            "fp32, allocated once (contiguous_gradients)")
        h2 = f.hidden * f.hidden
        add(on_dev, "reduce bucket", 4 * h2, "backward", "reduce_bucket_size (auto: hidden²) fp32 elements")
        if stage == 3:
            live = 24 * h2 * f.compute_bytes if not lora else 2 * f.compute_layer_bytes
            add(on_dev, "gathered parameters in flight", min(live, f.compute_layer_bytes * 2), "forward",
                "stage3_max_live_parameters (auto: two decoder layers)")
            add(on_dev, "gathered parameters in flight", min(live, f.compute_layer_bytes * 2), "backward",
                "the layer being differentiated and the next one (prefetch)")
            add(host if not cuda else dev, "module hooks", DS_BYTES_PER_MODULE * f.modules, "always",
                "ZeRO-3's per-module hooks (measured)")
            if full:
                add(on_dev, "root gathered (embedding / LM head)", f.root_bytes * f.compute_bytes / 4, "forward",
                    "the tied embedding is gathered whole for the head, again in backward")
                head_grad = 4 * f.vocab * f.hidden
    else:
        add(state_place, f"optimizer state{f', sharded 1/{n}' if sharded else ''}", per_param * f.trainable / n,
            "train", opt_why + ", allocated at the first step")
        if precision.autocast_dtype is not None and full and not sharded:
            add(on_dev, "16-bit weight copies (autocast cache)", f.params * f.compute_bytes, "forward",
                "autocast casts each weight once per forward; backward keeps the copies")
        grads = train_b / n
        add(state_place, f"gradients{f', sharded 1/{n}' if sharded else ''}", grads, "backward", "fp32, one per trained weight")
        add(state_place, f"gradients{f', sharded 1/{n}' if sharded else ''}", grads, "optimizer", "held through the step")
        if full and not sharded:
            head_grad = 4 * f.vocab * f.hidden
        if full and f.tied and backend in ("single", "ddp", "fsdp"):
            add(on_dev, "tied embedding's gradient, twice (transient)", 2 * 4 * f.vocab * f.hidden, "backward",
                "at the end of backward the embedding's dense gradient and its out-of-place sum with the head's "
                "(measured: a 192 MB embedding raised the peak 384 MB)")
        if backend == "ddp":
            add(on_dev, "DDP gradient buckets", train_b, "always", "DDP's reducer copies gradients into buckets")
        if backend == "fsdp":
            gather = f.compute_layer_bytes
            if reshard:
                add(on_dev, "gathered decoder layers", 2 * gather, "forward", "the current layer and the prefetched next")
            else:
                add(on_dev, "gathered decoder layers (shard_grad_op)", f.layers * gather, "forward",
                    "kept gathered from forward to backward")
            if full:
                for phase in ("forward", "backward"):
                    add(on_dev, "root gathered (embeddings / LM head)", f.root_bytes * f.compute_bytes / 4, phase,
                        "FSDP2 reshards the root only after backward")
                add(on_dev, "root gradient, unsharded", f.root_bytes, "backward",
                    "the root's fp32 gradient, reduce-scattered after backward")
                head_grad = 4 * f.vocab * f.hidden  # the LM head's; the embedding's comes last
            if cfg.optim in ("adamw_torch", "adamw_hf"):
                add(state_place, "optimizer step temporaries (foreach)", train_b / n, "optimizer",
                    "foreach AdamW on FSDP2's DTensors: one fp32 temporary list over the shard")

    # --- activations and the loss ---
    act_b = _activation_bytes(cfg, f, length)
    add(on_dev, "activations", act_b[0], "forward", act_b[1])
    name, loss_b, why = _loss_term(cfg, f, length, head_grad)
    if cfg.gradient_checkpointing:
        # backward first runs the loss's chunks, then recomputes the last layer, with every layer input still held
        recompute = cfg.per_device_train_batch_size * f.per_layer_act
        if recompute > loss_b:
            name, loss_b, why = ("one layer recomputed in backward (more than the loss's chunk)", recompute,
                                 f"its saved tensors; the loss's backward needs {loss_b / MB:,.0f} MB before it")
    add(on_dev, name, loss_b, "forward", why)

    # --- fixed costs ---
    key = "deepspeed" if backend == "deepspeed" else backend
    add(host, "framework (Python, torch, libraries, data)", HOST_OVERHEAD_MB[key] * MB, "always", "measured")
    if cuda:
        add(dev, "CUDA context and workspaces", CUDA_CONTEXT_MB * MB, "always", "outside torch's allocator")

    # --- loading ---
    if cfg.q_lora and sharded:
        add(on_dev, "whole 4-bit model while loading", f.layer_bytes + f.root_bytes, "load",
            "bitsandbytes quantizes while loading, so every rank holds the whole quantized model until it is sharded "
            "(docs/distributed.md)")
    if role == "loading":
        if backend == "deepspeed" and stage == 3:
            add(host, "checkpoint read whole", f.checkpoint_bytes, "load",
                "under ZeRO-3 transformers reads the state dict on rank 0 and hands each weight to its partitions "
                "(measured: rank 0's load peak exceeds rank 1's by about the checkpoint's size)")
        elif backend == "fsdp" and not cfg.q_lora:
            add(host, "checkpoint tensor in flight", f.largest_bytes, "load",
                "rank 0 reads the source and scatters it tensor by tensor, releasing each (train/fsdp.py)")
        elif cuda:
            add(host, "checkpoint read on the host", f.checkpoint_bytes, "load",
                "at most the checkpoint's size: its memory-mapped pages on their way to the GPU")
        else:
            add(host, "checkpoint tensor in flight", f.largest_bytes, "load", "the safetensors file is mapped")
    elif sharded:
        add(on_dev, "one shard in flight", f.largest_bytes / n, "load", "received, then copied into place")
    if cuda:
        allocated = _peak([t for t in dev if t.name not in OUTSIDE_ALLOCATOR])[0]
        add(dev, "allocator fragmentation", CUDA_FRAGMENTATION * allocated * MB, "always",
            f"cached blocks not reused: {CUDA_FRAGMENTATION:.0%} of the allocated peak, budgeted")
    return {"host": host, "device": dev}


def _loss_term(cfg, f: Facts, length: int, head_grad: float) -> tuple[str, float, str]:
    """The chunked loss's backward (train/loss.py): each chunk recomputes its logits and holds the log-softmax, the
    loss's gradient and the logits' gradient (3 chunks of fp32 logits); the LM head's gradient is allocated after
    the first chunk's, so it adds to that peak only from the second chunk on."""
    from train.loss import CHUNK_BYTES

    tokens = cfg.per_device_train_batch_size * length
    if not f.chunked_loss:  # logits in the compute dtype, their fp32 copy, the log-softmax and its gradient
        return ("loss: whole logits (the head is not plain: no chunked loss)",
                tokens * f.vocab * (f.compute_bytes + 12) + head_grad,
                f"{tokens} positions × vocab {f.vocab}: 16/32-bit logits, fp32 copy, log-softmax, gradient")
    chunk = min(tokens, max(16, CHUNK_BYTES // (4 * f.vocab)))
    logits = chunk * f.vocab * 4
    why = f"{chunk} positions × vocab {f.vocab}: log-softmax, its gradient and the logits' gradient"
    if f.head_cast:
        why += f"; the fp32 head cast to 16 bits ({f.head_cast / MB:,.0f} MB)"
    if not head_grad:
        return "loss: one chunk's logits (fp32) in backward", 3 * logits + f.head_cast, why
    nbytes = max(3 * logits, logits + head_grad) if tokens <= chunk else 3 * logits + head_grad
    return ("loss: one chunk's logits in backward, with the LM head's gradient", nbytes,
            f"{why}; the head's fp32 gradient {head_grad / MB:,.0f} MB")


def _activation_bytes(cfg, f: Facts, length: int) -> tuple[float, str]:
    rows = cfg.per_device_train_batch_size
    per_layer = rows * (f.per_layer_act - f.mlp_act + f.mlp_input if cfg.tiled_mlp else f.per_layer_act)
    if cfg.gradient_checkpointing:
        held = f.layers * rows * f.layer_input
        why = f"checkpointing: each of {f.layers} layers keeps its input ({rows * f.layer_input / MB:.1f} MB)"
    else:
        held = f.layers * per_layer
        why = f"{per_layer / MB:.1f} MB per layer × {f.layers} layers (autograd's saved tensors, {rows} × {length} positions)"
    if cfg.activation_offloading and cfg.gradient_checkpointing:
        held = 0
        why = "offloaded to host memory"
    return held + rows * f.outside_act, why


def device_budget_gb(device: str) -> tuple[float, str]:
    """The memory a rank may use by default: the GPU's, or on CPU the host's RAM shared by the node's ranks."""
    import os

    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return props.total_memory / 2**30, f"the memory of {props.name}"
    with open("/proc/meminfo", encoding="utf-8") as f:
        total_kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return total_kb / 2**20 / local, f"host RAM / {local} local rank(s)"


def _offloaded(cfg):
    """`cfg` with parameters / optimizer state in host memory, or None when its backend cannot offload."""
    from pathlib import Path

    setup = _backend(cfg, 1)
    if setup.offload:
        return None
    if setup.backend == "fsdp":
        return dataclasses.replace(cfg, fsdp=f"{cfg.fsdp} offload")
    target = Path(__file__).resolve().parent.parent / "ds_configs" / f"zero{setup.stage}_offload.json"
    if setup.backend == "deepspeed" and setup.stage in (2, 3) and target.is_file():
        return dataclasses.replace(cfg, deepspeed=str(target))
    return None


def fit(cfg, world_size: int, device: str, memory_gb: float | None = None) -> tuple[object, list[str], dict]:
    """--auto_fit: the configuration that fits `memory_gb` per rank (default: the device's), with the global batch
    and the math unchanged. In order: the largest micro-batch that divides micro-batch × accumulation (the rest
    becomes accumulation), then gradient checkpointing on, then offload. Returns (config, log lines, its plan);
    raises PlanError when nothing fits."""
    budget_gb, source = (memory_gb, "--memory_gb") if memory_gb else device_budget_gb(device)
    place = "device" if device == "cuda" else "host"
    precision = _precision(cfg, device)
    facts = model_facts(cfg, precision, math.ceil(cfg.model_max_length / cfg.sequence_parallel_size))
    rows = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    sizes = [b for b in range(rows, 0, -1) if rows % b == 0]

    def peak(c) -> tuple[float, dict]:
        p = plan(c, world_size, device, facts=facts)
        return max(v[place] for v in p["peak_mb"].values() if v), p

    asked, _ = peak(cfg)
    lines = [f"[auto_fit] budget {budget_gb:.1f} GB per rank ({source}); as given (micro-batch "
             f"{cfg.per_device_train_batch_size} × accumulation {cfg.gradient_accumulation_steps}"
             f"{', checkpointing' if cfg.gradient_checkpointing else ''}) the plan peaks at {asked / 1024:.1f} GB"]
    stages = [("", cfg)]
    if not cfg.gradient_checkpointing:
        stages.append(("gradient checkpointing on (the micro-batches above did not fit)",
                       dataclasses.replace(cfg, gradient_checkpointing=True)))
    offloaded = _offloaded(stages[-1][1])
    if offloaded is not None:
        stages.append(("offload to host memory (nothing fit on the device)", offloaded))
    smallest = None
    for why, base in stages:
        for b in sizes:
            candidate = dataclasses.replace(base, per_device_train_batch_size=b, gradient_accumulation_steps=rows // b)
            mb, p = peak(candidate)
            smallest = min(smallest or (mb, b, why), (mb, b, why))
            if mb <= budget_gb * 1024:
                candidate.passed_flags = getattr(cfg, "passed_flags", frozenset())
                if why:
                    lines.append(f"[auto_fit] {why}")
                bigger = next((s for s in reversed(sizes) if s > b), None)
                lines.append(f"[auto_fit] micro-batch {b} × accumulation {rows // b} (global batch unchanged): planned "
                             f"peak {mb / 1024:.2f} GB ≤ {budget_gb:.1f} GB"
                             + (f"; micro-batch {bigger} would not fit" if bigger else ""))
                return candidate, lines, p
    mb, b, why = smallest
    raise PlanError(f"--auto_fit: nothing fits --memory_gb {budget_gb:.1f} per rank: the smallest plan (micro-batch {b}"
                    f"{', ' + why.split(' (')[0] if why else ''}) peaks at {mb / 1024:.1f} GB; use more ranks, "
                    "LoRA/QLoRA, a shorter --model_max_length, or sequence parallelism")


def check_first_step(planned: dict, rank: int, device: str) -> tuple[str, bool]:
    """(log line, off by more than TOLERANCE) comparing this rank's measured peak so far with its plan: VmHWM
    on CPU (the host), torch.cuda.max_memory_allocated on CUDA (the device, without the context)."""
    from train.host_memory import hwm_mb

    role = "loading" if rank == 0 else "other"
    if device == "cuda":
        measured, what = torch.cuda.max_memory_allocated() / MB, "torch.cuda.max_memory_allocated"
        planned_mb = planned["device_allocated_mb"][role]
    else:
        measured, what = hwm_mb(), "host VmHWM"
        planned_mb = planned["peak_mb"][role]["host"]
    error = measured / planned_mb - 1 if planned_mb else float("inf")
    line = (f"[memory] rank {rank} after the first step: peak {measured:,.0f} MB measured ({what}), "
            f"{planned_mb:,.0f} MB planned ({error:+.0%})")
    return line, abs(error) > TOLERANCE


def plan_run(cfg, info) -> tuple[object, dict | None]:
    """train.py's memory step, before anything is loaded: --auto_fit's choice (an error when nothing fits), or the
    plan of the flags as given; the planned peak is logged. A model the planner cannot trace is trained unplanned,
    with a note (a plan must never stop a run), unless --auto_fit needs the plan."""
    from train.distributed import print0

    device = info.device.type
    try:
        if cfg.auto_fit:
            cfg, lines, planned = fit(cfg, info.world_size, device, cfg.memory_gb)
            for line in lines:
                print0(line)
        else:
            planned = plan(cfg, info.world_size, device)
    except PlanError:
        raise
    except (OSError, ValueError, RuntimeError, NotImplementedError, TypeError) as e:  # the model's own loading
        why = " ".join(str(e).split())[:200]  # reports an unreadable config properly, after the data is checked
        if cfg.auto_fit:
            raise PlanError(f"--auto_fit: the memory planner cannot plan this model ({why})") from None
        print0(f"[memory] no plan for this model ({why}); the first step's peak is not checked")
        return cfg, None
    place = "device" if device == "cuda" else "host"
    peaks = ", ".join(f"{'rank 0' if role == 'loading' else 'other ranks'} {p[place]:,.0f} MB"
                      for role, p in planned["peak_mb"].items() if p)
    print0(f"[memory] planned peak per rank ({place}): {peaks} (at {planned['peak_phase']['loading'][place]}); "
           "`python -m train.plan` with these flags prints every term")
    return cfg, planned


def first_step_check(planned: dict | None, info):
    """The callback train_loop runs after the first optimizer step: this rank's measured peak next to its plan;
    every rank warns when it is more than TOLERANCE off, rank 0 logs it otherwise."""
    def check() -> None:
        if planned is None:
            return
        line, off = check_first_step(planned, info.rank, info.device.type)
        if off:
            print(f"{line} -- WARNING: more than {TOLERANCE:.0%} off the plan; `python -m train.plan` with these "
                  "flags prints its terms", flush=True)
        elif info.is_main:
            print(line, flush=True)

    return check


def plan_from_args(argv: list[str], world_size: int = 1, device: str = "cpu", memory_gb: float | None = None) -> dict:
    return plan(_plan_cfg(argv), world_size, device, memory_gb)


def format_plan(p: dict) -> str:
    m = p["model"]
    lines = [f"{m['model_type']} {m['params'] / 1e9:.2f}B ({m['layers']} × {m['layer']}), {p['mode']}, "
             f"{p['backend']} on {p['world_size']} × {p['device']}, {p['precision']}, micro-batch {p['micro_batch']} × "
             f"{p['model_max_length']} tokens, gradient checkpointing {'on' if p['gradient_checkpointing'] else 'off'}"
             f"{', SP ' + str(p['sequence_parallel_size']) if p['sequence_parallel_size'] > 1 else ''}"]
    for role, places in p["terms"].items():
        title = "rank 0 (loads the checkpoint)" if role == "loading" else f"ranks 1-{p['world_size'] - 1}"
        for place, terms in places.items():
            if not terms:
                continue
            lines.append(f"\n{title}, {place}:")
            for t in terms:
                lines.append(f"  {t['mb']:>10,.0f} MB  {t['phase']:9}  {t['name']}  ({t['why']})")
            lines.append(f"  {p['peak_mb'][role][place]:>10,.0f} MB  peak (at {p['peak_phase'][role][place]})")
    if "fits" in p:
        lines.append(f"\nbudget {p['memory_gb']:g} GB per rank: {'fits' if p['fits'] else 'does NOT fit'}")
    return "\n".join(lines)


def split_args(argv: list[str]) -> tuple[list[str], dict]:
    """Separate the planner's own flags (--world_size, --device, --json) from the training flags."""
    own = {"world_size": 1, "device": "cpu", "json": False}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        name = argv[i][2:] if argv[i].startswith("--") else None
        if name in ("world_size", "device"):
            if i + 1 >= len(argv):
                raise PlanError(f"--{name} needs a value")
            value = argv[i + 1]
            if name == "world_size" and not value.isdigit():
                raise PlanError(f"--world_size expects a number of processes, got {value!r}")
            own[name] = int(value) if name == "world_size" else value
            i += 2
            continue
        if name == "json":
            own["json"] = True
            i += 1
            continue
        rest.append(argv[i])
        i += 1
    return rest, own


def main(argv: list[str] | None = None) -> int:
    from train.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip() + "\n\nTraining flags: `python train/train.py --help`.")
        return 0
    try:
        rest, own = split_args(argv)
        cfg = _plan_cfg(rest)
        result = plan(cfg, own["world_size"], own["device"], cfg.memory_gb)
    except (ConfigError, PlanError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result) if own["json"] else format_plan(result))
    return 0


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(main())
