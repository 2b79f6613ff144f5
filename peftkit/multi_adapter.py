"""Several adapters on one base model: predict with each without reloading the base, and combine LoRA adapters
into a new one with peft's add_weighted_adapter.

Predicting: the base is loaded once; every run's adapter is loaded onto the same PeftModel under its own name
(PeftModel.load_adapter) and set_adapter switches between them. peft keeps one copy of the task head per adapter
(modules_to_save), so switching switches the head too; the label names are switched on the model config, so each
run keeps its own. Only peft-format adapters of one peft method can share a base (a PeftModel holds one adapter
type); peftkit's own formats change the base in place and full fine-tuning is a whole model.

Combining: add_weighted_adapter combines the LoRA matrices only, and refuses outright when two of the adapters
carry a copy of the same module in modules_to_save, which is where every task head lives (classification, NER,
QA). So the heads are taken aside first and combined here: the weighted average of the heads, with the weights
normalised to sum to 1 (a head is not an update to a shared start, so it is averaged, never summed or
subtracted), and only when the runs share the label list in the same order (the rows of a head are per label).
Causal LM has no head (its output layer is the frozen, tied embedding). The result is written as a finished run
folder that predict, eval and merge take like any other.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit import atomic, export
from peftkit.errors import UserError, did_you_mean
from peftkit.evaluation import evaluate_run
from peftkit.loading import load_base
from peftkit.recipe import Recipe, validate
from peftkit.run_folder import METRICS, RECIPE, finished_adapter
from peftkit.sharing.hub import resolve_run
from peftkit.tasks import TASKS

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from peft.utils.other import ModulesToSaveWrapper
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("peftkit")

# peft's combination types (LoraModel.add_weighted_adapter) and what each needs
COMBINATIONS = (
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
NEEDS_DENSITY = set(COMBINATIONS) - {"linear", "cat", "svd"}  # the pruning ones: ties, dare_*, magnitude_prune*
NEEDS_EQUAL_RANK = {"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"}  # they mix A and B as they are
COMBINED = "default"  # peft saves the adapter named "default" at the folder's root (others go in a subfolder)


@dataclass
class Source:
    """A finished run used as one of several adapters."""

    ref: str  # as the user gave it
    run_dir: Path
    adapter_dir: Path
    recipe: Recipe
    info: dict  # adapter/peftkit.json: task, method, format, base model, labels
    name: str  # its adapter name in the PeftModel
    label: str  # its columns' name in the predictions: the run folder's name

    @property
    def labels(self) -> list[str] | None:
        return self.info["labels"]


def read(refs: Sequence[str | Path], hub_dir: Path | str | None = None) -> list[Source]:
    """The runs named by `refs` (folders or user/name[@revision]), with unique adapter names."""
    sources, seen = [], set()
    for ref in refs:
        run_dir = resolve_run(ref, hub_dir)
        if run_dir.resolve() in seen:
            raise UserError(f"{ref} is given twice; name each run once")
        seen.add(run_dir.resolve())
        adapter_dir, recipe, info = finished_adapter(run_dir)
        # The adapter name becomes a key in peft's ModuleDicts, where a run called e.g. "half" or "train" would
        # clash with a torch.nn.Module method: numbered names; the run's own name labels its columns.
        local = Path(str(ref)).exists()  # else pulled by name into a cache folder: the name labels it
        label = run_dir.name if local and run_dir.name not in {s.label for s in sources} else str(ref)
        sources.append(Source(str(ref), run_dir, adapter_dir, recipe, info, f"run{len(sources)}", label))
    return sources


def check_shared_base(sources: list[Source], purpose: str) -> None:
    """Runs that can share one loaded base: same base model, quantization and task, adapters in peft's format."""
    first = sources[0]
    for s in sources:
        fmt, method = s.info["format"], s.info["method"]
        if fmt != "peft":
            why = (
                "is a whole fine-tuned model, not an adapter on the shared base"
                if fmt == "full"
                else f"is saved in peftkit's own format ({method} changes the base model's layers in place, so it "
                "cannot sit next to other adapters on one base)"
            )
            raise UserError(
                f"{purpose}: run {s.ref} ({method}) {why}; only adapters in peft's format can share a "
                f"base. Use `peftkit predict {s.ref}` on its own"
            )
    for s in sources[1:]:
        for what, mine, theirs in (
            ("base model", _base(s), _base(first)),
            ("quantization", _quant(s), _quant(first)),
            ("task", s.recipe.task.type, first.recipe.task.type),
        ):
            if mine != theirs:
                raise UserError(
                    f"{purpose}: runs {first.ref} and {s.ref} differ in {what} ({theirs} vs {mine}); "
                    f"adapters share a base only when trained on the same base model, quantization and "
                    f"task: give runs that match, or use each one on its own"
                )


