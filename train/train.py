"""chattune training recipe. Reads top to bottom:
args → distributed init → tokenizer/model → data → optimizer/schedule → train → export.

    torchrun --nproc_per_node=N train/train.py --model_name_or_path M --data_path D --output_dir OUT ...
"""

from __future__ import annotations

import math
import os
import sys

if __package__ in (None, ""):  # run as a script (torchrun train/train.py): import from the repo root
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from data.dataset import DataBuildError, DataConfig, build_dataset, lengths_of  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402
from data.validate import DataError, ValidationOptions  # noqa: E402
from train.backend_select import make_backend  # noqa: E402
from train.checkpoint import Checkpointer, check_resumable, lengths_fingerprint, resolve_resume  # noqa: E402
from train.collate import collate_packed, collate_padded  # noqa: E402
from train.config import ConfigError, TrainConfig, parse_args, startup_notes  # noqa: E402
from train.distributed import cleanup, init_distributed, print0  # noqa: E402
from train.export import export_model  # noqa: E402
from train.fast_exit import exit_fast  # noqa: E402
from train.host_memory import return_large_frees_to_os  # noqa: E402
from train.loop import (  # noqa: E402
    LoopState,
    NonFiniteError,
    TrainingInterrupted,
    evaluate,
    install_signal_handlers,
    train_loop,
)
from train.model_setup import build_model, model_config  # noqa: E402
from train.optim import make_optimizer, make_scheduler  # noqa: E402
from train.plan import first_step_check, plan_run  # noqa: E402
from train.precision import resolve_precision  # noqa: E402
from train.sampler import MicroBatchStream, PlanConfig, rescale_sampler_state, units_consumed  # noqa: E402
from train.sequence_parallel import check_heads, init_sequence_parallel, shard_batch  # noqa: E402
from train.tracking import Tracker  # noqa: E402


