"""Class weights and label smoothing (task.class_weights, task.label_smoothing): the loss the loop trains with."""

import json

import pytest
import torch
import torch.nn.functional as F

from peftkit.errors import UserError
from peftkit.tasks import TASKS
from peftkit.tasks.common import _class_weights, cross_entropy

from .conftest import peftkit_here


def test_balanced_weights_count_rows_and_scored_tokens():
    rows = {"labels": [0, 0, 0, 1]}  # 3 : 1
    assert _class_weights("balanced", rows, ["neg", "pos"]) == pytest.approx([4 / (2 * 3), 4 / (2 * 1)])
    tokens = {"labels": [[-100, 0, 0, 2, -100], [0, 1, -100]]}  # 0 x3, 1 x1, 2 x1: -100 is not scored
    assert _class_weights("balanced", tokens, ["O", "B", "I"]) == pytest.approx([5 / 9, 5 / 3, 5 / 3])
    assert _class_weights("balanced", {"labels": [0, 0]}, ["a", "b"]) == [0.5, 1.0]  # b: never a target


def test_given_weights_need_one_per_label():
    assert _class_weights([1, 2.5], {"labels": []}, ["neg", "pos"]) == [1.0, 2.5]
    with pytest.raises(UserError, match=r"3 weight\(s\) for 2 labels \(neg, pos\)"):
        _class_weights([1, 2, 3], {"labels": []}, ["neg", "pos"])


def test_the_loss_is_weighted_smoothed_cross_entropy_over_scored_positions():
    assert cross_entropy(None, 0.0, {"labels": [0, 1]}, ["a", "b"]) is None  # the model's own loss
    logits, targets = torch.randn(2, 3, 4), torch.tensor([[0, 1, -100], [3, -100, 2]])
    loss = cross_entropy([1.0, 2.0, 0.5, 3.0], 0.1, {"labels": []}, list("abcd"))
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0])
    expected = F.cross_entropy(logits.view(-1, 4), targets.view(-1), weight=weight, label_smoothing=0.1)
    assert torch.allclose(loss(logits, targets), expected)


@pytest.mark.parametrize("task", ["question_answering", "causal_lm"])
def test_tasks_without_classes_keep_the_models_loss(task):
    assert TASKS[task].loss(None, None, None) is None


def test_a_run_with_balanced_class_weights_and_smoothing_trains(recipe_file, tmp_path):
    path = recipe_file(
        task={"type": "classification", "max_length": 32, "class_weights": "balanced", "label_smoothing": 0.1},
        train={"epochs": 3, "batch_size": 16, "lr": 5e-3},
    )  # the tiny model learns little in this: what is checked is that such a run goes through
    done = peftkit_here("run", path)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "runs" / "recipe"
    assert "class weights (balanced): neg 1, pos 1" in (run / "train.log").read_text()  # this data is balanced
    assert json.loads((run / "metrics.json").read_text())["train"]["steps"] == 30


def test_the_loop_trains_with_the_task_sections_loss(recipe_file, monkeypatch):
    from peftkit import train

    from .test_train import job_for

    job = job_for(
        recipe_file(task={"type": "classification", "max_length": 32, "class_weights": [1, 3], "label_smoothing": 0.1})
    )
    calls, real = [], F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda *args, **kwargs: calls.append(kwargs) or real(*args, **kwargs))
    train.fit(job)
    ours = [c for c in calls if c.get("weight") is not None]  # the rest: the model's own, in the evaluation
    assert len(ours) == 10  # one per training batch (the model, given no labels there, computes none)
    assert all(c["weight"].tolist() == [1.0, 3.0] and c["label_smoothing"] == 0.1 for c in ours)
