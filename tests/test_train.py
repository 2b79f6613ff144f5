"""The training loop on its own, without the command line: the state a checkpoint saves and loads whole, what fit()
returns and which weights it ends on, the method hooks, resuming in the same process, and the step arithmetic."""

import dataclasses
import json
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

from peftkit import batches, checkpoint, devices, evaluation, train
from peftkit.methods.base import trainable_tensors
from peftkit.recipe import TrainSection, load_recipe
from peftkit.training_state import Optimization, TrainingState

RESULT_KEYS = {
    *("history", "best_epoch", "best_step", "stopped_early", "steps"),
    *("samples_per_s", "tokens_per_s", "seconds", "tokens", "processes", "lr"),
}


def same(a: object, b: object) -> bool:
    """Equal all the way down, tensors (and their dtypes) included, tuples told from lists."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


def linear_with_optimization(seed: int) -> tuple[torch.nn.Module, Optimization]:
    from transformers import get_scheduler

    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, Optimization(optimizer, get_scheduler("linear", optimizer, 1, 10))


def save_checkpoint(run_dir, keep, model, optimization, state):
    """What the loop saves (train._Loop.save), in one process: the trainable tensors and the optimizer's state."""
    weights, optimizer_state = trainable_tensors(model), optimization.optimizer.state_dict()
    return checkpoint.save(run_dir, keep, weights, optimizer_state, optimization, state)


def test_a_training_state_goes_through_a_checkpoint_whole(tmp_path):
    model, optimization = linear_with_optimization(0)
    model(torch.randn(2, 4)).sum().backward()  # one step, so that the optimizer and scheduler have state
    optimization.optimizer.step()
    optimization.scheduler.step()
    shuffle = torch.Generator().manual_seed(3)
    torch.randperm(10, generator=shuffle)
    state = TrainingState(
        step=7,
        epoch=2,
        batches=3,
        best_score=-0.25,
        best_epoch=1,
        best_step=4,
        stale=1,
        processes=2,
        history=[{"epoch": 1, "step": 4, "validation": {"accuracy": 0.75, "f1_per_class": {"neg": 0.5}, "rows": 20}}],
        best_state={name: 2 * p.detach() for name, p in model.named_parameters()},
        data_generator=shuffle.get_state(),
        rng=checkpoint.rng_now(),
        method_state={"ipt": {"layer.lora_E": torch.rand(4)}, "rank_pattern": {"layer": [True, False]}},
        first_loss=0.6931,
        recoveries=[{"at_step": 6, "why": "step 6: the training loss became nan", "back_to_step": 4, "lr": 2.5e-4}],
        logged_losses=[0.69, 0.61],
    )
    folder = save_checkpoint(tmp_path, 2, model, optimization, state)

    # the on-disk layout that checkpoints of earlier versions have too, and the manifest of its files
    assert folder == tmp_path / "checkpoints" / "step-000007"
    assert sorted(p.name for p in folder.iterdir()) == [
        "best.safetensors",
        "manifest.json",
        "progress.json",
        "state.json",
        "state.safetensors",
        "trainable.safetensors",
    ]
    progress = json.loads((folder / "progress.json").read_text())
    assert list(progress)[:7] == ["step", "epoch", "batches", "history", "best_score", "best_epoch", "processes"]
    # added with step evaluation and early stopping, then train.recover
    assert list(progress)[7:] == ["best_step", "stale", "first_loss", "recoveries", "logged_losses"]
    stored = json.loads((folder / "state.json").read_text())["dict"]  # [[key, value], ...] as _to_json writes them
    assert [key["value"] for key, _ in stored] == [
        "optimizer",
        "scheduler",
        "scaler",
        "torch_rng",
        "cuda_rng",
        "python_rng",
        "data_generator",
        "method",
    ]

    fresh, fresh_optimization = linear_with_optimization(1)
    loaded = checkpoint.load(folder, fresh, fresh_optimization)
    for field in dataclasses.fields(TrainingState):
        assert same(getattr(loaded, field.name), getattr(state, field.name)), field.name
    assert same(fresh.state_dict(), model.state_dict())
    assert same(fresh_optimization.optimizer.state_dict(), optimization.optimizer.state_dict())
    assert same(fresh_optimization.scheduler.state_dict(), optimization.scheduler.state_dict())


