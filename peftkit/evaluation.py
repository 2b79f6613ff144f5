"""Scoring a model: a split's task metrics gathered from every process, the one-class collapse check and its
message, and scoring a finished run's adapter (`peftkit eval`)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit import batches, data, devices, loading, sharding
from peftkit.errors import UserError

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from peftkit.recipe import TrainSection
    from peftkit.tasks.common import Task

LOWER_IS_BETTER = {"loss", "perplexity", "mse", "rmse", "mae"}


def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    task: Task,
    labels: list[str] | None,
    accelerator: Accelerator,
    config: Any,
) -> dict:
    """The task's metrics over a whole split (`config`: the recipe's task section); predictions gathered from
    every process exactly once."""
    import torch

    model.eval()
    predictions, references = [], []
    with torch.no_grad():
        for batch in loader:
            preds, refs = task.eval_outputs(model(**batches.model_inputs(batch)), batch)
            # per-position outputs: the processes' batches differ in length; padded positions are never scored
            preds, refs = (
                accelerator.pad_across_processes(t, dim=t.ndim - 1, pad_index=-100) if t.ndim > 1 else t
                for t in (preds, refs)
            )
            preds, refs = accelerator.gather_for_metrics((preds, refs))
            predictions.extend(preds.cpu().tolist())
            references.extend(refs.cpu().tolist())
    if sharding.is_sharded(model):
        # forwards without a backward leave the root's parameters gathered (FSDP2 reshards them in the backward):
        # sharded again, they are the ones the optimizer holds and the ones named in state dicts
        model.reshard()
    model.train()
    metrics = task.compute_metrics(predictions, references, labels, config, loader.dataset)
    # rows: how many encoded rows were scored (QA: windows) — the split's size, whatever the process count
    metrics["rows"] = len(predictions)
    if task.LABEL_ROLE is not None and task.label_kind(config) == "class":
        # a label set: say how many classes the model predicts, and if only one (label sets and numbers: the
        # task's compute_metrics checks for its own kind of collapse)
        metrics.update(_class_counts(predictions, references, labels))
    return metrics


def _class_counts(predictions: list, references: list, labels: list[str]) -> dict:
    """How many distinct classes the model predicted and the references hold, over the scored positions
    (per token for tagging: -100 marks the unscored ones); `collapsed_to` names the one class predicted for
    everything when the references hold several: a model that learned to answer one class."""
    predicted, actual, per_token = Counter(), Counter(), False
    for pred, ref in zip(predictions, references):
        per_token = isinstance(ref, list)
        for p, r in zip(pred, ref) if per_token else [(pred, ref)]:
            if r != -100:
                predicted[p] += 1
                actual[r] += 1
    counts = {"predicted_classes": len(predicted), "reference_classes": len(actual)}
    if len(predicted) == 1 and len(actual) > 1:
        (only,) = predicted
        counts["collapsed_to"] = labels[only] if 0 <= only < len(labels) else str(only)
        counts["collapsed_share"] = actual[only] / sum(actual.values())  # what the accuracy of that answer is
        counts["collapsed_over"] = f"{sum(actual.values()):,} {'tokens' if per_token else 'rows'}"
    return counts


def collapse_message(metrics: dict, cfg: TrainSection) -> str:
    """What a collapsed evaluation means, with the numbers and what to change (`cfg`: the run's train section).
    A task that checks its own kind of collapse (multi-label, regression) says what it saw in `collapse_detail`."""
    seen = metrics.get("collapse_detail") or (
        f"the model predicts '{metrics['collapsed_to']}' for all {metrics['collapsed_over']} scored, while the data "
        f"has {metrics['reference_classes']} classes: it has collapsed to one class (its accuracy, "
        f"{metrics['collapsed_share']:.3f}, is that class's share)"
    )
    return (
        f"{seen}. Likely fixes: a lower train.lr (now "
        f"{cfg.lr:g}; try 2-5x lower), a longer train.warmup_ratio (now {cfg.warmup_ratio:g}), more epochs, or "
        "a learnable signal in the data (check the labels)"
    )


def short(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def evaluate_run(run_dir: Path, splits: list[str] | None = None) -> dict:
    """{split: metrics} of a finished run's adapter on its recipe's data (`splits`: default eval.splits), computed
    as in training (no inference-only 4-bit layout), so that they compare with the run's own metrics.json."""
    recipe, task, tokenizer, model, labels = loading.load_trained(run_dir, inference=False)
    # the ids the run was trained with
    data_splits, _ = data.load(recipe.data, task, order=labels, kind=task.label_kind(recipe.task))
    splits = splits or recipe.eval.splits
    if not splits:  # eval.splits: [] scores nothing
        return {}
    missing = [s for s in splits if s not in data_splits]
    if missing:
        raise UserError(f"--split {', '.join(missing)}: the data has only {', '.join(data_splits)}")
    from datasets import DatasetDict

    encoded = task.preprocess(DatasetDict({s: data_splits[s] for s in splits}), tokenizer, recipe.task)  # scored only
    accelerator = devices.make_accelerator(recipe.train.precision, 1)
    model = accelerator.prepare(model)
    return {
        split: evaluate(
            model,
            batches.eval_loader(encoded[split], task.collator(tokenizer), recipe, accelerator),
            task,
            labels,
            accelerator,
            recipe.task,
        )
        for split in splits
    }
