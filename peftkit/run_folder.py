"""The run folder `peftkit run` leaves, by name, and how to tell a finished one (or a pushed adapter repo).

    runs/<name>/
        recipe.yaml      the fully resolved recipe the run trained with
        metrics.json     per-split metrics, history, parameter counts, throughput, memory
        train.log        the whole log, debug lines included
        memory.json      the main process's memory over the run, sampled, with its phases (memory.png: plotted)
        lr_search.json   train.lr: auto's range test, the curve and the rate it chose (lr_search.png: plotted)
        adapter/         the trained adapter in its method's format, the tokenizer, and peftkit.json
        tensorboard/     scalars (train.report_to: tensorboard, the default)
        mlruns/          an MLflow file store (train.report_to: mlflow)
        wandb/           a W&B offline run (train.report_to: wandb)
    runs/<name>.partial/ while it runs (checkpoints/ inside); renamed when complete (atomic.py)

A pushed adapter repo (sharing/hub.py) holds adapter/'s files at its root, beside recipe.yaml and metrics.json.
"""

import json
from pathlib import Path

from peftkit.errors import UserError
from peftkit.recipe import Recipe, load_recipe

RECIPE = "recipe.yaml"
METRICS = "metrics.json"
LOG = "train.log"
MEMORY = "memory.json"
MEMORY_PLOT = "memory.png"
LR_SEARCH = "lr_search.json"
LR_SEARCH_PLOT = "lr_search.png"
ADAPTER = "adapter"
TENSORBOARD = "tensorboard"
MLRUNS = "mlruns"
WANDB = "wandb"
INFO = "peftkit.json"  # in the adapter folder: task, method, format, base model, labels (export.save_adapter)


def adapter_folder(folder: Path) -> Path | None:
    """Where the adapter of a run folder (adapter/) or of a pushed/pulled repo (the root) lies; None if neither."""
    folder = Path(folder)
    for candidate in (folder / ADAPTER, folder):
        if (candidate / INFO).is_file() and (folder / RECIPE).is_file():
            return candidate
    return None


def finished_adapter(run_dir: Path) -> tuple[Path, Recipe, dict]:
    """(adapter folder, recipe, peftkit.json: task, method, format, base model, labels) of a finished run or a
    pushed adapter repo; a clear error for anything else."""

    run_dir = Path(run_dir)
    adapter_dir = adapter_folder(run_dir)  # adapter/ in a run folder; the root of a pushed or pulled repo
    if adapter_dir is None:
        hint = " (an unfinished run: it has .partial in its name)" if run_dir.name.endswith(".partial") else ""
        raise UserError(
            f"{run_dir} is not a finished peftkit run folder (adapter/peftkit.json and recipe.yaml) "
            f"or a pushed adapter repo (peftkit.json and recipe.yaml){hint}"
        )
    info = json.loads((adapter_dir / INFO).read_text(encoding="utf-8"))
    return adapter_dir, load_recipe(run_dir / RECIPE), info


def finished_run(run_dir: Path) -> tuple[Path, Recipe, dict]:
    """finished_adapter's answer for a run (or a pulled repo, to push it again) that also has the metrics a model
    card is made from; or a clear error."""
    found = finished_adapter(run_dir)
    if (Path(run_dir) / METRICS).is_file():
        return found
    raise UserError(
        f"{run_dir} has no {METRICS}, which the model card is made from; push the folder `peftkit run` printed"
    )
