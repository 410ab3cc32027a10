"""The training loop: exact token-normalized loss, eval, checkpoints, non-finite guard, signals.

Loss of one optimizer step = (sum of token losses over all its micro-batches on all ranks) /
(number of supervised tokens in them), not a mean of per-batch means: a step's gradient is the same
whether it is computed as 8 samples × 1 micro-batch or 1 sample × 8 micro-batches, on 1 rank or 2.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from data.tokenize import IGNORE_INDEX
from train.backends import Backend
from train.collate import model_inputs, num_supervised
from train.config import TrainConfig
from train.distributed import DistInfo, all_reduce_max, all_reduce_sum
from train.loss import targets as loss_targets
from train.precision import Precision
from train.sampler import MicroBatchStream, SamplerState

FP32 = Precision("fp32")


class NonFiniteError(RuntimeError):
    pass


class TrainingInterrupted(RuntimeError):
    def __init__(self, signum: int, checkpoint):
        self.signum = signum
        self.checkpoint = checkpoint
        super().__init__(f"received {signal.Signals(signum).name}: saved {checkpoint}; "
                         "continue with --resume_from_checkpoint True")


_stop_signal: list[int] = []


def install_signal_handlers() -> None:
    """SIGTERM/SIGINT: finish the current optimizer step, checkpoint, then stop (see TrainingInterrupted)."""
    def handler(signum, frame):
        if not _stop_signal:
            _stop_signal.append(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def token_loss_sum(model, batch: dict, device: torch.device, autocast: torch.dtype | None) -> torch.Tensor:
    """Sum of cross-entropy over supervised positions (labels are already shifted by the collator);
    `autocast`: bf16/fp16 compute dtype, or None for fp32 (train/precision.py)."""
    inputs = model_inputs(batch, device)
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None), \
            loss_targets(batch["labels"]):
        logits = model(**inputs, use_cache=False).logits
    if logits.dim() == 0:  # the chunked head (train/loss.py) returned the loss sum itself
        return logits
    labels = batch["labels"].to(device)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def accumulate_gradients(model, batches: list[dict], backend: Backend, info: DistInfo, autocast: torch.dtype | None,
                         scaler=None) -> tuple[float, int]:
    """Backward over one optimizer step's micro-batches; returns (step loss, supervised tokens), both
    global over ranks. Each micro-batch's token-loss sum is divided by the step's global token count.
    The loss sum stays on the device until the step's single all-reduce (no host sync per micro-batch).
    `scaler`: fp16's loss scaler, whose scale multiplies the loss before backward."""
    n_sup = int(all_reduce_sum(sum(num_supervised(b) for b in batches), info.device))
    loss_sum_local = torch.zeros((), dtype=torch.float64, device=info.device)
    for k, batch in enumerate(batches):
        with backend.sync_context(model, last_micro=k == len(batches) - 1):
            loss_sum = token_loss_sum(model, batch, info.device, autocast)
            loss = loss_sum * (backend.loss_scale / max(n_sup, 1))
            backend.backward(scaler.scale(loss) if scaler is not None else loss)
        loss_sum_local += loss_sum.detach().double()
    return all_reduce_sum(loss_sum_local, info.device) / max(n_sup, 1), n_sup


