"""Model preparation for a run: dtype, attention implementation, gradient checkpointing, LoRA/QLoRA
(optionally starting from an existing adapter, --lora_weight_path), NEFTune noise (--neftune_noise_alpha)."""

from __future__ import annotations

import math
import os

import torch

from train.attention import register as register_attention
from train.attention import sequence_parallel_size
from train.config import TrainConfig
from train.distributed import DistInfo, print0
from train.long_rows import compile_layers, offload_activations, tile_mlps
from train.loss import install as install_chunked_loss
from train.modeling import (
    apply_rope_scaling,
    disable_avx512bf16_repack,
    flash_attn_available,
    load_causal_lm,
    resolve_model_dir,
)
from train.precision import Precision, resolve_precision


def attention_implementation(cfg: TrainConfig, announce: bool = True) -> str:
    """Packed rows and sequence parallelism run chattune's own attention (train/attention.py: per sample,
    with flash-attn varlen where installed); padded rows run flash-attn 2 or SDPA."""
    if cfg.packing or cfg.sequence_parallel_size > 1:
        if cfg.flash_attn and not flash_attn_available() and announce:
            print0("[model] flash-attn is not available (needs the `gpu` extra and CUDA); packed rows use "
                   "FlexAttention on CUDA, SDPA per sample on CPU")
        return register_attention()
    if cfg.flash_attn:
        if flash_attn_available():
            return "flash_attention_2"
        if announce:
            print0("[model] flash-attn is not available (needs the `gpu` extra and CUDA); using PyTorch SDPA attention")
    return "sdpa"