def test_a_checkpoint_from_before_the_method_state_and_process_count_loads(tmp_path):
    model, optimization = linear_with_optimization(0)
    state = TrainingState(step=1, data_generator=torch.Generator().get_state(), rng=checkpoint.rng_now())
    folder = save_checkpoint(tmp_path, 1, model, optimization, state)
    written = json.loads((folder / "state.json").read_text())
    written["dict"] = [pair for pair in written["dict"] if pair[0] != {"value": "method"}]
    (folder / "state.json").write_text(json.dumps(written))
    progress = json.loads((folder / "progress.json").read_text())
    del progress["processes"]
    (folder / "progress.json").write_text(json.dumps(progress))
    loaded = checkpoint.load(folder, model, optimization)
    assert loaded.method_state is None and loaded.processes == 1 and loaded.best_state is None


def job_for(path: Path, run_dir: Path | None = None, method: ModuleType | SimpleNamespace | None = None) -> train.Job:
    """What run.py hands fit() for a recipe (`method`: the hooks to train with, default the recipe's method)."""
    from accelerate.utils import set_seed

    from peftkit import data, loading
    from peftkit.methods import METHODS
    from peftkit.tasks import TASKS

    recipe = load_recipe(path)
    task, module = TASKS[recipe.task.type], METHODS[recipe.method.name]
    accelerator = devices.make_accelerator(recipe.train.precision, recipe.train.grad_accum)
    set_seed(recipe.train.seed)
    splits, labels = data.load(recipe.data, task, kind=task.label_kind(recipe.task))
    steps = batches.total_steps(len(splits["train"]), recipe.train, accelerator.num_processes)
    tokenizer, model = loading.adapted_model(
        recipe, task, labels, accelerator.device, devices.precision_of(accelerator), steps
    )
    encoded = task.preprocess(splits, tokenizer, recipe.task)
    return train.Job(
        model,
        encoded,
        task.collator(tokenizer),
        task,
        recipe,
        accelerator,
        labels,
        method if method is not None else module,
        run_dir,
    )


def scripted_evaluation(monkeypatch: pytest.MonkeyPatch, scores: list[float]) -> list[dict]:
    """Each epoch's evaluation returns the next of `scores` as its accuracy; returns the trainable tensors each
    evaluation saw, as they list up."""
    seen, upcoming = [], iter(scores)

    def evaluate(model, loader, task, labels, accelerator, config) -> dict:
        seen.append(trainable_tensors(accelerator.unwrap_model(model)))
        return {"accuracy": next(upcoming), "macro_f1": 0.0, "rows": 20}

    monkeypatch.setattr(evaluation, "evaluate", evaluate)
    return seen


def test_fit_returns_its_record_and_ends_on_the_best_epochs_weights(recipe_file, monkeypatch):
    job = job_for(recipe_file(train={"epochs": 3, "batch_size": 16, "lr": 5e-3}))
    seen = scripted_evaluation(monkeypatch, [0.5, 0.9, 0.7])
    result = train.fit(job)
    assert set(result) == RESULT_KEYS and result["processes"] == 1 and result["lr"] == 5e-3
    assert result["steps"] == batches.total_steps(160, job.recipe.train) == 30
    assert [(e["epoch"], e["step"], e["validation"]["accuracy"]) for e in result["history"]] == [
        (1, 10, 0.5),
        (2, 20, 0.9),
        (3, 30, 0.7),
    ]
    assert result["best_epoch"] == 2
    now = trainable_tensors(job.model)
    assert same(now, seen[1]) and not same(now, seen[2])