def run(cfg: TrainConfig) -> int:
    return_large_frees_to_os()  # per-layer gathers (FSDP2, ZeRO-3) must not pile up in the heap
    info = init_distributed(need_process_group=bool(cfg.fsdp))
    try:
        torch.manual_seed(cfg.seed)
        precision = resolve_precision(cfg.bf16, cfg.fp16, info.device)
        if precision.note:
            print0(precision.note)
        if cfg.tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        for line in startup_notes(cfg):
            print0(line)
        # memory: sized (--auto_fit) and planned before anything is loaded; every rank computes the same plan
        cfg, planned = plan_run(cfg, info)

        # tokenizer and data first: a bad dataset fails before a model is loaded
        tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, cfg.trust_remote_code)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        data_cfg = DataConfig(cfg.template, cfg.model_max_length, cfg.mask, cfg.truncation, cfg.on_bad_record,
                              ValidationOptions(cfg.merge_consecutive, cfg.drop_leading_assistant,
                                                allow_undeclared_tools=cfg.allow_undeclared_tools),
                              cfg.seed, cfg.reasoning, cfg.reasoning_history)
        cache_opts = {"shared": cfg.data_cache_shared, "data_hash": cfg.data_hash}
        train_ds, train_stats, _ = build_dataset(cfg.data_path, tokenizer, data_cfg, cfg.preprocessing_num_workers,
                                                 report_dir=cfg.output_dir, **cache_opts)
        if len(train_ds) == 0:
            raise ValueError(f"--data_path {' '.join(cfg.data_path)}: no trainable samples left (see data_report.json)")
        # memory-mapped Arrow all the way to the collator: a rank holds the rows of its current micro-batches only
        samples = train_ds.select_columns(["input_ids", "labels"])
        eval_samples = None
        if cfg.eval_data_path:
            eval_cfg = DataConfig(**{**data_cfg.__dict__, "overflow": "truncate"})
            eval_ds, _, _ = build_dataset(cfg.eval_data_path, tokenizer, eval_cfg, cfg.preprocessing_num_workers,
                                          **cache_opts)
            eval_samples = eval_ds.select_columns(["input_ids", "labels"])

        # sequence parallelism: groups of N ranks share rows, each holding L/N positions; data parallelism
        # (sampler, eval shards, the global batch) runs over the W/N groups
        sp = init_sequence_parallel(info, cfg.sequence_parallel_size)
        mode = "qlora" if cfg.q_lora else "lora" if cfg.is_peft else "full"
        plan = PlanConfig(cfg.per_device_train_batch_size, sp.dp_size, sp.dp_rank, cfg.seed, cfg.packing,
                          cfg.model_max_length, cfg.group_by_length)
        lengths = lengths_of(train_ds)
        stream = MicroBatchStream(lengths, plan)  # plans read the lengths column only
        per_epoch = math.ceil(stream.micro_batches_per_epoch() / cfg.gradient_accumulation_steps)
        total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_train_epochs * per_epoch))
        global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * sp.dp_size
        # what a checkpoint must share with the run that resumes it (train/checkpoint.py RUN_FACTS)
        run_facts = {"mode": mode, "global_batch": global_batch, "packing": cfg.packing,
                     "rows": cfg.model_max_length if cfg.packing else None, "group_by_length": cfg.group_by_length,
                     "seed": cfg.seed, "data": f"{len(lengths)} samples (lengths {lengths_fingerprint(lengths)})"}

        resume = resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir)
        # before the model: a resume that cannot be honoured fails now
        resume_state = check_resumable(resume, run_facts) if resume is not None else None

        # the backend decides how weights arrive: sharded backends never materialize the full model on
        # more than one rank (FSDP2: meta + rank-0 broadcast; ZeRO-3: partitioned at construction)
        config = model_config(cfg)
        check_heads(config, sp.size)
        backend = make_backend(info, cfg, precision, getattr(config, "hidden_size", None))
        model = backend.build_model(lambda placement: build_model(cfg, info, placement, precision))
        if cfg.packing:  # one row of the micro-batch's samples with cu_seq_lens: attention per sample (train/attention.py)
            def collate(units):
                return shard_batch(collate_packed(units, pad_id, varlen=True, multiple=sp.size), sp)
        else:
            def collate(units):
                return shard_batch(collate_padded([s for unit in units for s in unit], pad_id, multiple=sp.size), sp)

        # wrapping/sharding (FSDP, DeepSpeed) precedes the optimizer, which sees the wrapped parameters
        wrapped, optimizer = backend.setup(model, lambda m: make_optimizer(cfg, m))
        scheduler = make_scheduler(cfg, optimizer, total_steps)
        checkpointer = Checkpointer(cfg.output_dir, info, backend, cfg.save_total_limit, cfg.async_save)
        state = LoopState()
        saved: dict = {}
        if resume is not None:
            saved = checkpointer.load(resume, wrapped, optimizer, scheduler, resume_state)
            state = LoopState.from_dict(saved)
            state.sampler = rescale_sampler_state(state.sampler, saved.get("data_parallel_size", saved["world_size"]),
                                                  saved["per_device_train_batch_size"], sp.dp_size,
                                                  cfg.per_device_train_batch_size)
            state.last_checkpoint = str(resume)
            print0(f"[train] resumed from {resume} at step {state.step} (epoch {state.sampler.epoch}, "
                   f"{saved['units_consumed']} {'rows' if cfg.packing else 'samples'} of it consumed; written by "
                   f"{saved['world_size']} process(es), backend={saved['backend']})")
        elif str(cfg.resume_from_checkpoint).lower() == "auto":
            print0(f"[train] --resume_from_checkpoint auto: no complete checkpoint in {cfg.output_dir}; starting fresh")
        if sp.enabled:
            print0(f"[train] sequence parallel: {sp.dp_size} group(s) of {sp.size} ranks, each rank holding 1/{sp.size} "
                   "of every row")
        print0(f"[train] {mode} fine-tune on {info.world_size} process(es), backend={backend.name}: {len(samples)} samples, "
               f"{per_epoch} steps/epoch, {total_steps} steps, global batch {global_batch}"
               f"{' packed rows' if cfg.packing else ''}")
        tracker = Tracker(cfg, info.is_main, total_steps, state.step, wandb_id=saved.get("wandb_id"))

        def save(st: LoopState) -> str:
            units = units_consumed(st.sampler, sp.dp_size, cfg.per_device_train_batch_size)
            return checkpointer.save(st.step, wrapped, optimizer, scheduler, {
                **st.as_dict(), "units_consumed": units, "per_device_train_batch_size": cfg.per_device_train_batch_size,
                "data_parallel_size": sp.dp_size,
                "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "run": run_facts,
                "wandb_id": tracker.wandb_id})

        eval_fn = (lambda: evaluate(wrapped, eval_samples, collate, cfg, info, precision.autocast_dtype,
                                    (sp.dp_rank, sp.dp_size))) \
            if eval_samples else None
        install_signal_handlers()
        try:
            state = train_loop(cfg=cfg, info=info, backend=backend, model=wrapped, optimizer=optimizer,
                               scheduler=scheduler, stream=stream, samples=samples, collate=collate,
                               total_steps=total_steps, state=state, tracker=tracker, save=save, eval_fn=eval_fn,
                               precision=precision, after_first_step=first_step_check(planned, info))
            if eval_fn is not None and cfg.evaluation_strategy != "no":
                tracker.log(state.step, eval_fn())
            if cfg.save_strategy != "no" and not (state.last_checkpoint or "").endswith(f"checkpoint-{state.step}"):
                save(state)
        finally:
            tracker.close()
            checkpointer.close()  # an async save in flight is finished (or its failure reported) before exit
        # gathered collectively onto rank 0's CPU one tensor at a time: the whole model, or the adapter's weights
        backend.release_training_state(wrapped, optimizer)
        trainable_only = mode != "full"
        spec = [(n, tuple(backend.global_shape(t)), t.dtype) for n, t in backend.export_entries(wrapped, trainable_only)]
        out = export_model(backend.unwrap(wrapped), backend.export_tensors(wrapped, trainable_only), spec, tokenizer, cfg,
                           mode, info.is_main,
                           {"train_stats": train_stats.summary(), "steps": state.step, "precision": precision.name})
        print0(f"[train] done: {state.step} steps; model written to {out}")
        return 0
    finally:
        cleanup()


def main(argv: list[str] | None = None, defaults: dict | None = None) -> int:
    try:
        cfg = parse_args(argv, defaults)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return run(cfg)
    except TrainingInterrupted as e:
        print0(f"[train] {e}")
        return 128 + e.signum
    except (NonFiniteError, DataError, DataBuildError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    exit_fast(main())