def _base(s: Source) -> str:
    return s.recipe.model.name + (f"@{s.recipe.model.revision}" if s.recipe.model.revision else "")


def _quant(s: Source) -> str:
    q = s.recipe.quantization
    return "none (full precision)" if q is None else ", ".join(f"{k} {v}" for k, v in q.model_dump().items())


def _peft_config(s: Source) -> dict:
    return json.loads((s.adapter_dir / "adapter_config.json").read_text())


def _load_onto_one_base(sources: list[Source], device: torch.device, recipe: Recipe | None = None) -> PeftModel:
    """One base (the first run's, or `recipe`'s), every source's adapter on it under its own name."""
    from peft import PeftModel

    first = sources[0]
    recipe = recipe or first.recipe
    _, base = load_base(recipe, TASKS[recipe.task.type], first.labels, device, inference=True)  # predict only
    model = PeftModel.from_pretrained(base, first.adapter_dir, adapter_name=first.name)
    for s in sources[1:]:
        model.load_adapter(s.adapter_dir, adapter_name=s.name)
    return model.to(device).eval()


# --- predict --------------------------------------------------------------------------------------------------


@dataclass
class Loaded:
    """One base with several runs' adapters: what `predict` switches between."""

    model: PeftModel
    sources: list[Source]
    tokenizers: dict[str, PreTrainedTokenizerBase]  # adapter name -> the run's own tokenizer (padding side included)

    @property
    def recipe(self) -> Recipe:
        return self.sources[0].recipe


def load(refs: Sequence[str | Path], hub_dir: Path | str | None = None, device: torch.device | None = None) -> Loaded:
    """Load the base once and every run's adapter onto it; refuses runs that cannot share it."""
    import torch
    from transformers import AutoTokenizer

    sources = read(refs, hub_dir)
    check_shared_base(sources, "predict")
    types = {s.ref: _peft_config(s)["peft_type"] for s in sources}
    if len(set(types.values())) > 1:
        listed = ", ".join(f"{ref} ({t.lower()})" for ref, t in types.items())
        raise UserError(
            f"predict: the runs use different peft methods ({listed}); a peft model holds adapters of "
            "one method type only. Give runs of one method, or predict with each on its own"
        )
    sizes = {s.ref: len(s.labels or []) for s in sources}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{ref} ({n} labels)" for ref, n in sizes.items())
        raise UserError(
            f"predict: the runs' heads differ in size ({listed}); peft copies the base's one head for "
            "every adapter, so all must have the same number of labels. Predict with each on its own"
        )
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = _load_onto_one_base(sources, device)
    tokenizers = {s.name: AutoTokenizer.from_pretrained(s.adapter_dir) for s in sources}
    return Loaded(model, sources, tokenizers)


def use(loaded: Loaded, source: Source) -> None:
    """Make `source` the adapter (and head) in effect, with its own label names."""
    loaded.model.set_adapter(source.name, inference_mode=True)
    if source.labels:  # the tasks' predict read label names from the config
        config = loaded.model.config
        config.id2label = dict(enumerate(source.labels))
        config.label2id = {label: i for i, label in enumerate(source.labels)}