def test_the_method_hooks_run_per_optimizer_step_and_may_keep_the_last_epoch(recipe_file, monkeypatch):
    steps = []
    hooks = SimpleNamespace(after_optimizer_step=lambda model, step: steps.append(step), RESTORE_BEST_EPOCH=False)
    job = job_for(recipe_file(train={"epochs": 2, "batch_size": 16, "grad_accum": 3, "lr": 5e-3}), method=hooks)
    seen = scripted_evaluation(monkeypatch, [0.9, 0.1])
    result = train.fit(job)
    # 10 batches an epoch in steps of 3 + 3 + 3 + 1: the epoch's last batch always ends a step
    assert steps == list(range(1, 9)) and result["steps"] == batches.total_steps(160, job.recipe.train) == 8
    assert result["best_epoch"] is None and same(trainable_tensors(job.model), seen[1])


def test_fit_resumed_from_its_checkpoints_ends_as_the_uninterrupted_run(recipe_file, tmp_path):
    path = recipe_file(
        method={"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},  # dropout: random state resumes
        train={"epochs": 2, "batch_size": 16, "lr": 5e-3, "checkpoint_every": 3, "keep_checkpoints": 9},
    )
    whole = job_for(path, tmp_path / "whole")
    expected = train.fit(whole)
    kept = sorted((tmp_path / "whole" / "checkpoints").glob("step-*"))
    # every 3 steps, and at the first epoch's end; none at the end of the run
    assert [int(k.name.removeprefix("step-")) for k in kept] == [3, 6, 9, 10, 12, 15, 18]
    for folder in (kept[1], kept[3]):  # mid-epoch, an epoch's end
        again = job_for(path)
        result = train.fit(again, resume=folder)
        assert result["history"] == expected["history"] and result["best_epoch"] == expected["best_epoch"]
        assert result["steps"] == expected["steps"] == 20
        assert same(trainable_tensors(again.model), trainable_tensors(whole.model)), folder.name


@pytest.mark.parametrize(
    "rows, settings, processes, steps",
    [
        (160, {"epochs": 3, "batch_size": 16}, 1, 30),
        (161, {"epochs": 3, "batch_size": 16}, 1, 33),  # the last, partial batch is a step of its own
        (160, {"epochs": 2, "batch_size": 16, "grad_accum": 3}, 1, 8),  # 10 batches: 3 + 3 + 3 + 1
        (160, {"epochs": 2, "batch_size": 16, "grad_accum": 3}, 2, 4),  # 5 batches in each process: 3 + 2
        (20, {"epochs": 2, "batch_size": 32}, 1, 2),  # fewer rows than a batch: one step an epoch
        (160, {"epochs": 2, "batch_size": 16, "max_steps": 7}, 1, 7),  # as given, whatever the epochs
    ],
)
def test_total_steps(rows, settings, processes, steps):
    assert batches.total_steps(rows, TrainSection(**settings), processes) == steps


def test_a_loader_shuffles_with_the_generator_it_is_given():
    from datasets import Dataset

    rows = Dataset.from_dict({"input_ids": [[1] * (1 + i % 7) for i in range(64)]})
    for grouped in (True, False):
        given = torch.Generator().manual_seed(5)
        start = given.get_state()
        ours = batches.make_loader(rows, lambda batch: batch, 8, True, grouped, 0, generator=given)
        theirs = batches.make_loader(rows, lambda batch: batch, 8, True, grouped, 5)
        assert list(ours) == list(theirs)  # the seed's order: the generator is the shuffle's only source
        assert not torch.equal(given.get_state(), start)  # the shuffle drew from it: fit saves its state


def test_step_evaluation_keeps_the_best_evaluations_weights_and_checkpoints_each(recipe_file, monkeypatch, tmp_path):
    job = job_for(
        recipe_file(train={"epochs": 2, "batch_size": 16, "lr": 5e-3}, eval={"every_steps": 4}), tmp_path / "run"
    )
    seen = scripted_evaluation(monkeypatch, [0.5, 0.6, 0.9, 0.7, 0.8, 0.4])
    result = train.fit(job)
    # 20 steps: every 4th, and the last (20 is one of them: scored once)
    assert [(e["epoch"], e["step"]) for e in result["history"]] == [(1, 4), (1, 8), (2, 12), (2, 16), (2, 20)]
    assert result["best_step"] == 12 and result["best_epoch"] == 2 and not result["stopped_early"]
    assert same(trainable_tensors(job.model), seen[2])
    checkpoints = sorted(int(p.name.removeprefix("step-")) for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints[-2:] == [12, 16]  # after each evaluation (train.keep_checkpoints: 2), none at the end


def test_early_stopping_ends_the_run_after_patience_evaluations_without_improvement(recipe_file, monkeypatch):
    path = recipe_file(
        train={"epochs": 3, "batch_size": 16, "lr": 5e-3, "early_stopping": {"patience": 2, "min_delta": 0.05}},
        eval={"every_steps": 3},
    )
    job = job_for(path)
    # 0.62 beats 0.6 by less than min_delta: not an improvement for the patience count, but the best weights
    seen = scripted_evaluation(monkeypatch, [0.5, 0.6, 0.62, 0.55, 0.9, 0.9])
    result = train.fit(job)
    assert [e["step"] for e in result["history"]] == [3, 6, 9, 12]  # 9 and 12 did not improve by 0.05: stop
    assert result["stopped_early"] and result["steps"] == 12 < batches.total_steps(160, job.recipe.train)
    assert result["best_step"] == 9 and same(trainable_tensors(job.model), seen[2])


def test_step_evaluation_and_early_stopping_need_a_validation_split(recipe_file):
    import yaml

    from peftkit.errors import UserError

    path = recipe_file(eval={"every_steps": 2, "splits": ["test"]})
    raw = yaml.safe_load(path.read_text())
    raw["data"]["splits"] = {"train": 0.9, "validation": 0.0, "test": 0.1}  # no validation split is cut
    path.write_text(yaml.safe_dump(raw))
    job = job_for(path)
    assert "validation" not in job.splits
    with pytest.raises(UserError, match="eval.every_steps evaluates on a validation split"):
        train.fit(job)


@pytest.mark.parametrize(
    "predictions,references,expected",
    [
        ([1, 1, 1, 1], [0, 1, 1, 0], {"predicted_classes": 1, "reference_classes": 2, "collapsed_to": "pos"}),
        ([1, 0, 1, 1], [0, 1, 1, 0], {"predicted_classes": 2, "reference_classes": 2}),
        ([1, 1], [1, 1], {"predicted_classes": 1, "reference_classes": 1}),  # one class in the data: no collapse
        # tagging: every scored token "O" (id 0); unscored positions (-100) predict anything
        ([[0, 0, 3], [0, 2]], [[0, 1, -100], [0, -100]], {"predicted_classes": 1, "collapsed_to": "neg"}),
    ],
)
def test_evaluations_count_the_predicted_classes_and_name_a_collapse(predictions, references, expected):
    counts = evaluation._class_counts(predictions, references, ["neg", "pos", "x", "y"])
    assert {k: counts[k] for k in expected} == expected and ("collapsed_to" in counts) == ("collapsed_to" in expected)


def test_a_collapsed_run_says_so_loudly(recipe_file, tmp_path):
    """A learning rate of 0: the fresh head answers one class for everything, and the run ends in red."""
    from .conftest import peftkit_here

    path = recipe_file(train={"epochs": 1, "batch_size": 16, "lr": 1e-12}, method={"name": "lora", "r": 4})
    done = peftkit_here("run", path)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "runs" / "recipe" / "metrics.json").read_text())
    collapsed = [split for split in ("validation", "test") if "collapsed_to" in metrics[split]]
    if not collapsed:  # the random head happened to split the classes: nothing to say
        pytest.skip("this seed's fresh head predicts both classes")
    assert metrics["test" if "test" in collapsed else "validation"]["predicted_classes"] == 1
    assert len(metrics["warnings"]) == len(collapsed) and "collapsed to one class" in metrics["warnings"][0]
    assert "WARNING" in done.stdout and "Likely fixes: a lower train.lr" in done.stdout
