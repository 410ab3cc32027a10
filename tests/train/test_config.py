"""Flags: FastChat spellings accepted, bad values fail naming the flag, unsupported flags refused."""

from __future__ import annotations

import pytest

from train.config import ConfigError, parse_args

BASE = ["--model_name_or_path", "m", "--data_path", "d.jsonl", "--output_dir", "out"]


def test_fastchat_flags_parse():
    cfg = parse_args(BASE + [
        "--bf16", "True", "--tf32", "True", "--num_train_epochs", "3", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "16", "--eval_strategy", "no", "--save_strategy", "steps", "--save_steps", "1200",
        "--save_total_limit", "10", "--learning_rate", "2e-5", "--weight_decay", "0.", "--warmup_ratio", "0.03",
        "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--model_max_length", "2048",
        "--gradient_checkpointing", "True", "--lazy_preprocess", "True", "--lora_target_modules", "q_proj", "v_proj",
    ], defaults={"lora": True})  # as train/train_lora.py: LoRA flags without LoRA are refused
    assert cfg.bf16 and cfg.gradient_checkpointing and cfg.lazy_preprocess
    assert cfg.gradient_accumulation_steps == 16 and cfg.learning_rate == 2e-5 and cfg.lr_scheduler_type == "cosine"
    assert cfg.lora_target_modules == ["q_proj", "v_proj"] and cfg.evaluation_strategy == "no"


@pytest.mark.parametrize("flag,value,message", [
    ("--warmup_ratio", "1.5", "--warmup_ratio must be in [0, 1)"),
    ("--learning_rate", "-1", "--learning_rate must be > 0"),
    ("--per_device_train_batch_size", "0", "--per_device_train_batch_size must be >= 1"),
    ("--template", "vicuna", "--template must be one of"),
    ("--mask", "assistants", "--mask must be one of"),
    ("--bf16", "maybe", "--bf16 expects True, False or force"),
    ("--lr_scheduler_type", "cosinus", "--lr_scheduler_type must be one of"),
    ("--bits", "3", "--bits must be 4 or 8"),
    ("--gradient_accumulation_steps", "two", "--gradient_accumulation_steps expects int"),
    ("--fsdp", "full_shard wrap_all", "--fsdp: unknown option(s) ['wrap_all']"),
    ("--deepspeed", "nope.json", "--deepspeed nope.json: no such file"),
    ("--learnin_rate", "1", "unknown flag --learnin_rate"),
])
def test_bad_values_name_the_flag(flag, value, message):
    with pytest.raises(ConfigError) as err:
        parse_args(BASE + [flag, value])
    assert message in str(err.value)


def test_required_flags_and_eval_dependency():
    with pytest.raises(ConfigError, match="--output_dir is required"):
        parse_args(["--model_name_or_path", "m", "--data_path", "d"])
    with pytest.raises(ConfigError, match="--eval_data_path is required"):
        parse_args(BASE + ["--evaluation_strategy", "steps"])


def test_yaml_config_with_cli_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model_name_or_path: m\ndata_path: [a.jsonl, b.jsonl]\noutput_dir: out\nlearning_rate: 1.0e-4\n"
                    "lora: true\neval_strategy: 'no'\n")
    cfg = parse_args([str(path), "--learning_rate", "3e-4"])
    assert cfg.data_path == ["a.jsonl", "b.jsonl"] and cfg.learning_rate == 3e-4 and cfg.lora
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: m\nlearning_rat: 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'learning_rat'"):
        parse_args([str(bad)])


def test_q_lora_implies_lora():
    cfg = parse_args(BASE + ["--q_lora", "True"])
    assert cfg.lora and cfg.is_peft


def test_sharding_flag_combinations_are_checked(tmp_path):
    assert parse_args(BASE + ["--deepspeed", "ds_configs/zero3.json", "--q_lora", "True"]).q_lora  # tested e2e
    with pytest.raises(ConfigError, match="--deepspeed and --fsdp are alternatives"):
        parse_args(BASE + ["--deepspeed", "ds_configs/zero2.json", "--fsdp", "full_shard auto_wrap"])
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 2},\n "bf16": }')
    with pytest.raises(ConfigError, match=r"ds.json:2: malformed JSON"):
        parse_args(BASE + ["--deepspeed", str(bad)])
    assert parse_args(BASE + ["--deepspeed", "ds_configs/zero2.json", "--q_lora", "True", "--local_rank=1"]).q_lora


