"""Classification's problem types (task.problem_type): multi_label (a sigmoid per label, BCE, task.threshold) and
regression (one output, MSE): data encoding and its errors, the recipe's checks, the metrics against scikit-learn
and scipy, the collapse checks, training, predict and eval, resume."""

import json
import random
import re

import numpy as np
import pytest
import yaml

from peftkit import data
from peftkit.errors import UserError
from peftkit.recipe import validate
from peftkit.sections import DataSection
from peftkit.tasks import TASKS, classification

from .conftest import FILLER, NEGATIVE, POSITIVE, peftkit_here, small_recipe, write_csv

TASK = TASKS["classification"]


def tagged_rows(n: int, seed: int = 0) -> list[dict]:
    """Multi-label and regression targets carried by the words: `tags` holds pos when a positive word is in the
    text and neg when a negative one is (both, one or none, in turn); `score` is #positive - #negative words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        pos, neg = i % 4 in (0, 1), i % 4 in (0, 2)
        words = rng.sample(FILLER, 4)
        many = 1 + (i // 4) % 2  # one positive word or two
        words += [rng.choice(POSITIVE)] * many * pos + [rng.choice(NEGATIVE)] * neg
        rng.shuffle(words)
        tags = "|".join(t for t, on in (("pos", pos), ("neg", neg)) if on)
        rows.append({"review": " ".join(words), "tags": tags, "score": many * pos - neg})
    return rows


@pytest.fixture(scope="module")
def tagged_csv(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("data") / "tagged.csv", tagged_rows(240))


def recipe_for(problem: str, model, source, runs, **task) -> dict:
    recipe = {"name": "recipe", **small_recipe(model, source, runs)}
    label = "tags" if problem == "multi_label" else "score"
    recipe["data"] = {"source": str(source), "columns": {"text": "review", "label": label}}
    if problem == "multi_label":
        recipe["data"]["label_separator"] = "|"
    recipe["task"] = {"type": "classification", "max_length": 32, "problem_type": problem, **task}
    recipe["train"] = {"epochs": 4, "batch_size": 16, "lr": 5e-3}
    return recipe


def write_recipe(folder, recipe: dict, name: str = "recipe"):
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# --- data -----------------------------------------------------------------------------------------------------


def test_label_sets_from_text_and_from_lists_encode_as_0_1_per_label(tmp_path, tagged_csv):
    cfg = DataSection(source=str(tagged_csv), columns={"text": "review", "label": "tags"}, label_separator="|")
    splits, labels = data.load(cfg, TASK, kind="classes")
    assert labels == ["neg", "pos"]  # read from the data, sorted
    rows = splits["train"]
    for value in rows["label"]:
        assert len(value) == 2 and set(value) <= {0.0, 1.0}
    assert {tuple(v) for v in rows["label"]} == {(1.0, 1.0), (0.0, 1.0), (1.0, 0.0), (0.0, 0.0)}  # none: a row too
    listed = tmp_path / "tags.jsonl"
    listed.write_text('{"text": "good bad", "label": ["pos", "neg"]}\n{"text": "the", "label": []}\n' * 10)
    splits, labels = data.load(DataSection(source=str(listed), labels=["pos", "neg"]), TASK, kind="classes")
    assert labels == ["pos", "neg"] and sorted(map(tuple, splits["train"]["label"]))[-1] == (1.0, 1.0)


def test_multi_label_text_without_a_separator_and_unknown_labels_are_named(tmp_path, tagged_csv):
    with pytest.raises(UserError, match=r"source row 1 holds the text 'pos\|neg'.*set data.label_separator"):
        data.load(
            DataSection(source=str(tagged_csv), columns={"text": "review", "label": "tags"}), TASK, kind="classes"
        )
    cfg = DataSection(
        source=str(tagged_csv), columns={"text": "review", "label": "tags"}, label_separator="|", labels=["pos"]
    )
    with pytest.raises(
        UserError, match=r"row\(s\) have labels not in data.labels: 'neg' \(120\).*unknown_labels: drop"
    ):
        data.load(cfg, TASK, kind="classes")
    splits, labels = data.load(cfg.model_copy(update={"unknown_labels": "drop"}), TASK, kind="classes")
    assert labels == ["pos"] and sum(len(s) for s in splits.values()) == 120


def test_regression_targets_are_numbers_named_when_not(tmp_path, tagged_csv):
    cfg = DataSection(source=str(tagged_csv), columns={"text": "review", "label": "score"})
    splits, labels = data.load(cfg, TASK, kind="number")
    assert labels == ["score"]  # one output, named after the column
    assert sorted(set(splits["train"]["label"])) == [-1.0, 0.0, 1.0, 2.0]
    bad = write_csv(tmp_path / "bad.csv", [{"text": "good", "y": "0.5"}, {"text": "bad", "y": "high"}] * 20)
    cfg = DataSection(source=str(bad), columns={"label": "y"})
    with pytest.raises(UserError, match=r"20 row\(s\) have a 'y' that is not a number.*'high' \(20\).*rows 2, 4, 6"):
        data.load(cfg, TASK, kind="number")
    splits, _ = data.load(cfg.model_copy(update={"unknown_labels": "drop"}), TASK, kind="number")
    assert set(splits["train"]["label"]) == {0.5}


# --- the recipe -------------------------------------------------------------------------------------------------


def _problems(raw: dict) -> str:
    with pytest.raises(UserError) as caught:
        validate(raw)
    return str(caught.value)


def test_the_recipe_checks_keys_against_the_problem_type(tmp_path, tiny_bert, tagged_csv):
    multi = recipe_for("multi_label", tiny_bert, tagged_csv, tmp_path)
    assert validate(multi).eval.metric_for_best == "micro_f1"
    regression = recipe_for("regression", tiny_bert, tagged_csv, tmp_path)
    assert validate(regression).eval.metric_for_best == "mse"
    single = {"name": "single", **small_recipe(tiny_bert, tagged_csv, tmp_path)}
    assert validate(single).task.problem_type == "single_label" and validate(single).eval.metric_for_best == "accuracy"
    assert "task.label_smoothing is for single_label" in _problems(
        recipe_for("regression", tiny_bert, tagged_csv, tmp_path, label_smoothing=0.1)
    )
    assert "task.label_smoothing is for single_label" in _problems(
        recipe_for("multi_label", tiny_bert, tagged_csv, tmp_path, label_smoothing=0.1)
    )
    assert "regression has none" in _problems(
        recipe_for("regression", tiny_bert, tagged_csv, tmp_path, class_weights="balanced")
    )
    assert "'mse' is not a metric of task 'classification' as its task section sets it up" in _problems(
        {**single, "eval": {"metric_for_best": "mse"}}
    )
    assert "data.labels: a regression target is a number" in _problems(
        {**regression, "data": {**regression["data"], "labels": ["a"]}}
    )
    assert "data.label_separator splits a row's labels for multi-label" in _problems(
        {**single, "data": {**single["data"], "label_separator": "|"}}
    )


def test_every_problem_type_has_metrics_of_the_task_and_a_label_kind():
    for problem, names in classification.PROBLEM_METRICS.items():
        config = classification.Config(type="classification", problem_type=problem)
        assert classification.metrics(config) == names and set(names) <= set(classification.METRICS)
    assert classification.METRICS[:2] == ("accuracy", "macro_f1")  # single_label's, as before


# --- metrics ----------------------------------------------------------------------------------------------------


def test_multi_label_metrics_match_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score

    rng = np.random.default_rng(0)
    actual = rng.integers(0, 2, size=(50, 4))
    probs = np.clip(actual * 0.6 + rng.random((50, 4)) * 0.5, 0, 1)
    config = classification.Config(type="classification", problem_type="multi_label", threshold=0.4)
    got = classification.compute_metrics(probs.tolist(), actual.astype(float).tolist(), list("abcd"), config)
    predicted = (probs >= 0.4).astype(int)
    assert got["micro_f1"] == pytest.approx(f1_score(actual, predicted, average="micro"))
    assert got["macro_f1"] == pytest.approx(f1_score(actual, predicted, average="macro"))
    assert got["subset_accuracy"] == pytest.approx(accuracy_score(actual, predicted))
    assert list(got["f1_per_class"].values()) == pytest.approx(f1_score(actual, predicted, average=None).tolist())
    assert "collapsed_to" not in got


def test_regression_metrics_match_scipy():
    from scipy.stats import pearsonr, spearmanr

    rng = np.random.default_rng(1)
    actual = rng.normal(size=80)
    predicted = actual + rng.normal(scale=0.5, size=80)
    config = classification.Config(type="classification", problem_type="regression")
    got = classification.compute_metrics(predicted.tolist(), actual.tolist(), ["y"], config)
    mse = float(np.mean((predicted - actual) ** 2))
    assert got["mse"] == pytest.approx(mse) and got["rmse"] == pytest.approx(mse**0.5)
    assert got["mae"] == pytest.approx(float(np.mean(np.abs(predicted - actual))))
    assert got["pearson"] == pytest.approx(pearsonr(predicted, actual)[0])
    assert got["spearman"] == pytest.approx(spearmanr(predicted, actual)[0])
    assert "collapsed_to" not in got


def test_collapse_is_one_label_set_for_every_row_or_a_constant():
    from peftkit.evaluation import collapse_message
    from peftkit.sections import TrainSection

    multi = classification.Config(type="classification", problem_type="multi_label")
    actual = [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    got = classification.compute_metrics([[0.1, 0.2]] * 4, actual, ["a", "b"], multi)
    assert got["collapsed_to"] == "no label" and got["collapsed_share"] == 0.5
    message = collapse_message(got, TrainSection())
    assert "predicts no label for all 4 rows" in message and "3 different label sets" in message
    assert "a lower train.lr" in message
    got = classification.compute_metrics([[0.9, 0.2]] * 4, actual, ["a", "b"], multi)
    assert got["collapsed_to"] == "the label set {a}"
    regression = classification.Config(type="classification", problem_type="regression")
    got = classification.compute_metrics([0.5, 0.5, 0.5], [0.0, 1.0, 2.0], ["y"], regression)
    assert got["collapsed_to"] == "0.5" and got["pearson"] == 0.0  # constant: no correlation, not NaN
    assert "collapsed to a constant" in collapse_message(got, TrainSection())


def test_multi_label_balanced_class_weights_are_bce_pos_weight():
    import torch
    import torch.nn.functional as F

    train = {"labels": [[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]}  # a: 3 of 4, b: 1 of 4
    assert classification._pos_weight("balanced", train, ["a", "b"]) == pytest.approx([1 / 3, 3.0])
    config = classification.Config(type="classification", problem_type="multi_label", class_weights=[1.0, 2.0])
    loss = classification.loss(config, train, ["a", "b"])
    logits, targets = torch.randn(4, 2), torch.tensor(train["labels"])
    expected = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=torch.tensor([1.0, 2.0]))
    assert torch.allclose(loss(logits, targets), expected)
    with pytest.raises(UserError, match=r"3 weight\(s\) for 2 labels"):
        classification.loss(config.model_copy(update={"class_weights": [1, 2, 3]}), train, ["a", "b"])


# --- training, predict, eval, resume ----------------------------------------------------------------------------


@pytest.mark.parametrize("problem", ["multi_label", "regression"])
def test_a_run_learns_and_predicts_and_evaluates(problem, tmp_path, tiny_bert, tagged_csv):
    recipe = recipe_for(problem, tiny_bert, tagged_csv, tmp_path / "runs")
    # the tiny random BERT learns these slowly through LoRA; fully fine-tuned it does in seconds
    recipe.update(method={"name": "full"}, eval={"before_training": True})
    recipe["train"].update(epochs=6, lr=2e-3)
    done = peftkit_here("run", write_recipe(tmp_path, recipe))
    assert done.returncode == 0, done.stderr
    run = tmp_path / "runs" / "recipe"
    metrics = json.loads((run / "metrics.json").read_text())
    before, after = metrics["before_training"]["test"], metrics["test"]
    if problem == "multi_label":
        assert after["micro_f1"] > before["micro_f1"] + 0.15, (before, after)
        assert set(after) >= {"micro_f1", "macro_f1", "subset_accuracy", "f1_per_class", "predicted_label_sets"}
        assert "collapsed_to" not in after
    else:
        assert after["mse"] < 0.7 * before["mse"] and after["pearson"] > 0.5, (before, after)
    assert ("micro_f1" if problem == "multi_label" else "pearson") in done.stdout  # the CLI's table

    predicted = peftkit_here("predict", run, "the good film was bad", "a plot")
    assert predicted.returncode == 0 and "the good film was bad" in predicted.stdout, predicted.stderr
    from peftkit.loading import load_trained

    recipe_, task, tokenizer, model, labels = load_trained(run)
    rows = task.predict(model, tokenizer, ["good great film", "bad dull plot", "the a"], recipe_.task)
    if problem == "multi_label":
        assert labels == ["neg", "pos"]
        for row in rows:
            assert set(row) == {"text", "labels", "probabilities"} and set(row["probabilities"]) == {"neg", "pos"}
            assert row["labels"] == [k for k, p in row["probabilities"].items() if p >= 0.5]  # most probable first
            assert list(row["probabilities"].values()) == sorted(row["probabilities"].values(), reverse=True)
    else:
        assert labels == ["score"] and all(set(r) == {"text", "value"} and isinstance(r["value"], float) for r in rows)
        assert rows[0]["value"] > rows[1]["value"]  # two positive words above one negative
    again = peftkit_here("eval", run, "--split", "test")
    assert again.returncode == 0, again.stderr
    key = "micro_f1" if problem == "multi_label" else "mse"
    shown = float(re.search(r"test\s*│\s*([0-9.]+)", again.stdout).group(1))  # the first column: the key
    assert shown == pytest.approx(after[key], abs=2e-3)  # bf16 batches padded otherwise than in training


@pytest.mark.parametrize("problem", ["multi_label", "regression"])
def test_the_loss_falls_with_the_tasks_loss(problem, tmp_path, tiny_bert, tagged_csv):
    """The loop's loss for these problem types is the task's (BCE, MSE; never the model's guess from the labels'
    dtype), and training on a batch with it brings it down."""
    import torch

    from peftkit.batches import model_inputs

    from .test_train import job_for

    job = job_for(write_recipe(tmp_path, recipe_for(problem, tiny_bert, tagged_csv, tmp_path / "runs")))
    loss = job.task.loss(job.recipe.task, job.splits["train"], job.labels)
    assert loss is not None
    batch = job.collate([job.splits["train"][i] for i in range(16)])
    inputs = model_inputs(batch)
    targets = inputs.pop("labels")
    assert targets.dtype == torch.float32 and targets.shape == ((16, 2) if problem == "multi_label" else (16,))
    optimizer = torch.optim.AdamW([p for p in job.model.parameters() if p.requires_grad], lr=1e-2)
    job.model.eval()  # no dropout: the same batch, the same loss surface, so the fall is the optimizer's alone
    losses = []
    for _ in range(60):
        with job.accelerator.autocast():  # the base may be held in bf16 (model.dtype auto), as in the loop
            value = loss(job.model(**inputs).logits, targets)
        value.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(value.item())
    assert losses[-1] < 0.8 * losses[0], losses  # BCE starts at ln 2 whatever the model


@pytest.mark.parametrize("problem", ["multi_label", "regression"])
def test_a_resumed_run_ends_as_the_uninterrupted_one(problem, tmp_path, tiny_bert, tagged_csv):
    from peftkit import train
    from peftkit.methods.base import trainable_tensors

    from .test_train import job_for, same

    recipe = recipe_for(problem, tiny_bert, tagged_csv, tmp_path / "runs")
    recipe["train"].update(epochs=2, checkpoint_every=5, keep_checkpoints=9)
    path = write_recipe(tmp_path, recipe)
    whole = job_for(path, tmp_path / "whole")
    expected = train.fit(whole)
    kept = sorted((tmp_path / "whole" / "checkpoints").glob("step-*"), key=lambda k: int(k.name[5:]))
    again = job_for(path)
    result = train.fit(again, resume=kept[0])  # mid-epoch
    assert result["history"] == expected["history"] and result["best_epoch"] == expected["best_epoch"]
    assert same(trainable_tensors(again.model), trainable_tensors(whole.model))


def test_the_shipped_multi_label_recipe_reads_its_label_sets():
    """recipes/entity-types.yaml's data (data/entity-types.jsonl, written by data/entity_types.py): JSON lists,
    62% of them empty, read as label sets over the ten WNUT-16 entity types."""
    from pathlib import Path

    from peftkit.recipe import load_recipe

    root = Path(__file__).parent.parent
    recipe = load_recipe(root / "recipes" / "entity-types.yaml")
    recipe.data.source = str(root / recipe.data.source)  # the recipe names it from the repository's root
    task = TASKS["classification"]
    splits, labels = data.load(recipe.data, task, kind=task.label_kind(recipe.task))
    assert len(labels) == 10 and {"person", "geo-loc", "movie"} <= set(labels)
    rows = [row for split in splits.values() for row in split["label"]]
    assert len(rows) == 2394 and all(len(row) == 10 for row in rows)
    assert 0.55 < sum(not any(row) for row in rows) / len(rows) < 0.7  # tweets that mention no entity