@torch.no_grad()
def evaluate(model, samples, collate: Callable, cfg: TrainConfig, info: DistInfo,
             autocast: torch.dtype | None = None, shard: tuple[int, int] | None = None) -> dict:
    """Streaming held-out loss over assistant tokens: per batch, sum and count; no logits are kept.

    Every rank runs the same number of forward calls: a sharded model's forward is collective (FSDP2
    all-gathers, ZeRO-3 gathers parameters), so a rank with fewer eval batches than another would leave
    it waiting forever. Such a rank runs zero-weight forwards on one of the samples instead."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=info.device)
    rank, world = shard or (info.rank, info.world_size)  # sequence parallelism: the group's data-parallel place
    indices = list(range(rank, len(samples), world))
    size = cfg.per_device_eval_batch_size
    n_batches = int(all_reduce_max(math.ceil(len(indices) / size), info.device))
    for b in range(n_batches):
        chunk = indices[b * size:(b + 1) * size]
        batch = collate([[samples[j]] for j in (chunk or [0])])
        loss_sum = token_loss_sum(model, batch, info.device, autocast).double()
        if chunk:
            total[0] += loss_sum
            total[1] += num_supervised(batch)
    if info.distributed:
        torch.distributed.all_reduce(total)
    if was_training:
        model.train()
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_supervised_tokens": int(total[1].item())}


@dataclass
class LoopState:
    step: int = 0
    sampler: SamplerState = field(default_factory=SamplerState)
    tokens_seen: int = 0
    supervised_seen: int = 0
    nonfinite_skips: int = 0
    last_checkpoint: str | None = None
    grad_scaler: dict = field(default_factory=dict)  # fp16 loss scale state (resumed exactly)

    def as_dict(self) -> dict:
        return {"step": self.step, "sampler": self.sampler.as_dict(), "tokens_seen": self.tokens_seen,
                "supervised_seen": self.supervised_seen, "nonfinite_skips": self.nonfinite_skips,
                "grad_scaler": self.grad_scaler}

    @classmethod
    def from_dict(cls, d: dict) -> LoopState:
        return cls(d["step"], SamplerState(**d["sampler"]), d["tokens_seen"], d["supervised_seen"], d["nonfinite_skips"],
                   grad_scaler=d.get("grad_scaler", {}))


def train_loop(*, cfg: TrainConfig, info: DistInfo, backend: Backend, model, optimizer, scheduler,
               stream: MicroBatchStream, samples, collate: Callable, total_steps: int, state: LoopState,
               tracker, save: Callable[[LoopState], str], eval_fn: Callable[[], dict] | None,
               precision: Precision = FP32, after_first_step: Callable[[], None] | None = None) -> LoopState:
    """`after_first_step`: called once, after this process's first optimizer step (the memory check)."""
    model.train()
    # fp16: dynamic loss scaling. An overflow at the current scale is not a failure: the step is skipped,
    # the scale lowered, and it does not count against --max_nonfinite_skips.
    scaler = backend.make_grad_scaler() if precision.loss_scaling else None
    if scaler is not None and state.grad_scaler:
        scaler.load_state_dict(state.grad_scaler)
    stream.state = state.sampler
    t_last = time.perf_counter()
    tokens_since = sup_since = 0
    while state.step < total_steps:
        epoch_before = stream.state.epoch
        micro = [stream.next()[1] for _ in range(cfg.gradient_accumulation_steps)]
        batches = [collate([[samples[i] for i in unit] for unit in units]) for units in micro]
        loss, n_sup = accumulate_gradients(model, batches, backend, info, precision.autocast_dtype, scaler)
        applied, grad_norm = backend.optimizer_step(model, optimizer, cfg.max_grad_norm, math.isfinite(loss), scaler)
        if scaler is not None:
            state.grad_scaler = scaler.state_dict()
        if applied and not math.isfinite(loss):  # a backend that decides for itself (DeepSpeed checks gradients only)
            raise NonFiniteError(f"non-finite loss at step {state.step + 1} (loss={loss}) but the {backend.name} backend "
                                 f"applied the update (grad_norm={grad_norm}); stopping. Last checkpoint: "
                                 f"{state.last_checkpoint or 'none'}.")
        if not applied and precision.loss_scaling and math.isfinite(loss):
            backend.zero_grad(optimizer)
            tracker.message(f"[train] step {state.step + 1}: fp16 gradients overflowed; step skipped and loss scale "
                            f"lowered{f' to {scaler.get_scale():g}' if scaler is not None else ''}")
            continue
        if not applied:
            backend.zero_grad(optimizer)
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            if state.nonfinite_skips < cfg.max_nonfinite_skips:
                state.nonfinite_skips += 1
                tracker.message(f"[train] step {state.step + 1}: non-finite {what} (loss={loss}, grad_norm={grad_norm}); "
                                f"skipped ({state.nonfinite_skips}/{cfg.max_nonfinite_skips})")
                continue
            raise NonFiniteError(
                f"non-finite {what} at step {state.step + 1} (loss={loss}, grad_norm={grad_norm}); stopped before the "
                f"optimizer update, so no weights were changed. Last checkpoint: {state.last_checkpoint or 'none'}. "
                "Lower --learning_rate, check the data, or allow skips with --max_nonfinite_skips N.")
        scheduler.step()
        backend.zero_grad(optimizer)
        state.step += 1
        if after_first_step is not None:
            after_first_step()
            after_first_step = None
        state.sampler = stream.state
        step_tokens = all_reduce_sum(sum(int(b["num_tokens"]) for b in batches), info.device)
        state.tokens_seen += int(step_tokens)
        state.supervised_seen += int(n_sup)
        tokens_since += step_tokens
        sup_since += n_sup
        tracker.advance(state.step)

        if state.step % cfg.logging_steps == 0 or state.step == total_steps:
            now = time.perf_counter()
            elapsed = max(now - t_last, 1e-9)
            tracker.log(state.step, {
                "loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "epoch": _epoch(stream),
                "tokens_per_s": tokens_since / elapsed, "supervised_tokens_per_s": sup_since / elapsed,
                "supervised_tokens": int(n_sup)})
            t_last, tokens_since, sup_since = now, 0, 0
        epoch_ended = stream.state.epoch != epoch_before or (
            stream.state.micro_index >= stream.micro_batches_per_epoch())
        if eval_fn is not None and (
                (cfg.evaluation_strategy == "steps" and state.step % cfg.eval_steps == 0)
                or (cfg.evaluation_strategy == "epoch" and epoch_ended)):
            tracker.log(state.step, eval_fn())
        if (cfg.save_strategy == "steps" and state.step % cfg.save_steps == 0) or (
                cfg.save_strategy == "epoch" and epoch_ended):
            state.last_checkpoint = save(state)
        if all_reduce_max(1 if _stop_signal else 0, info.device) > 0:  # any rank signalled: all stop together
            ckpt = state.last_checkpoint if state.last_checkpoint and state.last_checkpoint.endswith(f"-{state.step}") \
                else save(state)
            raise TrainingInterrupted(_stop_signal[0] if _stop_signal else signal.SIGTERM, ckpt)
    return state


def _epoch(stream: MicroBatchStream) -> float:
    per = max(stream.micro_batches_per_epoch(), 1)
    return stream.state.epoch + stream.state.micro_index / per