def predict(loaded: Loaded, items: list[str], **options: Any) -> list[dict]:
    """Each run's predictions for `items`, one row per item: the input, then each run's outputs under
    "<run> <field>" (e.g. "sentiment-a label")."""
    task = TASKS[loaded.recipe.task.type]
    per_run = {}
    for s in loaded.sources:
        use(loaded, s)
        per_run[s.label] = task.predict(loaded.model, loaded.tokenizers[s.name], items, s.recipe.task, **options)
    rows = []
    for i in range(len(items)):
        first = per_run[loaded.sources[0].label][i]
        key = next(iter(first))  # every task's predict row starts with its input (text, question, prompt)
        row = {key: first[key]}
        for name, results in per_run.items():
            row.update({f"{name} {k}": v for k, v in results[i].items() if k != key})
        rows.append(row)
    return rows


# --- combine --------------------------------------------------------------------------------------------------


def check_combination(how: str, weights: list[float], runs: int, density: float | None, svd_rank: int | None) -> None:
    """The options, checked before anything is loaded."""
    if how not in COMBINATIONS:
        raise UserError(
            f"--how {how}: not one of peft's combinations{did_you_mean(how, COMBINATIONS)}; choose "
            f"one of {', '.join(COMBINATIONS)}"
        )
    if runs < 2:
        raise UserError("combine: give at least two runs to combine")
    if len(weights) != runs:
        raise UserError(f"--weights: {len(weights)} weight(s) for {runs} runs; give one per run, in the runs' order")
    if how in NEEDS_DENSITY:
        if density is None:
            raise UserError(
                f"--how {how} prunes each update to a fraction of its entries: give --density in (0, 1], "
                "e.g. --density 0.5"
            )
        if not 0 < density <= 1:
            raise UserError(f"--density {density:g}: must be in (0, 1] (the fraction of entries kept)")
    elif density is not None:
        raise UserError(
            f"--density is for the pruning combinations ({', '.join(sorted(NEEDS_DENSITY))}); "
            f"--how {how} keeps every entry: leave --density out"
        )
    if svd_rank is not None and not how.endswith("svd"):
        raise UserError(
            f"--svd-rank is for the combinations that end in svd; --how {how} does not truncate: leave it out"
        )
    if svd_rank is not None and svd_rank < 1:
        raise UserError(f"--svd-rank {svd_rank}: must be at least 1")


def _check_combinable(sources: list[Source], how: str, weights: list[float]) -> None:
    """What add_weighted_adapter can combine, said before the base is loaded."""
    check_shared_base(sources, "combine")
    first = sources[0]
    for s in sources:
        method = s.recipe.method
        if s.info["method"] != "lora":
            raise UserError(
                f"combine: run {s.ref} is {s.info['method']}; peft's add_weighted_adapter combines LoRA "
                "adapters only (method.name: lora)"
            )
        if method.dora:
            raise UserError(
                f"combine: run {s.ref} uses DoRA; add_weighted_adapter combines the low-rank matrices "
                "but not DoRA's magnitude vectors, so the result would be wrong: combine plain LoRA runs"
            )
        if method.bias != "none":
            raise UserError(
                f"combine: run {s.ref} trained biases (method.bias: {method.bias}); they live in the "
                "base layers, which add_weighted_adapter does not combine: combine runs with bias: none"
            )
    if how in NEEDS_EQUAL_RANK:
        ranks = {s.ref: _rank(_peft_config(s)) for s in sources}
        if len(set(ranks.values())) > 1:
            listed = ", ".join(f"{ref} r={r}" for ref, r in ranks.items())
            raise UserError(
                f"--how {how} mixes the A and B matrices entry by entry, so the ranks must be equal "
                f"({listed}); use --how cat (rank {sum(ranks.values())}, exact) or svd (--svd-rank)"
            )
    for s in sources:
        if s.labels != first.labels:
            raise UserError(
                f"combine: runs {first.ref} and {s.ref} have different labels ({first.labels} vs "
                f"{s.labels}); their heads can only be averaged over the same labels in the same order"
            )
    if _has_head(first) and (any(w < 0 for w in weights) or sum(weights) <= 0):
        raise UserError(
            f"--weights {','.join(f'{w:g}' for w in weights)}: the task heads are averaged with the "
            "weights, which needs them non-negative and not all zero (a head cannot be subtracted)"
        )


