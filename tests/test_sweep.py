"""`peftkit sweep`: a grid of overrides, each a full run; the table, and the best recipe chosen on validation."""

import json
import os

import pytest

from peftkit.errors import UserError
from peftkit.experiments import sweep
from peftkit.recipe import load_recipe

from .conftest import peftkit


def test_grid_parsing_and_checks(recipe_file):
    grid = sweep.parse_grid(["method.r=2,4", "eval.splits=[validation,test],[test]", "train.lr=1e-3"])
    assert grid == {"method.r": ["2", "4"], "eval.splits": ["[validation,test]", "[test]"], "train.lr": ["1e-3"]}
    runs = sweep.combinations(recipe_file(), grid)
    assert len(runs) == 4 and runs[0] == ["method.r=2", "eval.splits=[validation,test]", "train.lr=1e-3"]
    assert sweep.name_of(runs[1]) == "method.r=2_eval.splits=-test-_train.lr=1e-3"
    for bad, message in (
        (["method.r"], "not key=value1"),
        (["method.r=2", "method.r=4"], "given twice"),
        ([], "at least one"),
    ):
        with pytest.raises(UserError, match=message):
            sweep.parse_grid(bad)
    with pytest.raises(UserError, match="method.rr"):  # every combination is checked before anything runs
        sweep.combinations(recipe_file(), {"method.rr": ["2"]})


def test_sweep_runs_the_grid_and_writes_the_best_recipe(recipe_file, tmp_path):
    out = tmp_path / "sweep"
    result = peftkit("sweep", recipe_file(), "method.r=2,4", "train.max_steps=3", "--out", out)
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    rows = results["runs"]
    assert [r["overrides"][0] for r in rows] == ["method.r=2", "method.r=4"]
    assert all(r["selection_split"] == "validation" and 0 <= r["selection"] <= 1 for r in rows)
    winner = max(rows, key=lambda r: r["selection"])
    assert results["best"] == winner["run"]
    best = load_recipe(out / "best.yaml")
    assert f"method.r={best.method.r}" == winner["overrides"][0] and best.train.max_steps == 3
    assert "(best)" in (out / "results.md").read_text() and "best on validation accuracy" in result.stdout


def test_runs_over_seeds_are_summarised_as_median_min_max():
    def row(overrides, selection, test, collapsed=False):
        return {
            **{"overrides": overrides, "metric": "accuracy", "selection": selection, "test": test},
            **{"collapsed": collapsed, "train_seconds": 60, "peak_memory_mib": 900, "trainable_share": 0.01},
        }

    rows = [
        row(["method.r=4", "train.seed=1"], 0.80, 0.70),
        row(["method.r=4", "train.seed=2"], 0.90, 0.72, collapsed=True),
        row(["method.r=4", "train.seed=3"], 0.85, 0.71),
        row(["method.r=8", "train.seed=1"], 0.5, 0.5),  # one seed: no spread to give
        {"overrides": ["method.r=8", "train.seed=2"], "error": "out of memory"},
    ]
    (summary,) = sweep.over_seeds(rows)
    assert summary["overrides"] == ["method.r=4"] and summary["seeds"] == 3 and summary["collapsed"] == 1
    assert summary["selection"] == {"median": 0.85, "min": 0.80, "max": 0.90}
    assert summary["test"] == {"median": 0.71, "min": 0.70, "max": 0.72}
    assert "| method.r=4 | 3 | 0.8500 (0.8000–0.9000) | 0.7100 (0.7000–0.7200) | 1 |" in sweep.markdown(rows, None)


def test_parallel_runs_keep_grid_order_and_results_are_written_as_runs_finish(monkeypatch, tmp_path):
    import time

    from peftkit.experiments import bench

    threads = []

    def fake_run(recipe, overrides, out, env):
        threads.append(env["OMP_NUM_THREADS"])
        r = int(overrides[0].split("=")[1])
        time.sleep(0.05 * (4 - r))  # the first run of the grid finishes last
        if r == 3:
            return "out of memory"
        metrics = {"validation": {"accuracy": r / 10}, "train": {"seconds": 1.0}, "memory": {"train_peak": {}}}
        metrics["trainable_share"] = 0.01
        return metrics, {"eval": {"splits": ["validation"], "metric_for_best": "accuracy"}}

    monkeypatch.setattr(bench, "run_apart", fake_run)
    monkeypatch.setattr(bench, "peak_mib", lambda peak: 0.0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    runs = [[f"method.r={r}"] for r in (1, 2, 3)]
    seen = []
    rows = sweep.run_all(tmp_path / "r.yaml", runs, tmp_path, on_done=lambda done: seen.append(len(done)), jobs=3)
    assert threads == ["2", "2", "2"]  # 8 cores shared by 3 runs at once, not 8 threads each
    assert [r["overrides"] for r in rows] == runs  # grid order, not finishing order
    assert rows[2] == {"run": "method.r=3", "overrides": ["method.r=3"], "error": "out of memory"}
    assert seen == [1, 2, 3]  # called after every run, one at a time
    assert sweep.best(rows)["run"] == "method.r=2"


def test_runs_one_at_a_time_keep_the_threads_they_would_have(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert sweep.threads_each(1) is None  # the whole CPU, as `peftkit run` alone
    assert sweep.threads_each(2)["OMP_NUM_THREADS"] == "1"
    assert sweep.threads_each(4)["OMP_NUM_THREADS"] == "1"  # never 0
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert sweep.threads_each(2) is None  # the user's own setting wins
