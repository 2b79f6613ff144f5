"""Where a run's numbers go besides train.log: TensorBoard scalars in <run>/tensorboard (train.tensorboard), written
by torch's SummaryWriter; skipped, with a line in the log, when the tensorboard package is missing.

run.py opens them once the run folder exists (`start`) and closes them at the end; the training loop logs to them
through the Job (`Tracking.log`). Only the main process reports; the others get a Tracking that reports nowhere.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit.run_folder import TENSORBOARD

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch.utils.tensorboard import SummaryWriter

    from peftkit.recipe import Recipe

log = logging.getLogger("peftkit")


class Tracking:
    """One run's open destinations: TensorBoard's writer. The default reports nowhere (another process than the
    main one, a run without a folder, train.tensorboard: false)."""

    def __init__(self, writer: SummaryWriter | None = None) -> None:
        self.writer, self.closed = writer, False

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        """The numbers among `values` (not the collapse check's class name, not per-class dicts), at `step`."""
        numbers = {tag: value for tag, value in values.items() if isinstance(value, (int, float))}
        if self.writer is not None:
            for tag, value in numbers.items():
                self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        """End every destination, once."""
        if self.closed:
            return
        self.closed = True
        if self.writer is not None:
            self.writer.close()


def start(recipe: Recipe, accelerator: Accelerator, run_dir: Path) -> Tracking:
    """Open the run's destinations in `run_dir` (on the main process)."""
    if not accelerator.is_main_process or not recipe.train.tensorboard:
        return Tracking()
    return Tracking(_tensorboard_writer(run_dir))


def _tensorboard_writer(run_dir: Path) -> SummaryWriter | None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's writer needs the tensorboard package
        log.info(
            "TensorBoard scalars skipped: the tensorboard package is not installed "
            "(pip install 'peftkit[tensorboard]', or set train.tensorboard: false)"
        )
        return None
    return SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD))
