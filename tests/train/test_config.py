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
    ])
    assert cfg.bf16 and cfg.gradient_checkpointing and cfg.lazy_preprocess
    assert cfg.gradient_accumulation_steps == 16 and cfg.learning_rate == 2e-5 and cfg.lr_scheduler_type == "cosine"
    assert cfg.lora_target_modules == ["q_proj", "v_proj"] and cfg.evaluation_strategy == "no"


@pytest.mark.parametrize("flag,value,message", [
    ("--warmup_ratio", "1.5", "--warmup_ratio must be in [0, 1)"),
    ("--learning_rate", "-1", "--learning_rate must be > 0"),
    ("--per_device_train_batch_size", "0", "--per_device_train_batch_size must be >= 1"),
    ("--template", "vicuna", "--template must be one of"),
    ("--mask", "assistants", "--mask must be one of"),
    ("--bf16", "maybe", "--bf16 expects True or False"),
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
