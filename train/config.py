"""Typed training configuration: FastChat's flags (unchanged spellings) plus chattune's own.

    train/train.py --model_name_or_path M --data_path D --output_dir OUT [--flag value ...]
    train/train.py config.yaml --learning_rate 1e-4     # a YAML/JSON file, then CLI overrides

Every field has help text; every check names the flag it is about, and all checks run before any
model or data is loaded. FastChat/HF flags that chattune does not implement are rejected by name
instead of being silently ignored.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, get_args, get_origin, get_type_hints

from data.assets import ASSETS
from data.flags import training_flags
from data.formats import parse_sources
from data.progress import ENV_VAR as PROGRESS_ENV_VAR
from data.samples import REASONING_HISTORY
from data.templates import TEMPLATE_NAMES
from data.tokenize import MASKS, OVERFLOW_POLICIES, REASONING_POLICIES
from train.optim import (
    OPTIMIZERS,
    SCHEDULERS,
    UNSUPPORTED_SCHEDULERS,
    ScheduleError,
    check_scheduler,
    optimizer_note,
    optimizer_problem,
)
from train.precision import PrecisionError, parse_bf16_flag
from train.sharding_config import ConfigError, FSDPSettings, load_ds_config, load_mapping, zero_stage

STRATEGIES = ("no", "steps", "epoch")
REPORT_TO = ("none", "wandb", "tensorboard", "all")
PADDING_SIDES = ("right", "left")

# FastChat/HF flags chattune accepts but that change nothing here, and why. Each has a falsy default, so a
# line is printed at the start of a run exactly when the flag was given a (truthy) value: startup_notes().
ACCEPTED_NO_OP = {
    "lazy_preprocess": "the dataset is tokenized once and cached on disk, which serves the same purpose",
    "preprocessed_path": "the tokenized dataset is cached automatically under $CHATTUNE_CACHE/datasets "
                         "(~/.cache/chattune), keyed by the data, tokenizer and every data option",
    "padding_side": "batches are padded on the right with per-sample attention masks and positions (packed rows "
                    "need no padding), which gives the same loss for either side",
    "efficient_loss": "loss on every assistant reply is --mask assistant, chattune's default",
    "split_example_loss": "each reply is trained in its own causal context already: one sample with every reply "
                          "supervised (--mask assistant) gives the same per-token losses as one sample per reply",
    "dataloader_num_workers": "batches are collated in the training process from the memory-mapped dataset; "
                              "there are no loader workers to start",
    "ddp_timeout": "the process group keeps PyTorch's default timeout; the dataset build coordinates through the "
                   "filesystem, not a collective, so a long tokenization cannot hit it",
}
# Flags that exist in FastChat/HF but are not supported: rejected with the reason.
REJECTED = {
    "half_precision_backend": "not used by chattune's training loop",
    "push_to_hub": "chattune does not upload; upload --output_dir with `huggingface-cli upload`",
    "hub_model_id": "chattune does not upload; upload --output_dir with `huggingface-cli upload`",
    "load_best_model_at_end": "not supported: --save_total_limit keeps the newest checkpoints; pick one by its "
                              "eval_loss in metrics.jsonl",
    "metric_for_best_model": "not supported (no --load_best_model_at_end); eval_loss is in metrics.jsonl",
    "label_smoothing_factor": "not supported: the loss is plain token cross-entropy",
    "fsdp_min_num_params": "FSDP2 shards per decoder layer (--fsdp_transformer_layer_cls_to_wrap), not by size",
}


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    # --- model ---
    model_name_or_path: str = _help("HF model dir, hub id, .gguf file or asset:NAME", default="")
    tokenizer_name_or_path: str | None = _help("tokenizer source if different from the model", default=None)
    trust_remote_code: bool = _help("allow custom model code from the model repo", default=False)
    flash_attn: bool = _help("use flash-attn 2 (train_mem.py turns this on when flash-attn is importable)", default=False)
    cache_dir: str | None = _help("where hub downloads of the model and its config are cached (default: the HF "
                                  "cache)", default=None)
    padding_side: str | None = _help("FastChat: right or left; no effect: " + ACCEPTED_NO_OP["padding_side"],
                                     default=None)
    # --- data ---
    data_path: list[str] = _help("training data: .json/.jsonl/.parquet files, dirs or globs; several sources mix, each "
                                 "as PATH[:WEIGHT][:count=N][:template=NAME][:format=sharegpt|openai|alpaca] (e.g. a.jsonl:2 "
                                 "b/*.json:count=5000)",
                                 default_factory=list)
    eval_data_path: list[str] = _help("held-out data for eval loss", default_factory=list)
    template: str = _help(f"chat template: {', '.join(TEMPLATE_NAMES)}", default="vicuna_v1.1")
    mask: str = _help(f"which turns carry loss: {', '.join(MASKS)}", default="assistant")
    truncation: str = _help(f"over-length conversations: {', '.join(OVERFLOW_POLICIES)}", default="truncate")
    on_bad_record: str = _help("invalid records: error (stop) or skip (report and continue)", default="error")
    merge_consecutive: bool = _help("merge consecutive same-role turns instead of rejecting the record", default=False)
    drop_leading_assistant: bool = _help("drop assistant turns before the first user turn (as FastChat)", default=False)
    allow_undeclared_tools: bool = _help("accept tool calls to functions the record's 'tools' does not declare",
                                         default=False)
    reasoning: str = _help("assistant reasoning (reasoning_content / <think>): train (supervised), mask (in the "
                           "context, no loss) or drop (removed)", default="train")
    reasoning_history: str = _help("templates that render earlier turns differently from a last turn (Qwen3 drops "
                                   "their reasoning): expand (each such turn gets a sample in its inference context) "
                                   "or exact (one sample; train only the turns rendered exactly)", default="expand")
    model_max_length: int = _help("maximum tokens per sample (and per packed row)", default=2048)
    packing: bool = _help("pack samples into rows of model_max_length (attention kept per sample)", default=False)
    group_by_length: bool = _help("batch samples of similar length together (less padding)", default=False)
    preprocessing_num_workers: int = _help("processes for tokenizing the dataset", default=1)
    data_cache_shared: bool = _help("the dataset cache is on a filesystem every node sees: one rank of the job builds "
                                    "it (default: one builder per node, for node-local caches)", default=False)
    data_hash: str = _help("how data files enter the cache key: content (hash the bytes) or stat (path, size, "
                           "mtime: for huge files)", default="content")
    lazy_preprocess: bool = _help("FastChat; no effect: " + ACCEPTED_NO_OP["lazy_preprocess"], default=False)
    preprocessed_path: str | None = _help("FastChat (T5); no effect: " + ACCEPTED_NO_OP["preprocessed_path"],
                                          default=None)
    num_data: int | None = _help("FastChat (T5): train on N records of a single --data_path source (a seeded sample, "
                                 "as PATH:count=N); -1: all", default=None)
    last_response_loss: bool = _help("FastChat (Yuan2): loss on the last reply only, i.e. --mask last", default=False)
    efficient_loss: bool = _help("FastChat (Yuan2): loss on every reply, i.e. --mask assistant (the default)",
                                 default=False)
    split_example_loss: bool = _help("FastChat (Yuan2): one sample per reply; no effect: "
                                     + ACCEPTED_NO_OP["split_example_loss"], default=False)
    dataloader_num_workers: int | None = _help("HF; no effect: " + ACCEPTED_NO_OP["dataloader_num_workers"],
                                               default=None)
    # --- schedule ---
    output_dir: str = _help("where checkpoints and the final model go", default="")
    num_train_epochs: float = _help("epochs to train (ignored when --max_steps > 0)", default=3.0)
    max_steps: int = _help("total optimizer steps; > 0 overrides --num_train_epochs", default=-1)
    per_device_train_batch_size: int = _help("samples (or packed rows) per micro-batch per device", default=1)
    per_device_eval_batch_size: int = _help("samples per eval batch per device", default=1)
    gradient_accumulation_steps: int = _help("micro-batches per optimizer step", default=1)
    learning_rate: float = _help("peak learning rate", default=2e-5)
    weight_decay: float = _help("AdamW weight decay (not applied to biases and norms)", default=0.0)
    adam_beta1: float = _help("AdamW beta1", default=0.9)
    adam_beta2: float = _help("AdamW beta2", default=0.999)
    adam_epsilon: float = _help("AdamW epsilon", default=1e-8)
    warmup_ratio: float = _help("fraction of steps for linear warmup, in [0, 1)", default=0.0)
    warmup_steps: int = _help("warmup steps (overrides --warmup_ratio when > 0)", default=0)
    lr_scheduler_type: str = _help(f"LR schedule: {', '.join(SCHEDULERS)}", default="linear")
    lr_scheduler_kwargs: dict[str, Any] = _help(
        "the schedule's own arguments (transformers' get_scheduler scheduler_specific_kwargs), a JSON object: "
        "cosine/cosine_with_restarts num_cycles; polynomial lr_end, power; inverse_sqrt timescale; "
        "cosine_with_min_lr min_lr or min_lr_rate (one is required), num_cycles; cosine_warmup_with_min_lr the same "
        "plus warmup_lr_rate; warmup_stable_decay num_decay_steps (default: 10% of the steps, rounded up; with only "
        "num_stable_steps given, the steps left after warmup and those), num_stable_steps, warmup_type, decay_type, "
        "min_lr_ratio, num_cycles. Warmup and run length come from the other flags", default_factory=dict)
    optim: str = _help(f"optimizer: {', '.join(OPTIMIZERS)} (bitsandbytes ones run on CPU too; paged ones unpaged "
                       "there; not adafactor, bitsandbytes or adamw_torch_fused with --fsdp)", default="adamw_torch")
    max_grad_norm: float = _help("gradient clipping norm (0 disables)", default=1.0)
    seed: int = _help("random seed (model init of new heads, data order, dropout)", default=42)
    # --- precision / memory ---
    bf16: str = _help("bf16 autocast where the device computes bf16 natively (a CPU without AVX512-BF16/AMX computes "
                      "in fp32 and says so); 'force' uses bf16 anyway. Master weights stay fp32", default="false")
    fp16: bool = _help("fp16 autocast with dynamic loss scaling, for GPUs without bf16 (T4, V100, RTX 20xx)",
                       default=False)
    tf32: bool = _help("allow TF32 matmuls on CUDA", default=False)
    gradient_checkpointing: bool = _help("recompute activations in backward to save memory", default=False)
    neftune_noise_alpha: float = _help("NEFTune: uniform noise in [-a, a], a = alpha / sqrt(L * d), added to the input "
                                       "embeddings in training (never in eval); L = the batch's padded or packed "
                                       "length, d = hidden size (HF Trainer's formula; the paper uses 5-15). 0: off",
                                       default=0.0)
    auto_fit: bool = _help("before loading, size the run to --memory_gb with the memory planner (train/plan.py): the "
                           "largest micro-batch that fits, then more gradient accumulation to keep the global batch, "
                           "then gradient checkpointing, then offload; prints each choice. The global batch and the "
                           "math never change", default=False)
    memory_gb: float | None = _help("memory budget per rank in GB for --auto_fit and the planner's check (default: the "
                                    "device's: the GPU's memory, or on CPU the host's RAM shared by the node's ranks)",
                                    default=None)
    # --- long rows ---
    sequence_parallel_size: int = _help("split each row along the sequence over N ranks (Ulysses attention: each rank "
                                        "holds L/N positions' activations); data parallelism runs over the W/N groups. "
                                        "N must divide the process count and the attention heads", default=1)
    tiled_mlp: bool = _help("compute each MLP over sequence tiles of hidden-size tokens, recomputed in backward, so "
                            "its intermediate activation does not grow with the row", default=False)
    activation_offloading: bool = _help("keep saved activations in pinned host memory (CUDA; a no-op on CPU, which "
                                        "says so)", default=False)
    rope_scaling: dict[str, Any] = _help("extend the context with RoPE scaling, a JSON object such as "
                                         "'{\"rope_type\": \"yarn\", \"factor\": 4}' (types: linear, dynamic, yarn, "
                                         "longrope, llama3); recorded in the saved config and chattune.json so serving "
                                         "uses it", default_factory=dict)
    torch_compile: bool = _help("compile each decoder layer with torch.compile (attention stays outside the graph)",
                                default=False)
    # --- LoRA / QLoRA ---
    lora: bool = _help("train LoRA adapters instead of all weights (train_lora.py sets this)", default=False)
    lora_r: int = _help("LoRA rank", default=8)
    lora_alpha: int = _help("LoRA alpha", default=16)
    lora_dropout: float = _help("LoRA dropout", default=0.05)
    lora_target_modules: list[str] = _help("modules to adapt (default: all linear projections)", default_factory=list)
    lora_bias: str = _help("LoRA bias: none, all or lora_only", default="none")
    use_dora: bool = _help("DoRA (weight-decomposed LoRA)", default=False)
    lora_weight_path: str | None = _help("a PEFT adapter directory (adapter_model.safetensors or .bin) whose weights "
                                         "start the LoRA training; its shapes must match --lora_r and the target "
                                         "modules", default=None)
    q_lora: bool = _help("QLoRA: 4-bit NF4 base with double quantization, LoRA on top", default=False)
    bits: int = _help("quantized base bits with --q_lora: 4 or 8", default=4)
    # --- eval / save / log ---
    evaluation_strategy: str = _help("when to evaluate: no, steps, epoch (alias --eval_strategy)", default="no")
    eval_steps: int = _help("evaluate every N steps with --evaluation_strategy steps", default=500)
    save_strategy: str = _help("when to checkpoint: no, steps, epoch", default="steps")
    save_steps: int = _help("checkpoint every N steps with --save_strategy steps", default=500)
    save_total_limit: int | None = _help("keep at most N checkpoints (oldest deleted)", default=None)
    logging_steps: int = _help("log every N steps", default=1)
    logging_strategy: str = _help("HF compatibility: only 'steps' (log every --logging_steps steps and the last one)",
                                  default="steps")
    disable_tqdm: bool = _help("hide the progress bar (same as CHATTUNE_NO_PROGRESS=1)", default=False)
    report_to: str = _help(f"experiment tracker: {', '.join(REPORT_TO)}", default="none")
    run_name: str | None = _help("run name for the tracker", default=None)
    resume_from_checkpoint: str | None = _help("checkpoint dir; True: the newest complete one in --output_dir (error if "
                                                "none); auto: the newest if there is one, else start fresh", default=None)
    async_save: bool = _help("checkpoint in the background: the step loop waits only for the copy to host memory; the "
                             "write overlaps the next steps (a new save or the end of training waits for it)",
                             default=False)
    max_nonfinite_skips: int = _help("skip up to N steps with a non-finite loss/grad norm before stopping", default=0)
    save_dtype: str = _help("dtype of the final full-model export: bf16, fp16 or fp32", default="bf16")
    save_on_each_node: bool = _help("HF compatibility: only False (checkpoints and the model are written once per "
                                    "job into --output_dir, on a filesystem all nodes share)", default=False)
    # --- sharding ---
    fsdp: str = _help("FSDP2 sharding: 'full_shard auto_wrap [offload]' or 'shard_grad_op auto_wrap' (empty: off)",
                      default="")
    fsdp_transformer_layer_cls_to_wrap: str | None = _help("decoder layer class(es) to shard (default: detected)",
                                                           default=None)
    fsdp_config: str | None = _help("JSON/YAML with more FSDP settings (transformer_layer_cls_to_wrap, reduce_dtype)",
                                    default=None)
    deepspeed: str | None = _help("DeepSpeed JSON config (ds_configs/zero2.json, zero2_offload, zero3, zero3_offload)",
                                  default=None)
    local_rank: int = _help("set by the deepspeed launcher; chattune reads LOCAL_RANK from the environment", default=-1)
    ddp_timeout: int | None = _help("HF (seconds); no effect: " + ACCEPTED_NO_OP["ddp_timeout"], default=None)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Every check names its flag (one line, ConfigError) and runs before anything is loaded."""
        def need(cond: bool, flag: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"--{flag} {msg}")

        def choice(flag: str, allowed) -> None:
            need(getattr(self, flag) in allowed, flag, f"must be one of {', '.join(allowed)}, got {getattr(self, flag)!r}")

        def unchanged(flag: str) -> bool:
            f = _FIELDS[flag]
            default = f.default_factory() if f.default is MISSING else f.default
            return getattr(self, flag) == default

        # --- model / data ---
        need(bool(self.model_name_or_path), "model_name_or_path", "is required")
        need(bool(self.data_path), "data_path", "is required")
        need(bool(self.output_dir), "output_dir", "is required")
        _check_model_source("model_name_or_path", self.model_name_or_path)
        if self.tokenizer_name_or_path:
            _check_model_source("tokenizer_name_or_path", self.tokenizer_name_or_path)
        for flag in ("output_dir", "cache_dir"):
            path = getattr(self, flag)
            need(not path or not os.path.exists(path) or os.path.isdir(path), flag, f"{path} exists and is not a directory")
        choice("template", TEMPLATE_NAMES)
        choice("mask", MASKS)
        choice("reasoning", REASONING_POLICIES)
        choice("reasoning_history", REASONING_HISTORY)
        choice("truncation", OVERFLOW_POLICIES)
        choice("on_bad_record", ("error", "skip"))
        choice("data_hash", ("content", "stat"))
        if self.padding_side is not None:
            choice("padding_side", PADDING_SIDES)
        self._check_sources()
        need(self.model_max_length >= 8, "model_max_length", f"must be >= 8, got {self.model_max_length}")
        need(self.preprocessing_num_workers >= 1, "preprocessing_num_workers", "must be >= 1")
        need(self.dataloader_num_workers is None or self.dataloader_num_workers >= 0, "dataloader_num_workers",
             "must be >= 0")
        # FastChat's Yuan2 loss flags are --mask values
        need(not (self.last_response_loss and (self.efficient_loss or self.split_example_loss)), "last_response_loss",
             "(the last reply only) contradicts --efficient_loss / --split_example_loss (every reply)")
        if self.last_response_loss:
            need(self.mask in ("assistant", "last"), "last_response_loss", f"(--mask last) contradicts --mask {self.mask}")
            self.mask = "last"
        for flag in ("efficient_loss", "split_example_loss"):
            need(not getattr(self, flag) or self.mask == "assistant", flag,
                 f"(loss on every reply, --mask assistant) contradicts --mask {self.mask}")

        # --- schedule ---
        need(self.num_train_epochs > 0 or self.max_steps > 0, "num_train_epochs", "must be > 0 (or set --max_steps)")
        need(self.per_device_train_batch_size >= 1, "per_device_train_batch_size", "must be >= 1")
        need(self.per_device_eval_batch_size >= 1, "per_device_eval_batch_size", "must be >= 1")
        need(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
        need(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(0 <= self.adam_beta1 < 1, "adam_beta1", f"must be in [0, 1), got {self.adam_beta1}")
        need(0 <= self.adam_beta2 < 1, "adam_beta2", f"must be in [0, 1), got {self.adam_beta2}")
        need(self.adam_epsilon > 0, "adam_epsilon", f"must be > 0, got {self.adam_epsilon}")
        need(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0")
        need(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32), got {self.seed}")
        if self.lr_scheduler_type in UNSUPPORTED_SCHEDULERS:
            raise ConfigError(f"--lr_scheduler_type {self.lr_scheduler_type} is not supported: "
                              f"{UNSUPPORTED_SCHEDULERS[self.lr_scheduler_type]}; use one of {', '.join(SCHEDULERS)}")
        need(self.lr_scheduler_type in SCHEDULERS, "lr_scheduler_type",
             f"must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler_type!r}")
        self.lr_scheduler_kwargs = _scheduler_kwargs_value(self.lr_scheduler_kwargs)
        try:
            check_scheduler(self)
        except ScheduleError as e:
            raise ConfigError(str(e)) from None
        choice("optim", OPTIMIZERS)
        problem = optimizer_problem(self.optim, fsdp=bool(self.fsdp))
        if problem is not None:
            raise ConfigError(problem)
        need(self.neftune_noise_alpha >= 0, "neftune_noise_alpha", f"must be >= 0 (0: off), got {self.neftune_noise_alpha}")

        # --- precision / memory ---
        try:
            self.bf16 = parse_bf16_flag(self.bf16)
        except PrecisionError as e:
            raise ConfigError(str(e)) from None
        need(not (self.fp16 and self.bf16 != "false"), "fp16", "and --bf16 are alternatives; pass one")

        need(self.memory_gb is None or self.memory_gb > 0, "memory_gb", f"must be > 0, got {self.memory_gb}")
        # --- long rows ---
        need(self.sequence_parallel_size >= 1, "sequence_parallel_size", f"must be >= 1, got {self.sequence_parallel_size}")
        self.rope_scaling = _rope_scaling_value(self.rope_scaling)

        # --- LoRA / QLoRA ---
        if self.q_lora:
            self.lora = True  # QLoRA is LoRA on a quantized base
            need(importlib.util.find_spec("bitsandbytes") is not None, "q_lora", "needs the bitsandbytes package")
        need(self.lora_r >= 1, "lora_r", "must be >= 1")
        need(self.lora_alpha >= 1, "lora_alpha", "must be >= 1")
        need(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
        choice("lora_bias", ("none", "all", "lora_only"))
        bad = [m for m in self.lora_target_modules if not _MODULE_NAME.fullmatch(m)]
        need(not bad, "lora_target_modules", f"{bad} are not module names (e.g. q_proj v_proj, or all-linear)")
        need(self.bits in (4, 8), "bits", f"must be 4 or 8, got {self.bits}")
        need(self.q_lora or self.bits == 4, "bits", "applies to the quantized base of --q_lora True")
        for flag in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_bias", "use_dora",
                     "lora_weight_path"):
            need(self.is_peft or unchanged(flag), flag, "applies to LoRA: pass --lora True (or use train/train_lora.py)")
        need(not (self.use_dora and self.q_lora and self.bits == 8), "use_dora", "is not supported with 8-bit --q_lora")
        if self.lora_weight_path:
            path = os.path.expanduser(self.lora_weight_path)
            need(any(os.path.isfile(os.path.join(path, n)) for n in ADAPTER_FILES), "lora_weight_path",
                 f"{self.lora_weight_path}: no {' or '.join(ADAPTER_FILES)} there")

        # --- eval / save / log ---
        choice("evaluation_strategy", STRATEGIES)
        choice("save_strategy", STRATEGIES)
        need(self.eval_steps >= 1, "eval_steps", "must be >= 1")
        need(self.save_steps >= 1, "save_steps", "must be >= 1")
        need(self.logging_steps >= 1, "logging_steps", "must be >= 1")
        need(self.logging_strategy == "steps", "logging_strategy",
             f"{self.logging_strategy}: chattune logs every --logging_steps steps (and the last step); only 'steps' "
             "is supported")
        need(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit", "must be >= 1")
        need(self.evaluation_strategy == "no" or bool(self.eval_data_path), "eval_data_path",
             "is required when --evaluation_strategy is not 'no'")
        choice("report_to", REPORT_TO)
        for tracker in ("wandb", "tensorboard"):
            need(self.report_to not in (tracker, "all") or importlib.util.find_spec(tracker) is not None, "report_to",
                 f"{self.report_to} needs the {tracker} package (pip install {tracker})")
        resume = self.resume_from_checkpoint
        need(resume is None or str(resume).lower() in ("", "false", "none", "true", "auto")
             or os.path.isdir(os.path.expanduser(str(resume))), "resume_from_checkpoint",
             f"{resume}: no such checkpoint directory (or pass True, or auto)")
        need(self.max_nonfinite_skips >= 0, "max_nonfinite_skips", "must be >= 0")
        choice("save_dtype", ("bf16", "fp16", "fp32"))
        need(not self.save_on_each_node, "save_on_each_node",
             "is not supported: checkpoints and the final model are written once per job into --output_dir (rank 0, "
             "and each rank's shard of a sharded checkpoint), which must be on a filesystem all nodes share")

        # --- sharding / distributed ---
        need(not (self.fsdp and self.deepspeed), "deepspeed", "and --fsdp are alternatives; pass one")
        if self.deepspeed:
            stage = zero_stage(load_ds_config(self.deepspeed))
            need(stage in (0, 1, 2, 3), "deepspeed", f"zero_optimization.stage must be 0-3, got {stage}")
            need(not (self.lora_weight_path and stage == 3), "lora_weight_path",
                 "is not supported with ZeRO-3 (parameters are partitioned while the model is built); use ZeRO-2 "
                 "or --fsdp")
        layer_cls = self.fsdp_transformer_layer_cls_to_wrap
        for flag in ("fsdp_transformer_layer_cls_to_wrap", "fsdp_config"):
            need(not getattr(self, flag) or bool(self.fsdp), flag, "applies to --fsdp; pass --fsdp too")
        bad = [c for c in (layer_cls or "").split(",") if layer_cls and not c.strip().isidentifier()]
        need(not bad, "fsdp_transformer_layer_cls_to_wrap", f"{bad} are not class names (e.g. LlamaDecoderLayer)")
        if self.fsdp:
            try:
                FSDPSettings.from_flags(self.fsdp, layer_cls, self.fsdp_config)
            except ConfigError:
                raise
            except (AttributeError, TypeError, ValueError) as e:
                raise ConfigError(f"--fsdp_config {self.fsdp_config}: {' '.join(str(e).split())}") from None
        need(self.ddp_timeout is None or self.ddp_timeout >= 1, "ddp_timeout", "must be >= 1 (seconds)")
        need(self.num_data is None or self.num_data == -1 or self.num_data >= 1, "num_data",
             f"must be >= 1 (or -1: all), got {self.num_data}")
        if self.num_data is not None and self.num_data >= 1:
            self._apply_num_data()

    def _check_sources(self) -> None:
        """--data_path / --eval_data_path entries parse (PATH[:WEIGHT][:count=N][:template=T][:format=F]) and name
        known templates; whether the files exist is checked when the data is read (before the model is loaded)."""
        for flag in ("data_path", "eval_data_path"):
            try:
                sources = parse_sources(getattr(self, flag), {**training_flags(), "data": f"--{flag}"})
            except ValueError as e:
                raise ConfigError(" ".join(str(e).split())) from None
            for source in sources:
                if source.template is not None and source.template not in TEMPLATE_NAMES:
                    raise ConfigError(f"--{flag} {source.path}: template must be one of {', '.join(TEMPLATE_NAMES)}, "
                                      f"got {source.template!r}")

    def _apply_num_data(self) -> None:
        """FastChat's --num_data N on chattune's data mix: PATH:count=N (consumed, so validation stays idempotent)."""
        (source,) = parse_sources(self.data_path) if len(self.data_path) == 1 else (None,)
        if source is None or source.weight is not None or source.count is not None:
            raise ConfigError(f"--num_data {self.num_data} needs a single --data_path source without a weight or "
                              "count; give each source its own PATH:count=N instead")
        self.data_path = [f"{self.data_path[0]}:count={self.num_data}"]
        self.num_data = None

    @property
    def is_peft(self) -> bool:
        return self.lora or self.q_lora


_FIELDS = {f.name: f for f in fields(TrainConfig)}
ALIASES = {"eval_strategy": "evaluation_strategy"}
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_MODULE_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?")


def _check_model_source(flag: str, value: str) -> None:
    """An HF directory, a .gguf file, asset:NAME or something shaped like a hub id (owner/name); whether a
    hub id exists is known only when it is downloaded."""
    if value.startswith("asset:"):
        name = value.removeprefix("asset:")
        if name not in ASSETS or name.startswith("template:"):
            known = ", ".join(n for n in ASSETS if not n.startswith("template:"))
            raise ConfigError(f"--{flag} {value}: unknown asset {name!r}; known: {known}")
        return
    path = os.path.expanduser(value)
    if os.path.exists(path):
        if not os.path.isdir(path) and not path.endswith(".gguf"):
            raise ConfigError(f"--{flag} {value} is a file but not a .gguf; pass a model directory, a .gguf file or a "
                              "hub id")
        return
    if value.startswith(("/", "./", "../", "~")) or value.endswith(".gguf"):
        raise ConfigError(f"--{flag} {value}: no such file or directory")
    if not _HUB_ID.fullmatch(value) or "--" in value or ".." in value or len(value) > 96:
        raise ConfigError(f"--{flag} {value!r} is neither an existing path nor a hub id (owner/name)")


ROPE_TYPES = ("linear", "dynamic", "yarn", "longrope", "llama3")


def _json_object(flag: str, value, example: str) -> dict:
    """A flag whose value is a JSON object: a string on the command line, a mapping in a config file."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as e:
            raise ConfigError(f"--{flag} {value!r} is not JSON ({e.msg}); pass an object such as '{example}'") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"--{flag} must be a JSON object such as '{example}', got "
                          f"{json.dumps(value) if isinstance(value, list | int | float) else repr(value)}")
    return value


def _rope_scaling_value(value) -> dict:
    """--rope_scaling: {} is off; otherwise a rope type transformers knows and its factor."""
    value = _json_object("rope_scaling", value, '{"rope_type": "yarn", "factor": 4}')
    if not value:
        return {}
    kind = value.get("rope_type", value.get("type"))
    if kind not in ROPE_TYPES:
        raise ConfigError(f"--rope_scaling needs \"rope_type\" in {', '.join(ROPE_TYPES)}, got {kind!r}")
    factor = value.get("factor")
    if kind != "longrope" and (not isinstance(factor, int | float) or isinstance(factor, bool) or factor < 1):
        raise ConfigError(f"--rope_scaling {kind} needs a numeric \"factor\" >= 1, got {factor!r}")
    return {**{k: v for k, v in value.items() if k != "type"}, "rope_type": kind}


def _scheduler_kwargs_value(value) -> dict:
    """--lr_scheduler_kwargs: the schedule's own argument names to values."""
    return _json_object("lr_scheduler_kwargs", value, '{"num_cycles": 1}')


def startup_notes(cfg: TrainConfig, cuda: bool | None = None) -> list[str]:
    """The lines a run prints first: each accepted no-op flag that was given a value, and flags whose effect
    here differs from their name (tf32 without CUDA, paged optimizers without CUDA, --optim under a DeepSpeed
    config with its own optimizer block)."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    passed = getattr(cfg, "passed_flags", frozenset())
    notes = [f"[config] --{flag}: {why}" for flag, why in ACCEPTED_NO_OP.items()
             if getattr(cfg, flag) not in (None, False, 0, "")]
    if cfg.tf32 and not cuda:
        notes.append("[config] --tf32: TF32 applies to CUDA matmuls; there is no CUDA device here")
    if cfg.deepspeed and ("optim" in passed or cfg.optim != "adamw_torch") \
            and "optimizer" in load_ds_config(cfg.deepspeed):
        notes.append(f"[config] --optim {cfg.optim}: the optimizer block of {cfg.deepspeed} is used instead")
    elif (note := optimizer_note(cfg.optim, cuda)) is not None:
        notes.append(note)
    return notes


def _parse_bool(flag: str, value: str) -> bool:
    low = str(value).lower()
    if low in ("true", "1", "yes", "y"):
        return True
    if low in ("false", "0", "no", "n"):
        return False
    raise ConfigError(f"--{flag} expects True or False, got {value!r}")


def _convert(flag: str, hint, value):
    origin = get_origin(hint)
    args = [a for a in get_args(hint) if a is not type(None)]
    if value is None:
        return None
    if hint is bool or (args and args[0] is bool and origin is not list):
        return value if isinstance(value, bool) else _parse_bool(flag, value)
    if origin is dict:
        return _rope_scaling_value(value) if flag == "rope_scaling" else _scheduler_kwargs_value(value)
    if origin is list:
        if isinstance(value, str):
            value = [v for part in value.split(",") for v in [part.strip()] if v] if "," in value else [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"--{flag} expects a list of values, got {value!r}")
        return [str(v) for v in value]
    target = args[0] if args else hint
    if flag == "resume_from_checkpoint":
        return str(value)
    if target in (int, float):
        try:
            if isinstance(value, bool | list | dict):
                raise TypeError
            if target is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                return int(value)
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"--{flag} expects {target.__name__}, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"--{flag} expects a finite number, got {value!r}")
        return number
    if isinstance(value, list | dict):
        raise ConfigError(f"--{flag} expects one value, got {value!r}")
    return str(value)


def parse_args(argv: list[str] | None = None, defaults: dict | None = None) -> TrainConfig:
    """Parse `[config.yaml|json] --flag value ...` into a validated TrainConfig."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    hints = get_type_hints(TrainConfig)
    names = _FIELDS
    values: dict[str, Any] = dict(defaults or {})
    if argv and not argv[0].startswith("--") and argv[0].endswith((".yaml", ".yml", ".json")):
        path = argv.pop(0)
        try:
            from_file = load_mapping(path)
        except ConfigError:
            raise
        except OSError as e:
            raise ConfigError(f"{path}: {e.strerror or e}") from None
        except Exception as e:  # yaml.YAMLError, json.JSONDecodeError: the file's own syntax
            raise ConfigError(f"{path}: not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'}: "
                              f"{' '.join(str(e).split())}") from None
        values.update(from_file)
        given = set(from_file)
    else:
        given = set()
    cli: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected argument {tok!r} (flags look like --name value)")
        name, eq, inline = tok[2:].partition("=")
        name = ALIASES.get(name, name)
        if name in ("h", "help"):
            print(usage())
            raise SystemExit(0)
        vals: list[str] = [inline] if eq else []
        i += 1
        while not eq and i < len(argv) and not argv[i].startswith("--"):
            vals.append(argv[i])
            i += 1
        cli[name] = vals
    for name, vals in cli.items():
        if name in REJECTED:
            raise ConfigError(f"--{name}: {REJECTED[name]}")
        if name not in names:
            close = [n for n in names if name.replace("-", "_") == n]
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise ConfigError(f"unknown flag --{name}{hint}; see --help")
        hint = hints[name]
        if get_origin(hint) is list:
            values[name] = vals
        elif not vals:
            if hint is not bool:
                raise ConfigError(f"--{name} needs a value")
            values[name] = True
        elif len(vals) > 1:
            raise ConfigError(f"--{name} takes one value, got {len(vals)}: {' '.join(vals)}")
        else:
            values[name] = vals[0]
    for name in list(values):
        key = ALIASES.get(name, name)
        if key in REJECTED:
            raise ConfigError(f"--{key}: {REJECTED[key]}")
        if key not in names:
            raise ConfigError(f"unknown setting {name!r} in the config file")
        values[key] = _convert(key, hints[key], values.pop(name))
    cfg = TrainConfig(**values)
    # which flags the user set (config file or command line; not the entry point's defaults): startup_notes
    cfg.passed_flags = frozenset(ALIASES.get(n, n) for n in given | set(cli))
    if cfg.disable_tqdm:
        os.environ[PROGRESS_ENV_VAR] = "1"  # read by every progress bar (data/progress.py)
    return cfg


def usage() -> str:
    lines = ["usage: train/train.py [config.yaml] --flag value ...", ""]
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else ("{}" if f.default_factory is dict else "[]")
        lines.append(f"  --{f.name:<32} {f.metadata.get('help', '')} (default: {default})")
    return "\n".join(lines)


def to_dict(cfg: TrainConfig) -> dict:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}


def run_name(cfg: TrainConfig) -> str:
    return cfg.run_name or os.path.basename(os.path.normpath(cfg.output_dir))
