"""What a run shows as it trains: the progress bar, the log lines (train.log) and the numbers handed to its
trackers (train.report_to)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from peftkit.evaluation import collapse_message, short

if TYPE_CHECKING:
    from accelerate import Accelerator
    from rich.progress import Progress

    from peftkit.recipe import TrainSection
    from peftkit.tracking import Tracking

log = logging.getLogger("peftkit")


class Report:
    """What a run shows as it trains: the progress bar, the log (train.log) and its tracking (train.report_to)."""

    def __init__(self, progress: Progress, tracking: Tracking, total: int, done: int) -> None:
        self.progress, self.tracking = progress, tracking
        self.bar = progress.add_task("train", total=total, completed=done, loss=float("nan"), rate="")

    def step(self, step: int, loss: float, lr: float, rates: dict) -> None:
        rate = f"{rates['samples_per_s']:.3g} samples/s, {rates['tokens_per_s']:.4g} tok/s"
        self.progress.update(self.bar, loss=loss, rate=rate)
        log.debug("step %d  loss %.4f  lr %.2e  %s", step, loss, lr, rate)
        self.tracking.log(
            step,
            {
                "train/loss": loss,
                "train/lr": lr,
                "train/samples_per_s": rates["samples_per_s"],
                "train/tokens_per_s": rates["tokens_per_s"],
            },
        )

    def advance(self) -> None:
        self.progress.update(self.bar, advance=1)

    def rewind(self, step: int) -> None:
        """Back to `step` of the bar (train.recover rolled the run back)."""
        self.progress.update(self.bar, completed=step)

    def evaluation(self, where: str, step: int, metrics: dict, cfg: TrainSection, warn_collapse: bool) -> None:
        log.info("%s: %s", where, short(metrics))
        self.tracking.log(step, {f"validation/{k}": v for k, v in metrics.items()})
        if warn_collapse and "collapsed_to" in metrics:  # said at once, not only at the end (unless rolled back)
            log.warning("validation, %s: %s", where, collapse_message(metrics, cfg))


def bar(accelerator: Accelerator) -> Progress:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        disable=not accelerator.is_main_process,
    )