def test_deepspeed_auto_values_come_from_flags():
    from train.sharding_config import DeepSpeedConfigError, fill_auto, load_ds_config

    cfg = parse_args(BASE + ["--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "5",
                             "--max_grad_norm", "0.7", "--bf16", "True"])
    filled = fill_auto(load_ds_config("ds_configs/zero3_offload.json"), cfg, world_size=4, hidden_size=64,
                       precision="bf16")
    assert filled["train_micro_batch_size_per_gpu"] == 3 and filled["gradient_accumulation_steps"] == 5
    assert filled["train_batch_size"] == 60 and filled["gradient_clipping"] == 0.7 and filled["bf16"]["enabled"] is True
    assert filled["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    # gathered parameters kept alive: about two decoder layers, not DeepSpeed's 1e9 (a whole small model)
    assert filled["zero_optimization"]["stage3_max_live_parameters"] == 24 * 64 * 64
    with pytest.raises(DeepSpeedConfigError, match="gradient_accumulation_steps=2 contradicts the flags"):
        fill_auto({"gradient_accumulation_steps": 2}, cfg, world_size=1, hidden_size=64)


@pytest.mark.parametrize("name", ["zero2", "zero2_offload", "zero3", "zero3_offload"])
def test_shipped_deepspeed_configs_have_bf16_and_auto_values(name):
    import json
    from pathlib import Path

    data = json.loads((Path(__file__).resolve().parents[2] / "ds_configs" / f"{name}.json").read_text())
    assert data["bf16"] == {"enabled": "auto"} and data["train_micro_batch_size_per_gpu"] == "auto"
    assert data["zero_optimization"]["stage"] == (3 if "zero3" in name else 2)
    assert ("offload_optimizer" in data["zero_optimization"]) == ("offload" in name)


def test_deepspeed_json_scheduler_block_is_refused_optimizer_block_is_used(tmp_path):
    """Never two LR schedules (ours and the JSON's) on one optimizer; the JSON's optimizer replaces --optim."""
    import json

    from train.sharding_config import fill_auto

    base = json.loads(open("ds_configs/zero2.json").read())
    with_sched = tmp_path / "sched.json"
    with_sched.write_text(json.dumps({**base, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}}))
    with pytest.raises(ConfigError, match=r'sched.json: its "scheduler" block would run alongside'):
        parse_args(BASE + ["--deepspeed", str(with_sched)])
    auto_sched = tmp_path / "auto.json"
    auto_sched.write_text(json.dumps({**base, "scheduler": "auto"}))
    assert "scheduler" not in fill_auto(json.loads(auto_sched.read_text()), parse_args(BASE), 1, 64)
    with_optim = tmp_path / "optim.json"
    with_optim.write_text(json.dumps({**base, "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto"}}}))
    cfg = parse_args(BASE + ["--deepspeed", str(with_optim), "--learning_rate", "3e-4", "--adam_beta2", "0.95"])
    filled = fill_auto(json.loads(with_optim.read_text()), cfg, 1, 64)
    assert filled["optimizer"]["params"]["lr"] == 3e-4 and filled["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert "zero_allow_untested_optimizer" not in filled  # DeepSpeed builds that optimizer; ours is not passed


def test_deepspeed_bf16_discards_non_finite_steps():
    from train.sharding_config import fill_auto, load_ds_config

    filled = fill_auto(load_ds_config("ds_configs/zero3.json"), parse_args(BASE + ["--bf16", "True"]), 2, 64, "bf16")
    assert filled["bf16"] == {"enabled": True, "check_grad_overflow": True} and filled["fp16"] == {"enabled": False}
    filled = fill_auto(load_ds_config("ds_configs/zero3.json"), parse_args(BASE + ["--fp16", "True"]), 2, 64, "fp16")
    assert filled["bf16"] == {"enabled": False}
    assert filled["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}  # dynamic loss scaling


def test_max_nonfinite_skips_is_accepted_with_deepspeed():
    cfg = parse_args(BASE + ["--deepspeed", "ds_configs/zero2.json", "--max_nonfinite_skips", "2"])
    assert cfg.max_nonfinite_skips == 2