def model_config(cfg: TrainConfig):
    """The model's HF config (architecture, sizes) without loading any weights."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_dir(cfg.model_name_or_path),
                                        trust_remote_code=cfg.trust_remote_code, cache_dir=cfg.cache_dir)
    return apply_rope_scaling(config, cfg.rope_scaling)


def build_model(cfg: TrainConfig, info: DistInfo, placement: str = "device", precision: Precision | None = None):
    """The model to train: full (fp32 master weights), LoRA or QLoRA (peft), on `placement`:
    "device" (this rank's accelerator or CPU), "cpu" (FSDP2's rank-0 source of weights, which must not
    occupy rank 0's GPU), or "meta" (the same structure, LoRA included, without reading any weights: a
    sharded backend allocates only its shards and fills them from rank 0 — train/fsdp.py)."""
    meta = placement == "meta"
    precision = precision or resolve_precision(cfg.bf16, cfg.fp16, info.device)
    model_dir = resolve_model_dir(cfg.model_name_or_path)
    kwargs: dict = {"attn_implementation": attention_implementation(cfg, announce=not meta)}
    if cfg.cache_dir:
        kwargs["cache_dir"] = cfg.cache_dir
    if cfg.rope_scaling and not meta:
        kwargs["config"] = model_config(cfg)
    dtype = torch.float32
    if cfg.q_lora:
        from transformers import BitsAndBytesConfig

        compute = precision.compute_dtype
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute)
            if cfg.bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
        )
        kwargs["device_map"] = {"": info.device}
        dtype = compute
    elif cfg.lora and precision.autocast_dtype is not None:
        dtype = precision.compute_dtype  # the frozen base can live in bf16/fp16; adapters are made fp32 below
    if meta:
        from transformers import AutoModelForCausalLM

        if cfg.q_lora:
            raise ValueError("--q_lora: a 4-bit model cannot be built on the meta device")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config(cfg), dtype=dtype,
                                                     trust_remote_code=cfg.trust_remote_code,
                                                     **{k: v for k, v in kwargs.items() if k != "cache_dir"})
    else:
        model = load_causal_lm(model_dir, dtype=dtype, trust_remote_code=cfg.trust_remote_code, **kwargs)
    model.config.use_cache = False
    if not cfg.q_lora and placement == "device":
        model.to(info.device)
    if cfg.tiled_mlp:
        tile = int(model.config.hidden_size)
        n = tile_mlps(model, tile)
        if not meta:
            print0(f"[model] --tiled_mlp: {n} MLPs run over tiles of {tile} positions")
    if cfg.torch_compile:
        n = compile_layers(model)
        if not meta:
            print0(f"[model] --torch_compile: {n} decoder layers compiled (attention stays eager)")

    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.is_peft:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if cfg.q_lora:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
            if info.device.type == "cpu":
                disable_avx512bf16_repack(model)
        elif cfg.gradient_checkpointing:
            model.enable_input_require_grads()
        targets = cfg.lora_target_modules
        lora = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias=cfg.lora_bias,
            target_modules="all-linear" if targets in ([], ["all-linear"]) else targets, use_dora=cfg.use_dora,
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(model, lora)
        except ValueError as e:  # e.g. no module of the model matches a target name
            raise ValueError(f"--lora_target_modules {' '.join(targets) or 'all-linear'}: "
                             f"{' '.join(str(e).split())}") from None
        if cfg.lora_weight_path and not meta:  # FSDP2's meta copy is filled from rank 0's loaded one
            load_adapter_weights(model, cfg.lora_weight_path)
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()  # adapters train in fp32 even on a bf16 base
        model.peft_config["default"].base_model_name_or_path = cfg.model_name_or_path
    if cfg.neftune_noise_alpha > 0:
        install_neftune(model, cfg.neftune_noise_alpha)
    chunked = install_chunked_loss(model)  # the loss never holds tokens × vocab fp32 logits
    if cfg.activation_offloading:
        if info.device.type == "cuda":
            offload_activations(model)
        elif not meta:
            print0("[model] --activation_offloading: activations already live in host memory on CPU; nothing to do")
    if not meta:
        n_train = sum(_numel(p) for p in model.parameters() if p.requires_grad)
        n_all = sum(_numel(p) for p in model.parameters())
        print0(f"[model] {type(model).__name__} from {cfg.model_name_or_path}: {n_train:,} trainable / {n_all:,} "
               f"parameters, attention={kwargs['attn_implementation']}, loss={'chunked' if chunked else 'plain'}")
    return model


def load_adapter_weights(model, path: str) -> int:
    """Start LoRA training from an existing adapter's weights (FastChat's --lora_weight_path): every adapter
    tensor of `model` must be in the file with the same shape, and the file must hold nothing else."""
    from peft import set_peft_model_state_dict

    from train.config import ADAPTER_FILES

    directory = os.path.expanduser(path)
    file = next(os.path.join(directory, n) for n in ADAPTER_FILES if os.path.isfile(os.path.join(directory, n)))
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(file)
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    try:
        result = set_peft_model_state_dict(model, state)
    except RuntimeError as e:  # size mismatch: the adapter has another LoRA rank (--lora_r)
        first = str(e).strip().splitlines()
        raise ValueError(f"--lora_weight_path {path}: its tensors do not fit this LoRA (--lora_r {_r(model)}, the "
                         f"target modules): {' '.join(' '.join(first[1:2] or first[:1]).split())}") from None
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        what = f"{len(missing)} adapter tensor(s) missing, e.g. {missing[0]}" if missing else \
            f"{len(result.unexpected_keys)} tensor(s) this LoRA does not have, e.g. {result.unexpected_keys[0]}"
        raise ValueError(f"--lora_weight_path {path}: {what} (are --lora_target_modules and --use_dora the ones it "
                         "was trained with?)")
    n = len(state)
    print0(f"[model] LoRA weights loaded from {path} ({n} tensors)")
    return n


def _r(model) -> int:
    return model.peft_config["default"].r


def install_neftune(model, alpha: float):
    """NEFTune (Jain et al., 2023) as HF Trainer applies it: in training mode the input embeddings get
    uniform noise in [-a, a], a = alpha / sqrt(L * d) (L: the batch's sequence length, padded or packed;
    d: hidden size); in eval mode they are untouched. A forward hook on the input embedding module;
    returns its handle."""
    def add_noise(module, args, output):
        if not module.training or output.dim() < 2:
            return output
        length = output.size(-2) * sequence_parallel_size()  # the whole row's length under sequence parallelism
        bound = alpha / math.sqrt(length * output.size(-1))
        return output + torch.empty_like(output).uniform_(-bound, bound)

    return model.get_input_embeddings().register_forward_hook(add_noise)


def _numel(p) -> int:
    return getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 partitioned parameters report 0 elements


def trainable_named_parameters(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
