"""train.recover: a run that goes wrong is put back to its last good state and trains on from there with half the
learning rate.

What counts as going wrong, and where the loop (train.py) sees it:
- a validation that predicts one class for everything (`collapsed_to`, evaluation.evaluate), at an evaluation,
  unless the training loss logged since the evaluation before is still falling (`still_learning`): a tagger or a
  classifier on imbalanced data first learns to answer the majority class, and gets past it on its own;
- a logged training loss (the mean over train.log_every steps) that is not finite, or above train.recover.spike
  times the loss of the run's first step, the untrained model's, at a log step;
- trained weights that are not finite, when a checkpoint is about to be written.

The last good state is the run's start (or the checkpoint it resumed from) or its last evaluation that was healthy:
trainable weights, optimizer, schedule, fp16 scaler, method state, position in the data and random states, held in
memory as CPU copies of what trains (never the frozen base). Put back with the rate halved, the run replays the
same batches from there. At most train.recover.times rollbacks; after them it trains on, and a non-finite loss stops
it as it would without train.recover. Every rollback is a warning in the log and an entry of metrics.json's
train.recoveries.

Large pretraining runs handle spikes alike (PaLM restarted from a checkpoint about 100 steps before a spike, and
skipped the batches around it). In fine-tuning the usual cause is a rate too high for the method, the data or the
precision, not one bad batch, so here the rate is halved and the batches are kept.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from peftkit import sharding
from peftkit.methods.base import load_trainable, trainable_tensors

if TYPE_CHECKING:
    import torch

    from peftkit.sections import RecoverSection
    from peftkit.training_state import Optimization, TrainingState


@dataclass
class Snapshot:
    """A good state to come back to: the TrainingState (its `rng`, `data_generator` and `method_state` filled in,
    as a checkpoint's are) and CPU copies of what trains and what updates it."""

    state: TrainingState
    weights: dict
    optimizer: dict
    scheduler: dict
    scaler: dict | None


def take(state: TrainingState, model: torch.nn.Module, optimization: Optimization) -> Snapshot:
    """A copy of the run as it is now (`state` already holds the random, data and method states). Under FSDP
    gathering the weights and optimizer state is a collective: every process takes it."""
    return Snapshot(
        state=replace(
            state,
            history=copy.deepcopy(state.history),
            recoveries=list(state.recoveries),
            logged_losses=list(state.logged_losses),
        ),
        weights=trainable_tensors(model),
        optimizer=_on_cpu(sharding.optimizer_state(model, optimization.optimizer)),
        scheduler=copy.deepcopy(optimization.scheduler.state_dict()),
        scaler=copy.deepcopy(optimization.scaler.state_dict()) if optimization.scaler is not None else None,
    )


def put_back(snapshot: Snapshot, model: torch.nn.Module, optimization: Optimization, now: TrainingState) -> None:
    """Make `now` and the model, optimizer, schedule and scaler what they were in `snapshot`, keeping what the run
    learned about itself since (its rollbacks, its first step's loss), with the peak rate scaled by a half for each
    rollback since the snapshot was taken. The snapshot stays as it was: it can be come back to again."""
    load_trainable(model, snapshot.weights, "the last good state (train.recover)")
    # copies: the optimizer and scheduler take tensors and lists in without copying, then change them in place
    sharding.load_optimizer_state(model, optimization.optimizer, copy.deepcopy(snapshot.optimizer))
    optimization.scheduler.load_state_dict(copy.deepcopy(snapshot.scheduler))
    if optimization.scaler is not None and snapshot.scaler is not None:
        optimization.scaler.load_state_dict(copy.deepcopy(snapshot.scaler))
    scale_lr(optimization, 0.5 ** (len(now.recoveries) - len(snapshot.state.recoveries)))
    restored = replace(
        snapshot.state,
        history=copy.deepcopy(snapshot.state.history),
        logged_losses=list(snapshot.state.logged_losses),
        recoveries=now.recoveries,
        first_loss=now.first_loss if now.first_loss is not None else snapshot.state.first_loss,
    )
    now.__dict__.update(restored.__dict__)  # in place: the loop and its caller hold this one TrainingState


def scale_lr(optimization: Optimization, factor: float) -> None:
    """Multiply the whole schedule by `factor`: its peak (the scheduler's base rates, the groups' initial ones) and
    the rate of the step it is at."""
    scheduler = getattr(optimization.scheduler, "scheduler", optimization.scheduler)  # inside accelerate's wrapper
    scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    for group in optimization.optimizer.param_groups:
        group["lr"] *= factor
        group["initial_lr"] *= factor
    scheduler._last_lr = [group["lr"] for group in optimization.optimizer.param_groups]  # what get_last_lr reads


def loss_went_wrong(loss: float, first: float | None, cfg: RecoverSection) -> str | None:
    """Why a logged training loss calls for a rollback (not finite, or a spike), or None when it does not."""
    if not math.isfinite(loss):
        return f"the training loss became {loss}"
    if first is not None and first > 0 and loss > cfg.spike * first:
        return (
            f"the training loss spiked to {loss:.4g}, {loss / first:.1f}x the untrained model's ({first:.4g}, at step "
            f"1; train.recover.spike {cfg.spike:g})"
        )
    return None


def collapse(metrics: dict) -> str | None:
    """Why a validation calls for a rollback (it collapsed to one class), or None when it does not."""
    if "collapsed_to" not in metrics:
        return None
    return metrics.get("collapse_detail") or (
        f"validation predicts '{metrics['collapsed_to']}' for all {metrics['collapsed_over']} scored (a collapse "
        f"to one class; its accuracy {metrics['collapsed_share']:.3f} is that class's share)"
    )


STILL_FALLING = 0.05  # the later half of the logged losses at least this much under the earlier half


def still_learning(losses: list[float]) -> str | None:
    """Whether the training losses logged since the last evaluation still fall (the mean of their later half is
    STILL_FALLING under their earlier half's): then a one-class validation is a model on its way, not a collapse.
    Measured on the NER recipe at half its rate: validation predicted 'O' for every token after its first epoch,
    while the loss fell from 3.0 to 0.3; left alone it reached F1 0.42 by the fourth. The demo's collapses sat at
    chance (0.69) instead. None when the losses do not fall, or are too few to tell (under 4)."""
    if len(losses) < 4:
        return None
    half = len(losses) // 2
    earlier, later = sum(losses[:half]) / half, sum(losses[half:]) / (len(losses) - half)
    if later >= (1 - STILL_FALLING) * earlier:
        return None
    return f"the training loss is still falling ({earlier:.3g} -> {later:.3g} over the {len(losses)} logged since)"


def _on_cpu(value: object) -> object:
    """A copy of a (nested) state with every tensor copied to the CPU: a snapshot holds no device memory."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(item) for item in value)
    return copy.deepcopy(value)
