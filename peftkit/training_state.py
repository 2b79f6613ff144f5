"""What a training run is at a given moment, beyond its weights: the one object the loop (train.py) advances and a
checkpoint (checkpoint.py) saves and loads whole. No heavy imports: both modules read it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class TrainingState:
    """Where a run stands. `rng` and `method_state` are what a checkpoint held: a resumed run puts them back, then
    clears them; the loop takes both afresh each time it writes a checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 1  # the epoch being trained, from 1
    batches: int = 0  # batches of `epoch` trained on: the position in the data a resumed run skips to
    history: list[dict] = field(default_factory=list)  # per evaluation (or epoch): {"epoch", "step", "validation"?}
    best_score: float = -math.inf  # the best validation eval.metric_for_best so far, signed so that higher is better
    best_epoch: int | None = None  # the epoch and step of that evaluation
    best_step: int | None = None
    best_state: dict[str, torch.Tensor] | None = None  # its trainable tensors (CPU copies), by name, when kept
    stale: int = 0  # evaluations in a row since one improved on the best by more than min_delta (early stopping)
    stopped: bool = False  # early stopping ended the run
    data_generator: torch.Tensor | None = None  # the shuffle generator's state at the start of `epoch`
    rng: dict | None = None  # torch_rng, cuda_rng, python_rng: the process's random states (checkpoint.rng_now)
    method_state: dict | None = None  # the method's own training state (AdaLoRA's importance scores), or None
    processes: int = 1  # a checkpoint's batch positions and schedule hold for this many processes only
    first_loss: float | None = None  # the loss of step 1 (untrained): what train.recover measures a spike against
    recoveries: list[dict] = field(default_factory=list)  # train.recover's rollbacks so far (recovery.py)
    logged_losses: list[float] = field(default_factory=list)  # the training losses logged since the last evaluation


@dataclass
class Optimization:
    """What updates the weights; a checkpoint holds the state of each."""

    optimizer: torch.optim.Optimizer
    scheduler: Any  # a torch LR scheduler (accelerate wraps it)
    scaler: Any = None  # the fp16 gradient scaler (accelerator.scaler), None otherwise
