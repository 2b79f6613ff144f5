"""`peftkit sweep RECIPE method.r=4,8,16 train.lr=1e-4,3e-4`: run every combination of the values given, then
table the results (metric, time, memory, trainable share) and write the best run's recipe.

    grid -> one full `peftkit run` per combination, each in its own process (bench.run_apart)
         -> results.json, results.md, best.yaml (the winner's fully resolved recipe) in the sweep folder

The best run is chosen on validation (eval.metric_for_best), never on test: test stays the held-out estimate.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import statistics
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from peftkit import atomic
from peftkit.errors import UserError
from peftkit.evaluation import LOWER_IS_BETTER  # the same direction as the best-epoch choice
from peftkit.experiments import bench
from peftkit.recipe import load_recipe
from peftkit.run_folder import RECIPE


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """{'method.r': ['4', '8']} from ['method.r=4,8']; commas inside [...] or {...} stay in their value."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise UserError(f"sweep: '{item}' is not key=value1,value2,... (e.g. method.r=4,8,16)")
        if key in grid:
            raise UserError(f"sweep: {key} is given twice; list all its values once: {key}=a,b,c")
        grid[key] = _split_values(values)
    if not grid:
        raise UserError("sweep: give at least one key=value1,value2,... to vary (e.g. train.lr=1e-4,3e-4)")
    return grid


def _split_values(text: str) -> list[str]:
    values, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    return [v.strip() for v in [*values, current] if v.strip()]


def combinations(recipe: Path, grid: dict[str, list[str]]) -> list[list[str]]:
    """Every combination as override lists, each checked against the recipe schema before anything runs."""
    runs = [[f"{k}={v}" for k, v in zip(grid, values)] for values in itertools.product(*grid.values())]
    for overrides in runs:
        load_recipe(recipe, overrides)
    return runs


def name_of(overrides: list[str]) -> str:
    """A folder name for a combination: 'method.r=8_train.lr=3e-4' with anything unsafe replaced."""
    return "_".join(overrides).translate(str.maketrans({c: "-" for c in "/\\ :[]{}'\",*?<>|"}))


def run_all(
    recipe: Path,
    runs: list[list[str]],
    folder: Path,
    on_start: Callable[[str], object] | None = None,
    on_done: Callable[[list[dict]], object] | None = None,
    jobs: int = 1,
) -> list[dict]:
    """Every combination as its own `peftkit run` process, `jobs` at a time (several small runs share a GPU
    well; on a CPU they share its cores, `threads_each` of them each). `on_done` gets the rows finished so far,
    in grid order, after each run: the sweep keeps its results when it is stopped half-way."""
    env = threads_each(jobs)
    done: dict[int, dict] = {}
    lock = threading.Lock()  # the threads only wait on their run's process; callbacks run one at a time

    def one(index: int) -> None:
        overrides = runs[index]
        name = name_of(overrides)
        if on_start:
            with lock:
                on_start(name)
        row = _row(name, overrides, bench.run_apart(recipe, overrides, folder / "runs" / name, env))
        with lock:
            done[index] = row
            if on_done:
                on_done([done[i] for i in sorted(done)])

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, range(len(runs))))
    return [done[i] for i in range(len(runs))]


def threads_each(jobs: int) -> dict[str, str] | None:
    """The environment of runs that go `jobs` at a time: the CPU's cores divided between them (OMP_NUM_THREADS),
    as `peftkit run --processes` divides them. Each torch process otherwise takes every core, and `jobs` of them
    oversubscribe the CPU: two runs at once on 2 cores took ~3x as long each, not 2x (benchmarks/RESULTS.md,
    Sweeps). None (this environment as it is) for one job at a time, or when OMP_NUM_THREADS is set already."""
    if jobs == 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    return {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}