def _rank(config: dict) -> int:
    """The largest rank of an adapter, as peft allocates it (rank_pattern overrides r per layer)."""
    return max([config["r"], *(config.get("rank_pattern") or {}).values()])


def _has_head(s: Source) -> bool:
    return bool(_peft_config(s).get("modules_to_save"))


def _take_heads_aside(model: PeftModel, names: list[str]) -> dict[ModulesToSaveWrapper, list[dict]]:
    """{wrapper: [state dict of each source's head copy]}; the copies are removed from the wrappers, as
    add_weighted_adapter refuses adapters that share a modules_to_save module."""
    from peft.utils.other import ModulesToSaveWrapper

    heads = {}
    for wrapper in (m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)):
        present = [n for n in names if n in wrapper.modules_to_save]
        if not present:
            continue
        if len(present) != len(names):  # cannot happen with one task; said plainly should it ever
            raise UserError(
                f"combine: only some of the runs have a trained copy of this head ({wrapper}); their "
                "heads cannot be averaged"
            )
        heads[wrapper] = [
            {k: v.detach().clone() for k, v in wrapper.modules_to_save[n].state_dict().items()} for n in names
        ]
        for n in names:
            wrapper.delete_adapter(n, None)
    return heads


def _put_heads(heads: dict[ModulesToSaveWrapper, list[dict]], weights: list[float]) -> None:
    """The weighted average of each head (weights normalised to sum 1) as the combined adapter's copy."""
    share = [w / sum(weights) for w in weights]
    for wrapper, states in heads.items():
        if COMBINED not in wrapper.modules_to_save:
            wrapper.update(COMBINED)
        averaged = {k: sum(p * state[k] for p, state in zip(share, states)) for k in states[0]}
        wrapper.modules_to_save[COMBINED].load_state_dict(averaged)


def default_out(sources: list[Source], how: str) -> Path:
    """A+B-linear next to the first run (in runs/ when it was pulled by name)."""
    first = sources[0]
    parent = first.run_dir.parent if Path(first.ref).exists() else Path("runs")
    return parent / ("+".join(re.sub(r"[^\w.@-]", "_", s.label) for s in sources) + f"-{how}")


def combine(
    refs: Sequence[str | Path],
    weights: list[float],
    how: str,
    out: Path | None = None,
    density: float | None = None,
    svd_rank: int | None = None,
    overwrite: bool = False,
    hub_dir: Path | str | None = None,
) -> dict:
    """Combine the runs' LoRA adapters with add_weighted_adapter into a new finished run folder; returns what
    was combined (also written to combine.json there)."""
    check_combination(how, weights, len(refs), density, svd_rank)
    sources = read(refs, hub_dir)
    _check_combinable(sources, how, weights)
    out = Path(out) if out else default_out(sources, how)
    with atomic.building(out, overwrite) as folder:  # an existing output is refused before anything is loaded
        model, heads = _combined_model(sources, weights, how, density, svd_rank)
        _write_run(folder, out, model, sources, weights, how, density, svd_rank, len(heads))
        del model
        # scored like `peftkit eval` scores it (the recipe's base, quantised if the runs' was), so the combination
        # is judged next to its sources and can be pushed with its results

        atomic.write_text(folder / METRICS, json.dumps(evaluate_run(folder), indent=2))
    log.info("combined %d adapters (%s) into %s", len(sources), how, out)
    return {
        **json.loads((out / "combine.json").read_text()),
        "output": str(out),
        "metrics": json.loads((out / METRICS).read_text()),
    }


