"""Data parallelism: `peftkit run --processes 2` on CPU (torchrun's launcher, gloo), one tiny model."""

import json
import math

from peftkit import train
from peftkit.recipe import TrainSection

from .conftest import peftkit, peftkit_here


def test_an_epoch_has_fewer_steps_per_process():
    cfg = TrainSection(epochs=2, batch_size=16, grad_accum=1)
    assert train.total_steps(160, cfg) == 20
    assert train.total_steps(160, cfg, processes=2) == 10
    assert train.total_steps(161, cfg, processes=2) == 2 * math.ceil(161 / 32)
    assert train.total_steps(160, TrainSection(max_steps=7), processes=4) == 7  # optimizer steps, as given


def test_two_processes_train_once_and_score_every_row_once(tmp_path, recipe_file):
    # 200 rows -> 160 / 20 / 20; eval batches of 3 do not divide 20 rows evenly over 2 processes
    recipe = recipe_file(eval={"batch_size": 3, "splits": ["validation", "test"]})
    result = peftkit("run", recipe, "--processes", "2", "train.epochs=2", "train.log_every=1")
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "recipe"
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["recipe"]  # no .partial left, written once
    assert result.stdout.count("run folder:") == 1  # reported by the main process only
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["processes"] == 2
    assert metrics["train"]["steps"] == 2 * math.ceil(160 / (16 * 2))  # each step: 16 rows in each process
    for split in ("validation", "test"):
        assert metrics[split]["rows"] == 20  # gathered predictions: none duplicated, none dropped
    # the exported adapter, evaluated in one process, scores what the two processes reported
    alone = peftkit_here("eval", run_dir, "--split", "validation")
    assert alone.returncode == 0, alone.stderr
    accuracy = metrics["validation"]["accuracy"]
    assert f"{accuracy:.4f}" in alone.stdout
    assert (run_dir / "train.log").read_text().count("training: 2 epoch(s)") == 1


def test_a_user_error_in_the_processes_exits_2(tmp_path, recipe_file, sentiment_csv):
    # found by the processes once they read the data (the recipe itself is valid)
    data = {"source": str(sentiment_csv), "columns": {"text": "review", "label": "sentiment"}, "labels": ["neg", "meh"]}
    result = peftkit("run", recipe_file(data=data), "--processes", "2")
    assert result.returncode == 2, result.stderr
    assert "'pos'" in result.stderr and not (tmp_path / "runs" / "recipe").exists()
