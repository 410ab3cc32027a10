"""Typed training configuration: FastChat's flags (unchanged spellings) plus chattune's own.

    train/train.py --model_name_or_path M --data_path D --output_dir OUT [--flag value ...]
    train/train.py config.yaml --learning_rate 1e-4     # a YAML/JSON file, then CLI overrides

Every field has help text; every check names the flag it is about, and all checks run before any
model or data is loaded. FastChat/HF flags that chattune does not implement are rejected by name
instead of being silently ignored.
"""

from __future__ import annotations

import math
import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, get_args, get_origin, get_type_hints

from data.samples import REASONING_HISTORY
from data.templates import TEMPLATE_NAMES
from data.tokenize import MASKS, OVERFLOW_POLICIES, REASONING_POLICIES
from train.precision import PrecisionError, parse_bf16_flag
from train.sharding_config import ConfigError, FSDPSettings, load_ds_config, load_mapping, zero_stage

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "sgd", "adafactor", "adamw_bnb_8bit",
              "paged_adamw_8bit", "paged_adamw_32bit")
STRATEGIES = ("no", "steps", "epoch")
REPORT_TO = ("none", "wandb", "tensorboard", "all")

# Flags FastChat scripts pass that chattune accepts but that have no effect here, and why.
ACCEPTED_NO_OP = {
    "lazy_preprocess": "the dataset is tokenized once and cached on disk, which serves the same purpose",
    "tf32": "applied when CUDA is available (torch.backends.cuda.matmul.allow_tf32)",
}
# Flags that exist in FastChat/HF but are not (yet) supported: rejected with the reason.
REJECTED = {
    "half_precision_backend": "not used by chattune's training loop",
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
    lazy_preprocess: bool = _help("FastChat compatibility; accepted, see ACCEPTED_NO_OP", default=False)
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
    optim: str = _help(f"optimizer: {', '.join(OPTIMIZERS)}", default="adamw_torch")
    max_grad_norm: float = _help("gradient clipping norm (0 disables)", default=1.0)
    seed: int = _help("random seed (model init of new heads, data order, dropout)", default=42)
    # --- precision / memory ---
    bf16: str = _help("bf16 autocast where the device computes bf16 natively (a CPU without AVX512-BF16/AMX computes "
                      "in fp32 and says so); 'force' uses bf16 anyway. Master weights stay fp32", default="false")
    fp16: bool = _help("fp16 autocast with dynamic loss scaling, for GPUs without bf16 (T4, V100, RTX 20xx)",
                       default=False)
    tf32: bool = _help("allow TF32 matmuls on CUDA", default=False)
    gradient_checkpointing: bool = _help("recompute activations in backward to save memory", default=False)
    # --- LoRA / QLoRA ---
    lora: bool = _help("train LoRA adapters instead of all weights (train_lora.py sets this)", default=False)
    lora_r: int = _help("LoRA rank", default=8)
    lora_alpha: int = _help("LoRA alpha", default=16)
    lora_dropout: float = _help("LoRA dropout", default=0.05)
    lora_target_modules: list[str] = _help("modules to adapt (default: all linear projections)", default_factory=list)
    lora_bias: str = _help("LoRA bias: none, all or lora_only", default="none")
    use_dora: bool = _help("DoRA (weight-decomposed LoRA)", default=False)
    q_lora: bool = _help("QLoRA: 4-bit NF4 base with double quantization, LoRA on top", default=False)
    bits: int = _help("quantized base bits with --q_lora: 4 or 8", default=4)
    # --- eval / save / log ---
    evaluation_strategy: str = _help("when to evaluate: no, steps, epoch (alias --eval_strategy)", default="no")
    eval_steps: int = _help("evaluate every N steps with --evaluation_strategy steps", default=500)
    save_strategy: str = _help("when to checkpoint: no, steps, epoch", default="steps")
    save_steps: int = _help("checkpoint every N steps with --save_strategy steps", default=500)
    save_total_limit: int | None = _help("keep at most N checkpoints (oldest deleted)", default=None)
    logging_steps: int = _help("log every N steps", default=1)
    report_to: str = _help(f"experiment tracker: {', '.join(REPORT_TO)}", default="none")
    run_name: str | None = _help("run name for the tracker", default=None)
    resume_from_checkpoint: str | None = _help("checkpoint dir; True: the newest complete one in --output_dir (error if "
                                                "none); auto: the newest if there is one, else start fresh", default=None)
    async_save: bool = _help("checkpoint in the background: the step loop waits only for the copy to host memory; the "
                             "write overlaps the next steps (a new save or the end of training waits for it)",
                             default=False)
    max_nonfinite_skips: int = _help("skip up to N steps with a non-finite loss/grad norm before stopping", default=0)
    save_dtype: str = _help("dtype of the final full-model export: bf16 or fp32", default="bf16")
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

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, flag: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"--{flag} {msg}")

        need(bool(self.model_name_or_path), "model_name_or_path", "is required")
        need(bool(self.data_path), "data_path", "is required")
        need(bool(self.output_dir), "output_dir", "is required")
        need(self.template in TEMPLATE_NAMES, "template", f"must be one of {', '.join(TEMPLATE_NAMES)}, got {self.template!r}")
        need(self.mask in MASKS, "mask", f"must be one of {', '.join(MASKS)}, got {self.mask!r}")
        need(self.reasoning in REASONING_POLICIES, "reasoning", f"must be one of {', '.join(REASONING_POLICIES)}, got {self.reasoning!r}")
        need(self.reasoning_history in REASONING_HISTORY, "reasoning_history",
             f"must be one of {', '.join(REASONING_HISTORY)}, got {self.reasoning_history!r}")
        need(self.truncation in OVERFLOW_POLICIES, "truncation", f"must be one of {', '.join(OVERFLOW_POLICIES)}, got {self.truncation!r}")
        need(self.on_bad_record in ("error", "skip"), "on_bad_record", f"must be error or skip, got {self.on_bad_record!r}")
        need(self.model_max_length >= 8, "model_max_length", f"must be >= 8, got {self.model_max_length}")
        need(self.num_train_epochs > 0 or self.max_steps > 0, "num_train_epochs", "must be > 0 (or set --max_steps)")
        need(self.per_device_train_batch_size >= 1, "per_device_train_batch_size", "must be >= 1")
        need(self.per_device_eval_batch_size >= 1, "per_device_eval_batch_size", "must be >= 1")
        need(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
        need(self.learning_rate > 0 and math.isfinite(self.learning_rate), "learning_rate", f"must be > 0, got {self.learning_rate}")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.lr_scheduler_type in SCHEDULERS, "lr_scheduler_type", f"must be one of {', '.join(SCHEDULERS)}")
        need(self.optim in OPTIMIZERS, "optim", f"must be one of {', '.join(OPTIMIZERS)}, got {self.optim!r}")
        need(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0")
        need(self.evaluation_strategy in STRATEGIES, "evaluation_strategy", f"must be one of {', '.join(STRATEGIES)}")
        need(self.save_strategy in STRATEGIES, "save_strategy", f"must be one of {', '.join(STRATEGIES)}")
        need(self.eval_steps >= 1, "eval_steps", "must be >= 1")
        need(self.save_steps >= 1, "save_steps", "must be >= 1")
        need(self.logging_steps >= 1, "logging_steps", "must be >= 1")
        need(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit", "must be >= 1")
        need(self.evaluation_strategy == "no" or bool(self.eval_data_path), "eval_data_path",
             "is required when --evaluation_strategy is not 'no'")
        need(self.report_to in REPORT_TO, "report_to", f"must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}")
        need(self.lora_r >= 1, "lora_r", "must be >= 1")
        need(self.lora_alpha >= 1, "lora_alpha", "must be >= 1")
        need(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
        need(self.lora_bias in ("none", "all", "lora_only"), "lora_bias", "must be none, all or lora_only")
        need(self.data_hash in ("content", "stat"), "data_hash", "must be content or stat")
        need(self.bits in (4, 8), "bits", f"must be 4 or 8, got {self.bits}")
        need(self.save_dtype in ("bf16", "fp16", "fp32"), "save_dtype", "must be bf16, fp16 or fp32")
        try:
            self.bf16 = parse_bf16_flag(self.bf16)
        except PrecisionError as e:
            raise ConfigError(str(e)) from None
        need(not (self.fp16 and self.bf16 != "false"), "fp16", "and --bf16 are alternatives; pass one")
        need(self.max_nonfinite_skips >= 0, "max_nonfinite_skips", "must be >= 0")
        need(self.preprocessing_num_workers >= 1, "preprocessing_num_workers", "must be >= 1")
        if self.q_lora:
            self.lora = True  # QLoRA is LoRA on a quantized base
        need(not (self.fsdp and self.deepspeed), "deepspeed", "and --fsdp are alternatives; pass one")
        if self.deepspeed:
            stage = zero_stage(load_ds_config(self.deepspeed))
            need(stage in (0, 1, 2, 3), "deepspeed", f"zero_optimization.stage must be 0-3, got {stage}")
        if self.fsdp:
            FSDPSettings.from_flags(self.fsdp, self.fsdp_transformer_layer_cls_to_wrap, self.fsdp_config)

        need(not (self.use_dora and self.q_lora and self.bits == 8), "use_dora", "is not supported with 8-bit --q_lora")

    @property
    def is_peft(self) -> bool:
        return self.lora or self.q_lora


ALIASES = {"eval_strategy": "evaluation_strategy"}


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
    if origin is list:
        if isinstance(value, str):
            value = [v for part in value.split(",") for v in [part.strip()] if v] if "," in value else [value]
        return [str(v) for v in value]
    target = args[0] if args else hint
    if flag == "resume_from_checkpoint":
        return str(value)
    try:
        if target is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if target is float:
            return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--{flag} expects {target.__name__}, got {value!r}") from None
    return str(value)


def parse_args(argv: list[str] | None = None, defaults: dict | None = None) -> TrainConfig:
    """Parse `[config.yaml|json] --flag value ...` into a validated TrainConfig."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    hints = get_type_hints(TrainConfig)
    names = {f.name: f for f in fields(TrainConfig)}
    values: dict[str, Any] = dict(defaults or {})
    if argv and not argv[0].startswith("--") and argv[0].endswith((".yaml", ".yml", ".json")):
        values.update(load_mapping(argv.pop(0)))
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
    return TrainConfig(**values)


def usage() -> str:
    lines = ["usage: train/train.py [config.yaml] --flag value ...", ""]
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else "[]"
        lines.append(f"  --{f.name:<32} {f.metadata.get('help', '')} (default: {default})")
    return "\n".join(lines)


def to_dict(cfg: TrainConfig) -> dict:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}


def run_name(cfg: TrainConfig) -> str:
    return cfg.run_name or os.path.basename(os.path.normpath(cfg.output_dir))
