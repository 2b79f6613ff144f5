"""The model card and training curve of a pushed adapter (`peftkit push`, hub.py): YAML metadata the Hub indexes
(base model, library, pipeline tag, datasets, metrics, tags), then how to use it, the results table, the training
facts, the curve and the recipe it was trained with."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from peftkit import assets
from peftkit.errors import UserError
from peftkit.recipe import Recipe
from peftkit.run_folder import LOG, METRICS, TENSORBOARD
from peftkit.tasks import TASKS

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

LIBRARY = {"peft": "peft", "full": "transformers", "peftkit": "peftkit"}  # adapter format -> what loads it


# --- the model card -------------------------------------------------------------------------------------------


def model_card(
    recipe: Recipe, info: dict, metrics: dict, recipe_text: str, repo_id: str, plot: bool = True
) -> ModelCard:
    """huggingface_hub's ModelCard: metadata the Hub indexes, then what was trained, how, and how well. From a
    finished run: its recipe, its adapter's peftkit.json (`info`), its metrics.json and its recipe.yaml's text."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    task, method, base_model = info["task"], info["method"], info["base_model"]
    pipeline, auto_class = TASKS[task].PIPELINE_TAG, TASKS[task].AUTO_CLASS
    splits = [s for s in recipe.eval.splits if isinstance(metrics.get(s), dict)]
    names = [
        m for m in TASKS[task].metrics(recipe.task) if any(isinstance(metrics[s].get(m), (int, float)) for s in splits)
    ]
    on_hub = _hub_model_id(base_model)
    dataset = _hub_dataset(recipe.data.source)
    results = None
    if dataset:  # model-index entries must name a Hub dataset
        results = [
            EvalResult(
                task_type=pipeline,
                dataset_type=dataset,
                dataset_name=dataset,
                dataset_split=s,
                metric_type=m,
                metric_value=metrics[s][m],
            )
            for s in splits
            for m in names
        ]
    data = ModelCardData(
        base_model=on_hub,
        library_name=LIBRARY[info["format"]],
        pipeline_tag=pipeline,
        datasets=[dataset] if dataset else None,
        metrics=names,
        tags=["peftkit", method, task] + (["lora"] if method != "lora" and "lora" in method else []),
        model_name=repo_id.split("/")[-1],
        eval_results=results,
    )
    lines = [f"# {repo_id.split('/')[-1]}", ""]
    lines += [
        f"A **{method}** {'fine-tune' if info['format'] == 'full' else 'adapter'} of "
        f"{f'[{base_model}](https://huggingface.co/{base_model})' if on_hub else f'`{base_model}`'} for "
        f"**{task.replace('_', ' ')}**, trained with peftkit from the recipe below."
    ]
    if not on_hub:
        lines += ["", f"The base model was a local path (`{base_model}`), so it is not linked; load the same weights."]
    if info.get("labels"):
        lines += ["", "Labels, in id order: " + ", ".join(f"`{label}`" for label in info["labels"]) + "."]
    lines += ["", "## Use it", "", *_usage(repo_id, info, auto_class), ""]
    lines += ["## Results", "", *_results_table(metrics, splits, names), ""]
    lines += ["## Training", "", f"- data: `{recipe.data.source}`", *_training_facts(metrics), ""]
    if plot:
        lines += ["![training curve](training_curve.png)", ""]
    lines += ["## Recipe", "", "```yaml", recipe_text.rstrip(), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def _hub_model_id(name: str) -> str | None:
    """The base model's Hub id, or None for a local path or a pkg:// reference (the Hub rejects those)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith("pkg://") or Path(name).expanduser().exists() or name.count("/") != 1:
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _hub_dataset(source: str) -> str | None:
    try:
        return source if assets.resolve_file(source) is None else None
    except UserError:  # a local file that is gone: not a Hub dataset either
        return None


def _usage(repo_id: str, info: dict, auto_class: str) -> list[str]:
    cli = [
        f'`peftkit predict {repo_id} "your text"` pulls and runs it; `model.adapter: {repo_id}` in a recipe '
        "continues training from it."
    ]
    num_labels = (
        f", num_labels={len(info['labels'])}" if info.get("labels") and auto_class != "AutoModelForCausalLM" else ""
    )
    if info["format"] == "peft":
        return [
            "```python",
            "from peft import PeftModel",
            f"from transformers import {auto_class}",
            "",
            f'base = {auto_class}.from_pretrained("{info["base_model"]}"{num_labels})',
            f'model = PeftModel.from_pretrained(base, "{repo_id}")  # the trained task head comes with it',
            "```",
            "",
            "Or with peftkit: " + cli[0],
        ]
    if info["format"] == "full":
        return [
            "```python",
            f"from transformers import {auto_class}",
            "",
            f'model = {auto_class}.from_pretrained("{repo_id}")',
            "```",
            "",
            "Or with peftkit: " + cli[0],
        ]
    return [f"This method is stored in peftkit's own format (peft cannot express it): {cli[0]}"]


def _results_table(metrics: dict, splits: list[str], names: list[str]) -> list[str]:
    rows = [
        ("before training, " + s, metrics["before_training"][s])
        for s in splits
        if isinstance(metrics.get("before_training", {}).get(s), dict)
    ]
    rows += [(s, metrics[s]) for s in splits]
    table = ["| split | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, values in rows:
        table.append(f"| {label} | " + " | ".join(_number(values.get(m)) for m in names) + " |")
    return table


def _training_facts(metrics: dict) -> list[str]:
    facts = []
    if "trainable_params" in metrics:
        facts.append(
            f"- trainable parameters: {metrics['trainable_params']:,} of {metrics['total_params']:,} "
            f"({100 * metrics['trainable_share']:.3f}%)"
        )
    if "adapter_bytes" in metrics:
        facts.append(f"- adapter size: {metrics['adapter_bytes'] / 2**20:.2f} MiB")
    train = metrics.get("train", {})
    if train:
        history = train.get("history", [])
        epochs = max((entry["epoch"] for entry in history), default=0)
        kept = train.get("best_step") or train.get("best_epoch")  # best_step: since step evaluation
        where = f"step {train['best_step']}" if train.get("best_step") else f"epoch {train.get('best_epoch')}"
        best = f", kept the adapter of {where} (best on validation)" if kept else ""
        stopped = ", stopped early (validation no longer improved)" if train.get("stopped_early") else ""
        facts.append(f"- {epochs} epoch(s), {train.get('steps', '?')} optimizer steps{best}{stopped}")
        search = train.get("lr_search")
        if search:  # train.lr auto
            facts.append(
                f"- learning rate {search['lr']:.3g}, found by a {search['steps']}-step range test "
                f"({search['rule']} rule, {search['seconds']:.0f} s)"
            )
        elif isinstance(train.get("lr"), float):  # the recipe's (train.lr is the last, after any rollbacks)
            facts.append(f"- learning rate {train['lr'] * 2 ** len(train.get('recoveries', [])):g}")
        for event in train.get("recoveries", []):  # train.recover's rollbacks, each halving the rate
            facts.append(
                f"- rolled back at step {event['at_step']} to step {event['back_to_step']}, the learning rate "
                f"halved to {event['lr']:.3g} ({event['why']})"
            )
    if "precision" in metrics:
        facts.append(f"- precision {metrics['precision']} on {metrics.get('device', '?')}")
    return facts


def _number(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


# --- the training curve ---------------------------------------------------------------------------------------


def training_curve(run_dir: Path, out: Path, metric: str) -> bool:
    """Training loss by step and the validation `metric` by epoch (the one the run kept its best epoch by: the first
    numeric one would be NER's overall_precision), as a PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / METRICS).read_text(encoding="utf-8"))
    history = metrics.get("train", {}).get("history", [])
    losses = train_losses(run_dir)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    if losses:
        left.plot([s for s, _ in losses], [v for _, v in losses], color="tab:blue")
    left.set(title="training loss", xlabel="optimizer step", ylabel="loss")
    scored = [(e["step"], e["validation"]) for e in history if isinstance(e.get("validation"), dict)]
    if scored:
        right.plot([s for s, _ in scored], [v[metric] for _, v in scored], marker="o", color="tab:green")
        right.set(ylabel=metric)
    right.set(title="validation, each epoch", xlabel="optimizer step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) from the run's TensorBoard scalars; runs made before TensorBoard logging (or without the
    package) have them only in train.log, where the training loop writes 'step N  loss X' every log interval."""
    events = Path(run_dir) / TENSORBOARD
    if events.is_dir():
        try:
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        except ImportError:
            EventAccumulator = None
        if EventAccumulator is not None:
            acc = EventAccumulator(str(events))
            acc.Reload()
            if "train/loss" in acc.Tags().get("scalars", []):
                return [(e.step, e.value) for e in acc.Scalars("train/loss")]
    logged = Path(run_dir) / LOG
    if not logged.is_file():
        return []
    found = re.findall(r" step (\d+)\s+loss ([0-9.eE+-]+|nan|inf)", logged.read_text(encoding="utf-8"))
    return [(int(step), float(loss)) for step, loss in found]
