"""Run logging on rank 0: a progress bar, `metrics.jsonl` in the output dir, and wandb/tensorboard."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from data.progress import progress_disabled
from train.config import TrainConfig, run_name, to_dict


def keep_metrics_through(path: Path, step: int) -> None:
    """Drop the rows of steps after `step` (logged after the checkpoint a run resumes from, or by an
    earlier run in this directory when it starts fresh), so every step is in metrics.jsonl exactly once
    however often the run is resumed. Rewritten through a temp file and a rename: a crash here loses nothing."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row_step = json.loads(line).get("step", 0)
        except ValueError:
            continue  # a row cut short by a crash
        if row_step <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


class Tracker:
    """`start_step`: the step a run starts or resumes at; `wandb_id`: the wandb run to continue (recorded
    in each checkpoint), so a resumed run logs into the same wandb run."""

    def __init__(self, cfg: TrainConfig, is_main: bool, total_steps: int, start_step: int = 0,
                 wandb_id: str | None = None):
        self.is_main = is_main
        self.cfg = cfg
        self.total = total_steps
        self.wandb_id = wandb_id
        self._wandb = None
        self._tb = None
        self._progress = None
        if not is_main:
            return
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        keep_metrics_through(Path(cfg.output_dir) / "metrics.jsonl", start_step)
        self._metrics = open(Path(cfg.output_dir) / "metrics.jsonl", "a", encoding="utf-8")
        targets = {"wandb", "tensorboard"} if cfg.report_to == "all" else {cfg.report_to}
        if "wandb" in targets:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("--report_to wandb needs the wandb package") from e
            from wandb.sdk.lib.runid import generate_id

            self.wandb_id = wandb_id or generate_id()
            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "chattune"), name=run_name(cfg),
                                     config=to_dict(cfg), dir=cfg.output_dir, id=self.wandb_id, resume="allow")
        if "tensorboard" in targets:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(cfg.output_dir) / "runs"))
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False,
                                  disable=progress_disabled())
        self._task = self._progress.add_task("train", total=total_steps, completed=start_step, info="")
        self._progress.start()
        self._t0 = time.perf_counter()

    def log(self, step: int, metrics: dict) -> None:
        if not self.is_main:
            return
        record = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float):
                    self._tb.add_scalar(k, v, step)
        if self._progress is not None and "loss" in metrics:
            info = (f"loss {metrics['loss']:.4f} lr {metrics.get('lr', 0):.2e} "
                    f"tok/s {metrics.get('tokens_per_s', 0):.0f} sup-tok/s {metrics.get('supervised_tokens_per_s', 0):.0f}")
            self._progress.update(self._task, info=info)

    def advance(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def message(self, text: str) -> None:
        if not self.is_main:
            return
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.is_main:
            return
        if self._progress is not None:
            self._progress.stop()
        self._metrics.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()