def _row(name: str, overrides: list[str], outcome: tuple[dict, dict] | str) -> dict:
    if isinstance(outcome, str):
        return {"run": name, "overrides": overrides, "error": outcome}
    metrics, resolved = outcome
    chosen = "validation" if "validation" in resolved["eval"]["splits"] else resolved["eval"]["splits"][0]
    return {
        "run": name,
        "overrides": overrides,
        "metric": resolved["eval"]["metric_for_best"],
        "selection_split": chosen,
        "selection": metrics[chosen][resolved["eval"]["metric_for_best"]],
        "test": metrics.get("test", {}).get(resolved["eval"]["metric_for_best"]),
        "train_seconds": metrics["train"]["seconds"],
        "peak_memory_mib": bench.peak_mib(metrics["memory"]["train_peak"]),
        "trainable_share": metrics["trainable_share"],
        "collapsed": bool(metrics.get("warnings")),  # the kept model answers one class (run.py)
    }


def best(rows: list[dict]) -> dict | None:
    done = [r for r in rows if "error" not in r]
    if not done:
        return None
    sign = -1 if done[0]["metric"] in LOWER_IS_BETTER else 1
    return max(done, key=lambda r: sign * r["selection"])


def over_seeds(rows: list[dict]) -> list[dict]:
    """Per configuration (a run's overrides but train.seed) that ran with several seeds: the median, min and max
    of its validation (selection) and test scores, and how many seeds ended collapsed. A quality claim is a
    spread over seeds, not one lucky run."""
    groups: dict[tuple[str, ...], list[dict]] = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault(tuple(o for o in r["overrides"] if not o.startswith("train.seed=")), []).append(r)
    summaries = []
    for overrides, group in groups.items():
        if len(group) < 2:
            continue
        summary = {"overrides": list(overrides), "seeds": len(group), "metric": group[0]["metric"]}
        for score in ("selection", "test"):
            values = sorted(r[score] for r in group if r[score] is not None)
            if values:
                summary[score] = {"median": statistics.median(values), "min": values[0], "max": values[-1]}
        summary["collapsed"] = sum(r["collapsed"] for r in group)
        summaries.append(summary)
    return summaries


def write(folder: Path, rows: list[dict], winner: dict | None) -> None:
    results = {"best": winner and winner["run"], "runs": rows, "over_seeds": over_seeds(rows)}
    atomic.write_text(folder / "results.json", json.dumps(results, indent=2))
    atomic.write_text(folder / "results.md", markdown(rows, winner))
    if winner is not None:
        shutil.copy(folder / "runs" / winner["run"] / RECIPE, folder / "best.yaml")


def markdown(rows: list[dict], winner: dict | None) -> str:
    done = [r for r in rows if "error" not in r]
    metric = done[0]["metric"] if done else "metric"
    lines = [
        f"| run | validation {metric} | test {metric} | training (s) | peak memory (MiB) | trainable |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {' '.join(r['overrides'])} | failed: {r['error']} | | | | |")
            continue
        mark = " **(best)**" if winner is r else ""
        test = f"{r['test']:.4f}" if r["test"] is not None else "-"
        lines.append(
            f"| {' '.join(r['overrides'])}{mark} | {r['selection']:.4f} | {test} | {r['train_seconds']:.0f} "
            f"| {r['peak_memory_mib']:,.0f} | {100 * r['trainable_share']:.2f}% |"
        )
    summaries = over_seeds(rows)
    if summaries:
        lines += ["", f"Over seeds (median, min–max of {metric}):", ""]
        lines += ["| configuration | seeds | validation | test | collapsed |", "|---|---|---|---|---|"]
        for summary in summaries:
            lines.append(
                f"| {' '.join(summary['overrides']) or '(the recipe)'} | {summary['seeds']} "
                f"| {spread(summary.get('selection'))} | {spread(summary.get('test'))} | {summary['collapsed']} |"
            )
    return "\n".join(lines) + "\n"


def spread(scores: dict | None) -> str:
    """'0.8412 (0.8376–0.8455)': a median with its min and max."""
    return "-" if scores is None else f"{scores['median']:.4f} ({scores['min']:.4f}–{scores['max']:.4f})"
