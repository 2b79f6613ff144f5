"""Batches: the loaders of training and evaluation (padded to each batch's longest row, grouped by length), the
columns a model is given, and how many optimizer steps a run makes of them."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from datasets import Dataset
    from torch.utils.data import DataLoader

    from peftkit.recipe import Recipe, TrainSection


def make_loader(
    dataset: Dataset,
    collate: Callable,
    batch_size: int,
    shuffle: bool,
    group_by_length: bool,
    seed: int,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """Batches padded to their own longest example; grouping similar lengths keeps that padding small.
    `generator`: the shuffle's random source, for a caller that keeps it (fit checkpoints its state); by default a
    new one seeded with `seed`."""
    import torch
    from torch.utils.data import DataLoader

    generator = generator if generator is not None else torch.Generator().manual_seed(seed)
    lengths = [len(ids) for ids in dataset["input_ids"]] if group_by_length else None
    if shuffle and group_by_length:
        # transformers' sampler: shuffle, then sort within mega-batches of 50 batches, so each batch holds
        # similar lengths while the order stays random.
        from transformers.trainer_pt_utils import LengthGroupedSampler

        sampler = LengthGroupedSampler(batch_size, lengths=lengths, generator=generator)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate)
    if group_by_length:  # evaluation: order does not matter, so sort outright
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        return DataLoader(dataset, batch_size=batch_size, sampler=order, collate_fn=collate)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate)


def eval_loader(split: Dataset, collate: Callable, recipe: Recipe, accelerator: Accelerator) -> DataLoader:
    """An evaluation split's loader, sorted by length, prepared for the accelerator's processes."""
    return accelerator.prepare(make_loader(split, collate, recipe.eval.batch_size, False, True, recipe.train.seed))


def total_steps(train_rows: int, cfg: TrainSection, processes: int = 1) -> int:
    """Optimizer steps of a run: what the scheduler, and AdaLoRA's rank budget, plan over. With several
    processes each takes its own train.batch_size per step, so an epoch has `processes` times fewer steps."""
    batches = math.ceil(train_rows / (cfg.batch_size * processes))
    return cfg.max_steps or cfg.epochs * math.ceil(batches / cfg.grad_accum)


def model_inputs(batch: Mapping[str, Any]) -> dict:
    """The batch without the task's bookkeeping columns (meta_*: e.g. which QA window a row is)."""
    return {k: v for k, v in batch.items() if not k.startswith("meta_")}