def _combined_model(
    sources: list[Source], weights: list[float], how: str, density: float | None, svd_rank: int | None
) -> tuple[PeftModel, dict[ModulesToSaveWrapper, list[dict]]]:
    """(PeftModel holding only the combined adapter, with the averaged heads; the heads taken aside)."""
    import torch

    first = sources[0]
    # The LoRA matrices do not depend on the base's precision: combine on a full-precision base, on the CPU
    full_precision = first.recipe.model_copy(update={"quantization": None})
    model = _load_onto_one_base(sources, torch.device("cpu"), full_precision)
    names = [s.name for s in sources]
    heads = _take_heads_aside(model, names)
    torch.manual_seed(first.recipe.train.seed)  # dare_* drop entries at random: the same result every time
    try:
        model.base_model.add_weighted_adapter(
            names, weights, COMBINED, combination_type=how, density=density, svd_rank=svd_rank
        )
    except ValueError as err:  # a rule of peft's not checked above
        raise UserError(f"combine: peft's add_weighted_adapter refused: {err}") from None
    model.set_adapter(COMBINED, inference_mode=True)
    for name in names:
        model.delete_adapter(name)
    _put_heads(heads, weights)
    return model, heads


def _write_run(
    folder: Path,
    out: Path,
    model: PeftModel,
    sources: list[Source],
    weights: list[float],
    how: str,
    density: float | None,
    svd_rank: int | None,
    heads: int,
) -> None:
    """adapter/ (peft's format), recipe.yaml (the first run's, with the combined adapter as its method) and
    combine.json (what was combined, and each source's metrics)."""
    from transformers import AutoTokenizer

    first = sources[0]
    config = model.peft_config[COMBINED]
    # peft gives the combination alpha = r but keeps the first run's use_rslora, which scales it by sqrt(r)
    # instead of 1 (measured: rsLoRA runs with weights 1,0 did not reproduce the first run). The combined matrices
    # already hold every run's scaling, so it is saved as plain LoRA: alpha / r = 1.
    config.use_rslora = False
    raw = first.recipe.model_dump(mode="json")
    raw.update(name=out.name, export={**raw["export"], "output_dir": str(out)})
    raw["method"] = {
        "name": "lora",
        "r": config.r,
        "alpha": float(config.lora_alpha),
        "dropout": config.lora_dropout,
        "target_modules": sorted(config.target_modules),
        "bias": config.bias,
        "rslora": config.use_rslora,
        "dora": False,
        "init": "default",
    }
    recipe = validate(raw, source="the combined recipe")
    record = {
        "how": how,
        "weights": weights,
        "density": density,
        "svd_rank": svd_rank,
        "rank": config.r,
        "seed": first.recipe.train.seed,
        "heads": (
            f"weighted average of {heads} head module(s), weights normalised to sum 1"
            if heads
            else "none (the task has no head)"
        ),
        "sources": [
            {"run": str(s.run_dir), "weight": w, "metrics": _metrics(s.run_dir)} for s, w in zip(sources, weights)
        ],
    }
    header = "".join(
        [f"# peftkit combine --how {how}: a combination of trained adapters, not a training run (combine.json)\n"]
        + [f"#   {s.run_dir} (weight {w:g})\n" for s, w in zip(sources, weights)]
        + [
            "# The sections are the first run's (data: what `peftkit eval` evaluates on); method describes the\n"
            "# combined adapter (peft sets alpha = r for it).\n"
        ]
    )
    tokenizer = AutoTokenizer.from_pretrained(first.adapter_dir)
    export.save_adapter(model, tokenizer, folder / "adapter", recipe, first.labels)
    (folder / RECIPE).write_text(header + recipe.to_yaml(), encoding="utf-8")
    (folder / "combine.json").write_text(json.dumps(record, indent=2), encoding="utf-8")


def _metrics(run_dir: Path) -> dict:
    """The source run's validation/test metrics, kept next to the combination for comparison."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return {}
    metrics = json.loads(path.read_text())
    return {
        split: {k: v for k, v in metrics[split].items() if isinstance(v, float)}
        for split in ("validation", "test")
        if isinstance(metrics.get(split), dict)
    }
