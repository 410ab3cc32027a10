"""Every flag that is accepted works (issue 21, point 4).

* A bad value for ANY flag of TrainConfig is one line naming the flag, exit code 2 (table built from
  `dataclasses.fields(TrainConfig)`: a new flag without an entry fails `test_every_flag_has_a_bad_value_entry`).
* Every `--lr_scheduler_type`, every `--optim`, `--neftune_noise_alpha`, every `--save_dtype` and every
  `--report_to` value trains in-process (`train.train.main`) on one tiny random Llama, and what the flag
  promises is checked: the learning rate of each step against the schedule's closed form, the optimizer
  class that stepped, the dtype in the saved file, the files each tracker wrote.
* FastChat's own flags: honoured or a one-line reason at start (startup_notes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch
from helpers import DEMO
from safetensors.torch import load_file

from train.config import ACCEPTED_NO_OP, ConfigError, TrainConfig, parse_args, startup_notes
from train.optim import OPTIMIZERS, SCHEDULERS

BASE = ["--model_name_or_path", "m", "--data_path", DEMO, "--output_dir", "out"]

# --- a bad value for every flag ------------------------------------------------------------------------
# flag -> the bad value, or a tuple of extra arguments (when the flag is checked together with another)
BAD = {
    "model_name_or_path": "/nonexistent/model", "tokenizer_name_or_path": "/nonexistent/tokenizer",
    "trust_remote_code": "maybe", "flash_attn": "maybe", "cache_dir": DEMO, "padding_side": "middle",
    "data_path": "d.jsonl:count=x", "eval_data_path": "d.jsonl:format=yaml", "template": "vicuna",
    "mask": "assistants", "truncation": "cut", "on_bad_record": "ignore", "merge_consecutive": "maybe",
    "drop_leading_assistant": "maybe", "allow_undeclared_tools": "maybe", "reasoning": "think",
    "reasoning_history": "all", "model_max_length": "4", "packing": "maybe", "group_by_length": "maybe",
    "preprocessing_num_workers": "0", "data_cache_shared": "maybe", "data_hash": "sha256",
    "lazy_preprocess": "maybe", "num_data": "0", "last_response_loss": "maybe", "efficient_loss": "maybe",
    "split_example_loss": "maybe", "dataloader_num_workers": "-1", "output_dir": DEMO, "num_train_epochs": "inf",
    "max_steps": "1.5", "per_device_train_batch_size": "0", "per_device_eval_batch_size": "0",
    "gradient_accumulation_steps": "two", "learning_rate": "-1", "weight_decay": "-0.1", "adam_beta1": "1.5",
    "adam_beta2": "1", "adam_epsilon": "0", "warmup_ratio": "1.5", "warmup_steps": "-1",
    "lr_scheduler_type": "cosinus", "lr_scheduler_kwargs": "{num_cycles: 1}", "optim": "adam",
    "max_grad_norm": "-1", "seed": "x", "bf16": "maybe", "fp16": "maybe", "tf32": "maybe",
    "gradient_checkpointing": "maybe", "neftune_noise_alpha": "-5", "lora": "maybe", "lora_r": "0",
    "lora_alpha": "0", "lora_dropout": "1", "lora_target_modules": "q proj", "lora_bias": "some",
    "use_dora": "maybe", "lora_weight_path": ("--lora", "True", "--lora_weight_path", "/nonexistent/adapter"),
    "q_lora": "maybe", "bits": "3", "evaluation_strategy": "sometimes", "eval_steps": "0",
    "save_strategy": "sometimes", "save_steps": "0", "save_total_limit": "0", "logging_steps": "0",
    "logging_strategy": "epoch", "disable_tqdm": "maybe", "report_to": "mlflow",
    "resume_from_checkpoint": "/nonexistent/checkpoint-3", "async_save": "maybe", "max_nonfinite_skips": "-1",
    "save_dtype": "int8", "save_on_each_node": "True", "fsdp": "full_shard wrap_all",
    "fsdp_transformer_layer_cls_to_wrap": ("--fsdp", "full_shard auto_wrap", "--fsdp_transformer_layer_cls_to_wrap",
                                           "Llama Layer"),
    "fsdp_config": ("--fsdp", "full_shard auto_wrap", "--fsdp_config", "/nonexistent/fsdp.yaml"),
    "deepspeed": "nope.json", "local_rank": "x", "ddp_timeout": "0",
    "sequence_parallel_size": "0", "tiled_mlp": "maybe", "activation_offloading": "maybe", "auto_fit": "maybe",
    "memory_gb": "0",
    "rope_scaling": '{"rope_type": "ntk", "factor": 2}', "torch_compile": "maybe",
}
# free-form strings for which no value is wrong, and why
FREE_FORM = {
    "run_name": "any text names the run in the tracker",
    "preprocessed_path": "never read (an accepted no-op: chattune caches the tokenized data itself)",
}


def _main(argv: list[str], capsys) -> tuple[int, str]:
    from train.train import main

    rc = main(argv)
    return rc, capsys.readouterr().err


def test_every_flag_has_a_bad_value_entry():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert not set(BAD) & set(FREE_FORM)
    assert set(BAD) | set(FREE_FORM) == names, (
        f"flags without a bad-value entry: {sorted(names - set(BAD) - set(FREE_FORM))}; "
        f"entries for no flag: {sorted(set(BAD) | set(FREE_FORM) - names)}")


@pytest.mark.parametrize("flag", sorted(BAD))
def test_a_bad_value_is_one_line_naming_the_flag(flag, capsys, tmp_path):
    bad = BAD[flag]
    extra = list(bad) if isinstance(bad, tuple) else [f"--{flag}", bad]
    rc, err = _main(BASE[:-1] + [str(tmp_path / "out")] + extra, capsys)
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith(f"error: --{flag}"), err


UNSUPPORTED = [
    (["--push_to_hub", "True"], "error: --push_to_hub: chattune does not upload"),
    (["--learnin_rate", "1"], "error: unknown flag --learnin_rate"),
    (["--lr_scheduler_type", "reduce_lr_on_plateau"], "error: --lr_scheduler_type reduce_lr_on_plateau is not supported"),
    (["--lr_scheduler_type", "cosine_with_min_lr"], "error: --lr_scheduler_type cosine_with_min_lr needs --lr_scheduler_kwargs"),
    (["--lr_scheduler_type", "cosine", "--lr_scheduler_kwargs", '{"min_lr": 1}'],
     "error: --lr_scheduler_kwargs: unknown key(s) ['min_lr'] for --lr_scheduler_type cosine; it takes num_cycles"),
    (["--lr_scheduler_type", "constant", "--lr_scheduler_kwargs", '{"num_cycles": 1}'],
     "error: --lr_scheduler_kwargs: unknown key(s) ['num_cycles'] for --lr_scheduler_type constant; it takes none"),
    (["--lr_scheduler_type", "warmup_stable_decay", "--lr_scheduler_kwargs", '{"decay_type": "step"}'],
     "error: --lr_scheduler_type warmup_stable_decay --lr_scheduler_kwargs"),
    (["--lr_scheduler_type", "warmup_stable_decay", "--max_steps", "10", "--lr_scheduler_kwargs", '{"num_decay_steps": 20}'],
     "error: --lr_scheduler_type warmup_stable_decay --lr_scheduler_kwargs"),
    (["--lr_scheduler_type", "polynomial", "--lr_scheduler_kwargs", '{"lr_end": 0.1}'],
     "error: --lr_scheduler_type polynomial --lr_scheduler_kwargs"),
    (["--lr_scheduler_type", "cosine", "--lr_scheduler_kwargs", '{"num_cycles": "half"}'],
     "error: --lr_scheduler_type cosine --lr_scheduler_kwargs"),
    (["--lr_scheduler_kwargs", '{"num_warmup_steps": 5}'], "error: --lr_scheduler_kwargs: 'num_warmup_steps' cannot"),
    (["--lr_scheduler_kwargs", "[1, 2]"], "error: --lr_scheduler_kwargs must be a JSON object"),
    (["--lr_scheduler_type", "polynomial", "--max_steps", "2", "--warmup_steps", "2"],
     "error: --lr_scheduler_type polynomial: the learning-rate factor at step 2"),
    (["--optim", "adafactor", "--fsdp", "full_shard auto_wrap"], "error: --optim adafactor cannot be used with --fsdp"),
    (["--optim", "adamw_torch_fused", "--fsdp", "full_shard auto_wrap"],
     "error: --optim adamw_torch_fused cannot be used with --fsdp"),
    (["--optim", "paged_adamw_8bit", "--fsdp", "full_shard auto_wrap"],
     "error: --optim paged_adamw_8bit cannot be used with --fsdp"),
    (["--lora_r", "16"], "error: --lora_r applies to LoRA: pass --lora True"),
    (["--bits", "8"], "error: --bits applies to the quantized base of --q_lora True"),
    (["--last_response_loss", "True", "--mask", "all"], "error: --last_response_loss (--mask last) contradicts --mask all"),
    (["--num_data", "5", "--data_path", f"{DEMO}:2"], "error: --num_data 5 needs a single --data_path source"),
    (["--lora", "True", "--lora_weight_path", "ADAPTER", "--deepspeed", "ds_configs/zero3.json"],
     "error: --lora_weight_path is not supported with ZeRO-3"),
    (["CONFIG=missing.yaml"], "error: TMP/missing.yaml: No such file"),
    (["CONFIG=broken.yaml"], "error: TMP/broken.yaml: not valid YAML"),
]


@pytest.mark.parametrize("argv,start", UNSUPPORTED, ids=[f"{i}-{a[0].lstrip('-')}" for i, (a, _) in enumerate(UNSUPPORTED)])
def test_unsupported_values_and_combinations_are_one_line(argv, start, capsys, tmp_path):
    (tmp_path / "broken.yaml").write_text("learning_rate: [1,\n")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    argv = [a.replace("ADAPTER", str(tmp_path / "adapter")) for a in argv]
    if argv[0].startswith("CONFIG="):
        argv = [str(tmp_path / argv[0].removeprefix("CONFIG="))] + BASE
    else:
        argv = BASE + argv
    rc, err = _main(argv, capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith(start.replace("TMP", str(tmp_path))), err


# --- accepted flags: parsed, honoured or announced --------------------------------------------------------
def test_lr_scheduler_kwargs_from_cli_and_config_file(tmp_path):
    cli = parse_args(BASE + ["--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr": 1e-6}'])
    assert cli.lr_scheduler_kwargs == {"min_lr": 1e-6}
    path = tmp_path / "run.yaml"
    path.write_text(f"model_name_or_path: m\ndata_path: {DEMO}\noutput_dir: out\nlr_scheduler_type: warmup_stable_decay\n"
                    "lr_scheduler_kwargs:\n  num_decay_steps: 3\n  decay_type: linear\n")
    assert parse_args([str(path)]).lr_scheduler_kwargs == {"num_decay_steps": 3, "decay_type": "linear"}
    path.write_text(f"model_name_or_path: m\ndata_path: {DEMO}\noutput_dir: out\nlr_scheduler_kwargs: [1]\n")
    with pytest.raises(ConfigError, match="--lr_scheduler_kwargs must be a JSON object"):
        parse_args([str(path)])


def test_fastchat_data_and_loss_flags_are_honoured():
    cfg = parse_args(BASE + ["--num_data", "7", "--last_response_loss", "True"])
    assert cfg.data_path == [f"{DEMO}:count=7"] and cfg.mask == "last" and cfg.num_data is None
    assert parse_args(BASE + ["--num_data", "-1"]).data_path == [DEMO]  # FastChat's "all"
    assert parse_args(BASE + ["--efficient_loss", "True"]).mask == "assistant"
    with pytest.raises(ConfigError, match="--efficient_loss .* contradicts --mask last"):
        parse_args(BASE + ["--efficient_loss", "True", "--mask", "last"])


def test_disable_tqdm_hides_the_progress_bar(monkeypatch):
    monkeypatch.delenv("CHATTUNE_NO_PROGRESS", raising=False)
    parse_args(BASE)
    assert "CHATTUNE_NO_PROGRESS" not in os.environ
    parse_args(BASE + ["--disable_tqdm", "True"])
    assert os.environ["CHATTUNE_NO_PROGRESS"] == "1"


def test_startup_notes_name_every_no_op_flag_that_was_given(tmp_path):
    assert startup_notes(parse_args(BASE), cuda=False) == []
    values = {"lazy_preprocess": "True", "preprocessed_path": "p.json", "padding_side": "left", "efficient_loss": "True",
              "split_example_loss": "True", "dataloader_num_workers": "4", "ddp_timeout": "7200"}
    assert set(values) == set(ACCEPTED_NO_OP)  # every no-op flag is exercised here
    notes = startup_notes(parse_args(BASE + [x for k, v in values.items() for x in (f"--{k}", v)]), cuda=False)
    assert notes == [f"[config] --{flag}: {why}" for flag, why in ACCEPTED_NO_OP.items()]
    # values equal to a falsy default are not announced (HF's --dataloader_num_workers 0 is what chattune does)
    assert startup_notes(parse_args(BASE + ["--dataloader_num_workers", "0"]), cuda=False) == []
    assert startup_notes(parse_args(BASE + ["--tf32", "True"]), cuda=False) == [
        "[config] --tf32: TF32 applies to CUDA matmuls; there is no CUDA device here"]
    assert startup_notes(parse_args(BASE + ["--tf32", "True"]), cuda=True) == []
    (paged,) = startup_notes(parse_args(BASE + ["--optim", "paged_adamw_32bit"]), cuda=False)
    assert paged.startswith("[config] --optim paged_adamw_32bit: paging") and "unpaged" in paged
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {}}}))
    assert startup_notes(parse_args(BASE + ["--deepspeed", str(ds), "--optim", "adamw_torch"]), cuda=False) == [
        f"[config] --optim adamw_torch: the optimizer block of {ds} is used instead"]
    assert startup_notes(parse_args(BASE + ["--deepspeed", str(ds)]), cuda=False) == []  # --optim not given


# --- model setup: NEFTune and --lora_weight_path --------------------------------------------------------
def _build(tiny_llama, tmp_path, **flags):
    from train.distributed import DistInfo
    from train.model_setup import build_model

    cfg = TrainConfig(model_name_or_path=tiny_llama, data_path=[DEMO], output_dir=str(tmp_path), **flags)
    return build_model(cfg, DistInfo(0, 1, 0, torch.device("cpu")))


def test_neftune_noise_in_training_only_with_the_right_magnitude(tiny_llama, tmp_path):
    alpha, length = 5.0, 16
    model = _build(tiny_llama, tmp_path, neftune_noise_alpha=alpha)
    emb = model.get_input_embeddings()
    ids = torch.randint(0, emb.num_embeddings, (2, length))
    plain = torch.nn.functional.embedding(ids, emb.weight).detach()
    bound = alpha / math.sqrt(length * emb.embedding_dim)  # HF Trainer's alpha / sqrt(L * d)
    model.train()
    noise = emb(ids).detach() - plain
    assert noise.abs().max() <= bound * (1 + 1e-5) and noise.abs().max() > 0.95 * bound
    assert abs(noise.abs().mean() / bound - 0.5) < 0.05  # uniform on [-bound, bound]: E|x| = bound / 2
    assert not torch.equal(emb(ids), emb(ids))  # fresh noise every forward
    train_logits = model(input_ids=ids).logits
    model.eval()
    torch.testing.assert_close(emb(ids), plain, rtol=0, atol=0)
    eval_logits = model(input_ids=ids).logits
    torch.testing.assert_close(model(input_ids=ids).logits, eval_logits, rtol=0, atol=0)
    assert (train_logits - eval_logits).abs().max() > 1e-3  # the hook sits on the embedding the model uses


def test_lora_weight_path_starts_from_the_saved_adapter(tiny_llama, tmp_path):
    model = _build(tiny_llama, tmp_path, lora=True, lora_r=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_()
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    model.save_pretrained(tmp_path / "adapter")
    again = _build(tiny_llama, tmp_path, lora=True, lora_r=4, lora_weight_path=str(tmp_path / "adapter"))
    loaded = {n: p.detach() for n, p in again.named_parameters() if "lora_" in n}
    assert loaded.keys() == saved.keys()
    for name in saved:
        torch.testing.assert_close(loaded[name], saved[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^--lora_weight_path .*: its tensors do not fit this LoRA \(--lora_r 8"):
        _build(tiny_llama, tmp_path, lora=True, lora_r=8, lora_weight_path=str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match=r"^--lora_weight_path .*tensor\(s\) this LoRA does not have"):
        _build(tiny_llama, tmp_path, lora=True, lora_r=4, lora_target_modules=["q_proj", "v_proj"],
               lora_weight_path=str(tmp_path / "adapter"))


# --- one short training run per flag value --------------------------------------------------------------
LR, STEPS = 0.1, 5  # SGD at 0.1 with clipping: stable; 0.1 survives metrics.jsonl's 6-decimal rounding


def _cos(p: float, cycles: float = 0.5) -> float:
    return 0.5 * (1 + math.cos(math.pi * 2 * cycles * p))


def _progress(s: int) -> float:  # warmup 1 of 5 steps
    return (s - 1) / (STEPS - 1)


# the logged lr after step s (s = 1..5) is LR * factor(s), by each schedule's closed form
SCHEDULE_CASES = {
    "linear": ({}, [], lambda s: 1 - _progress(s)),
    "cosine": ({}, [], lambda s: _cos(_progress(s))),
    "cosine_with_restarts": ({"num_cycles": 2}, [], lambda s: 0.0 if s == STEPS else _cos((2 * _progress(s)) % 1)),
    "polynomial": ({"lr_end": 0.01, "power": 2}, [], lambda s: 0.9 * (1 - _progress(s)) ** 2 + 0.1),
    "constant": ({}, [], lambda s: 1.0),
    "constant_with_warmup": ({}, ["--warmup_steps", "2"], lambda s: min(1.0, s / 2)),
    "inverse_sqrt": ({"timescale": 2}, [], lambda s: 1 / math.sqrt((s + 1) / 2)),
    "cosine_with_min_lr": ({"min_lr_rate": 0.1}, [], lambda s: 0.1 + 0.9 * _cos(_progress(s))),
    "cosine_warmup_with_min_lr": ({"min_lr": 0.01}, [], lambda s: 0.1 + 0.9 * _cos(s / (STEPS - 1))),
    "warmup_stable_decay": ({}, [], lambda s: 0.0 if s == STEPS else 1.0),  # default decay: 10% of 5 -> 1 step
    "warmup_stable_decay-kwargs": ({"num_decay_steps": 2, "decay_type": "linear", "min_lr_ratio": 0.1}, [],
                                   lambda s: {4: 0.55, 5: 0.1}.get(s, 1.0)),
}


# the class that stepped, and how its state is stored
OPTIMIZER_CLASSES = {"adamw_torch": "AdamW", "adamw_hf": "AdamW", "adamw_torch_fused": "AdamW", "sgd": "SGD",
                     "adafactor": "Adafactor", "adamw_bnb_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit",
                     "paged_adamw_32bit": "PagedAdamW32bit"}


def _spy_on_steps(monkeypatch) -> list[dict]:
    """Record every optimizer step: class, fused flag, state dtypes (patched on the optimizer classes, so it
    does not depend on how train.py builds its optimizer)."""
    import bitsandbytes as bnb
    from transformers.optimization import Adafactor

    calls: list[dict] = []
    classes = [torch.optim.AdamW, torch.optim.SGD, Adafactor, bnb.optim.AdamW8bit, bnb.optim.PagedAdamW8bit,
               bnb.optim.PagedAdamW32bit]
    for cls in classes:
        original = cls.step

        def step(self, *args, _original=original, **kwargs):
            result = _original(self, *args, **kwargs)
            dtypes = {v.dtype for st in self.state.values() for k, v in st.items()
                      if torch.is_tensor(v) and k in ("state1", "state2", "exp_avg", "exp_avg_sq")}
            calls.append({"cls": type(self).__name__, "fused": self.defaults.get("fused"), "state": dtypes})
            return result

        monkeypatch.setattr(cls, "step", step)
    return calls


@pytest.fixture(scope="module")
def run_training(tiny_llama, tmp_path_factory):
    """Train in-process with the shared tiny model and the demo data; returns (rc, output dir). Runs with the
    same flags are made once (the default-flag run serves several tests); `run_training.optimizer_steps[out]`
    holds the optimizer steps of the run that wrote `out`."""
    from train.train import main

    root = tmp_path_factory.mktemp("flags")
    done: dict = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHATTUNE_NO_PROGRESS", "1")
        calls = _spy_on_steps(patch)

        def train(*extra: str, steps: int = 2) -> tuple[int, object]:
            key = (steps, *extra)
            if key not in done:
                out = root / f"run{len(done)}"
                argv = ["--model_name_or_path", tiny_llama, "--data_path", DEMO, "--output_dir", str(out), "--template",
                        "chatml", "--model_max_length", "96", "--per_device_train_batch_size", "2", "--max_steps",
                        str(steps), "--logging_steps", "1", "--save_strategy", "no", "--seed", "3", *extra]
                calls.clear()
                done[key] = (main(argv), out)
                train.optimizer_steps[out] = list(calls)
            return done[key]

        train.optimizer_steps = {}
        yield train


def _metrics(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_schedule_cases_cover_every_scheduler():
    assert {name.split("-")[0] for name in SCHEDULE_CASES} == set(SCHEDULERS)


@pytest.mark.parametrize("case", sorted(SCHEDULE_CASES))
def test_every_lr_scheduler_type_follows_its_schedule(case, run_training):
    kwargs, extra, factor = SCHEDULE_CASES[case]
    name = case.split("-")[0]
    args = ["--lr_scheduler_type", name, "--optim", "sgd", "--learning_rate", str(LR), "--warmup_steps", "1", *extra]
    if kwargs:
        args += ["--lr_scheduler_kwargs", json.dumps(kwargs)]
    rc, out = run_training(*args, steps=STEPS)
    assert rc == 0
    logged = [(r["step"], r["lr"]) for r in _metrics(out) if "lr" in r]
    expected = [(s, LR * factor(s)) for s in range(1, STEPS + 1)]
    assert [s for s, _ in logged] == [s for s, _ in expected]
    for (step, lr), (_, want) in zip(logged, expected):
        assert lr == pytest.approx(want, abs=2e-6), (case, step, logged, expected)


def _optim_args(optim: str) -> tuple[str, ...]:
    return "--optim", optim, "--learning_rate", "1e-3", "--save_dtype", "fp32"


def test_optimizer_cases_cover_every_optim():
    assert set(OPTIMIZER_CLASSES) == set(OPTIMIZERS)


@pytest.mark.parametrize("optim", OPTIMIZERS)
def test_every_optim_runs_and_is_the_optimizer_that_steps(optim, run_training, tiny_llama):
    rc, out = run_training(*_optim_args(optim))
    assert rc == 0
    calls = run_training.optimizer_steps[out]
    assert [c["cls"] for c in calls] == [OPTIMIZER_CLASSES[optim]] * 2
    if optim in ("adamw_torch", "adamw_torch_fused"):
        assert calls[0]["fused"] is True  # the fused kernel exists for CPU
    if optim.endswith("_8bit"):
        assert torch.uint8 in calls[-1]["state"]  # really 8-bit optimizer state (fp32 for tensors under 4096 values)
    assert all(math.isfinite(r["loss"]) for r in _metrics(out) if "loss" in r)
    before, after = load_file(os.path.join(tiny_llama, "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before.keys() & after.keys())  # it updated the weights


def test_neftune_noise_alpha_changes_training_loss(run_training):
    rc, plain = run_training()  # the flags' defaults
    rc2, noisy = run_training("--neftune_noise_alpha", "15")
    assert rc == rc2 == 0
    a = {r["step"]: r["loss"] for r in _metrics(plain) if "loss" in r}
    b = {r["step"]: r["loss"] for r in _metrics(noisy) if "loss" in r}
    assert a.keys() == b.keys() == {1, 2}
    assert a[1] != b[1] and all(math.isfinite(v) for v in b.values())  # same weights and batch: only the noise differs


@pytest.mark.parametrize("save_dtype,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_every_save_dtype_is_the_saved_files_dtype(save_dtype, dtype, run_training):
    # bf16 is the default (the default-flag run), fp32 the optimizer runs' setting: shared runs
    extra = {"bf16": (), "fp16": ("--save_dtype", "fp16"), "fp32": _optim_args("adamw_torch")}[save_dtype]
    rc, out = run_training(*extra)
    assert rc == 0
    weights = load_file(str(out / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {dtype}
    assert json.loads((out / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("report_to", ["none", "tensorboard", "wandb", "all"])
def test_every_report_to_writes_its_tracker(report_to, run_training, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    rc, out = run_training(*(() if report_to == "none" else ("--report_to", report_to)))
    assert rc == 0
    events = list((out / "runs").glob("events.out.tfevents.*")) if (out / "runs").exists() else []
    wandb_runs = list((out / "wandb").glob("offline-run-*/run-*.wandb")) if (out / "wandb").exists() else []
    assert bool(events) == (report_to in ("tensorboard", "all"))
    assert bool(wandb_runs) == (report_to in ("wandb", "all"))
    assert all(f.stat().st_size > 0 for f in events + wandb_runs)  # the tracker wrote something
    assert len(_metrics(out)) >= 1  # metrics.jsonl is written whatever the tracker
