"""Model preparation for a run: dtype, attention implementation, gradient checkpointing, LoRA/QLoRA."""

from __future__ import annotations

import torch

from train.config import TrainConfig
from train.distributed import DistInfo, print0
from train.loss import install as install_chunked_loss
from train.modeling import disable_avx512bf16_repack, flash_attn_available, load_causal_lm, resolve_model_dir
from train.precision import Precision, resolve_precision


def attention_implementation(cfg: TrainConfig, announce: bool = True) -> str:
    if cfg.flash_attn:
        if flash_attn_available():
            return "flash_attention_2"
        if announce:
            print0("[model] flash-attn is not available (needs the `gpu` extra and CUDA); using PyTorch SDPA attention")
    return "sdpa"


def model_config(cfg: TrainConfig):
    """The model's HF config (architecture, sizes) without loading any weights."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model_dir(cfg.model_name_or_path), trust_remote_code=cfg.trust_remote_code)


def build_model(cfg: TrainConfig, info: DistInfo, placement: str = "device", precision: Precision | None = None):
    """The model to train: full (fp32 master weights), LoRA or QLoRA (peft), on `placement`:
    "device" (this rank's accelerator or CPU), "cpu" (FSDP2's rank-0 source of weights, which must not
    occupy rank 0's GPU), or "meta" (the same structure, LoRA included, without reading any weights: a
    sharded backend allocates only its shards and fills them from rank 0 — train/fsdp.py)."""
    meta = placement == "meta"
    precision = precision or resolve_precision(cfg.bf16, cfg.fp16, info.device)
    model_dir = resolve_model_dir(cfg.model_name_or_path)
    kwargs: dict = {"attn_implementation": attention_implementation(cfg, announce=not meta)}
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
                                                     trust_remote_code=cfg.trust_remote_code, **kwargs)
    else:
        model = load_causal_lm(model_dir, dtype=dtype, trust_remote_code=cfg.trust_remote_code, **kwargs)
    model.config.use_cache = False
    if not cfg.q_lora and placement == "device":
        model.to(info.device)

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
        lora = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias=cfg.lora_bias,
            target_modules=cfg.lora_target_modules or "all-linear", use_dora=cfg.use_dora, task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()  # adapters train in fp32 even on a bf16 base
        model.peft_config["default"].base_model_name_or_path = cfg.model_name_or_path
    chunked = install_chunked_loss(model)  # the loss never holds tokens × vocab fp32 logits
    if not meta:
        n_train = sum(_numel(p) for p in model.parameters() if p.requires_grad)
        n_all = sum(_numel(p) for p in model.parameters())
        print0(f"[model] {type(model).__name__} from {cfg.model_name_or_path}: {n_train:,} trainable / {n_all:,} "
               f"parameters, attention={kwargs['attn_implementation']}, loss={'chunked' if chunked else 'plain'}")
    return model


def _numel(p) -> int:
    return getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 partitioned parameters report 0 elements


def trainable_named_parameters(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
