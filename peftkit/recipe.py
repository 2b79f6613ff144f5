"""The recipe schema: one typed model per section. Defaults live here (and, for a method's or a task's own
options, in the `Config` class of that method's or task's file) and nowhere else.

Strict by design: an unknown key is an error with its dotted path and a did-you-mean, a wrong type says what
was expected and what was given, and every error in a recipe is reported at once.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from peftkit.config import Section
from peftkit.errors import UserError, did_you_mean
from peftkit.methods import METHODS
from peftkit.tasks import TASKS


class ModelSection(Section):
    name: str = Field(
        description="Pretrained model: a local folder, a Hugging Face Hub id, or pkg://PACKAGE/PATH for a model "
        "shipped inside an installed package. A Hub id whose weights an installed package ships resolves to "
        "the package, so the same recipe runs offline."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    attn_implementation: Literal["auto", "eager", "sdpa"] = Field(
        "auto",
        description="Attention kernel. auto: eager on a CPU under bf16 (SDPA's backward is ~2.5x slower there, "
        "see benchmarks/RESULTS.md), sdpa elsewhere.",
    )
    dtype: Literal["auto", "fp32"] = Field(
        "auto",
        description="How the frozen base's weights are held. auto: in bf16 when the run trains in bf16 "
        "(train.precision, e.g. auto on a recent GPU), which halves their memory, if the method leaves the base "
        "untouched and it is not quantised; fp32 otherwise. The trained parameters are fp32 either way. fp32: always.",
    )
    trust_remote_code: bool = Field(False, description="Run model code from the Hub. Off unless you trust it.")
    adapter: str | None = Field(
        None, description="Start training from this trained adapter: a run folder, or user/name[@revision] from the "
        "local hub (PEFTKIT_HUB_DIR) or the Hugging Face Hub (`peftkit push` publishes one). Its base model, task, "
        "labels and method section must match this recipe's."
    )


class SplitSection(Section):
    """Fractions used to cut train/validation/test when the source has a single split (stratified by label)."""

    train: float = Field(0.8, gt=0, lt=1)
    validation: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self):
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"data.splits must add up to 1, they add up to {total:g}")
        return self


class DataSection(Section):
    source: str = Field(
        description="A local file (csv, tsv, json, jsonl, parquet; .gz/.bz2/.xz/.zst compressed too), "
        "pkg://PACKAGE/PATH for a file inside an installed package, or a Hub dataset name."
    )
    format: Literal["auto", "csv", "tsv", "json", "parquet", "conll", "squad", "hub"] = Field(
        "auto", description="auto: from the file extension (.conll/.iob/.bio: conll; a .json in SQuAD's nested "
        "layout: squad); a name that is no file is a Hub dataset. conll: one token per line with its tag in a "
        "column, a blank line between sentences."
    )
    conll_tag_column: int = Field(
        -1, description="conll format: which whitespace-separated column holds the tag (0 = the token; -1 = last)."
    )
    subset: str | None = Field(None, description="Hub dataset configuration name.")
    encoding: str = Field("utf-8", description="Text encoding of csv/tsv files (e.g. latin-1).")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Task role -> column in the source, e.g. {text: review, label: stars}. Roles not listed "
        "are looked up under their own name.",
    )
    labels: list[str | int] | dict[str | int, str] | None = Field(
        None,
        description="The label set, in id order; or a mapping raw value -> label name (several raw values may "
        "share a name). Omitted: the distinct values found in the data, numbers by value (1, 2, 10; also when "
        "written as text), anything else sorted as text with a tagging's outside tag O first.",
    )
    unknown_labels: Literal["error", "drop"] = Field(
        "error", description="What to do with rows whose label is not in `labels`: fail, or drop and report."
    )
    empty_texts: Literal["error", "drop"] = Field(
        "error", description="What to do with rows whose text is empty or missing: fail naming them, or drop them "
        "and report how many."
    )
    splits: SplitSection = Field(default_factory=SplitSection)
    seed: int = Field(42, description="Seed of the split (independent of the training seed).")
    max_samples: int | None = Field(None, gt=0, description="Keep at most this many rows per split (quick runs).")


class QuantizationSection(Section):
    bits: Literal[4, 8] = Field(description="Load the frozen base in 8-bit (LLM.int8) or 4-bit through bitsandbytes.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="4-bit: quantise the quantisation constants too.")
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="4-bit: dtype the weights are dequantised to for each matmul. auto: the run's precision "
        "(bf16 only where the machine computes it natively, else fp32)."
    )


class TrainSection(Section):
    epochs: int = Field(3, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(32, gt=0, description="Examples per forward pass.")
    grad_accum: int = Field(1, gt=0, description="Forward passes per optimizer step.")
    lr: float = Field(5e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Share of steps with linear warmup.")
    scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="Decay after warmup.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null turns it off.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 where the CPU/GPU computes it natively, else fp32."
    )
    group_by_length: bool = Field(
        True, description="Batch examples of similar length together (less padding); order is still shuffled."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass instead of keeping them: less memory for "
        "longer sequences or bigger batches, about a third more compute."
    )
    seed: int = Field(42, description="Seed for initialisation, shuffling and dropout.")
    checkpoint_every: int | None = Field(
        None, gt=0, description="Also checkpoint every N optimizer steps (one is always written at each epoch "
        "end). Checkpoints hold only what trains, plus optimizer and random states; `peftkit run --resume` "
        "continues from the newest."
    )
    keep_checkpoints: int = Field(2, gt=0, description="How many of the newest checkpoints to keep.")
    log_every: int = Field(10, gt=0, description="Write loss and throughput to the log every N steps.")
    tensorboard: bool = Field(
        True, description="Also write loss, learning rate, throughput and validation metrics as TensorBoard "
        "scalars to <run>/tensorboard (needs the tensorboard package: pip install 'peftkit[tensorboard]')."
    )


class EvalSection(Section):
    batch_size: int = Field(64, gt=0)
    metric_for_best: str | None = Field(
        None, description="Validation metric that picks the adapter to keep; omitted: the task's main metric "
        "(accuracy for classification, entity F1 for token classification)."
    )
    splits: list[str] = Field(["validation", "test"], description="Splits evaluated with the kept adapter at the end.")
    before_training: bool = Field(
        False, description="Also evaluate those splits before the first step (the base model, for methods that "
        "start as the identity), to show what training changed."
    )


class ExportSection(Section):
    output_dir: str = Field("runs/{name}", description="Run folder; {name} is the recipe's name.")
    merge_tolerance: float = Field(
        1e-3, gt=0, description="Largest max-abs logit difference merged vs unmerged that `peftkit merge` accepts."
    )


def _union(registry: dict, tag: str):
    configs = tuple(module.Config for module in registry.values())
    return Annotated[Union[configs], Field(discriminator=tag)]  # noqa: UP007 (a runtime-built union)


MethodConfig = _union(METHODS, "name")
TaskConfig = _union(TASKS, "type")


class Recipe(Section):
    name: str = Field(description="Run name; defaults to the recipe file's name.")
    model: ModelSection
    data: DataSection
    task: TaskConfig
    method: MethodConfig
    quantization: QuantizationSection | None = None
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    export: ExportSection = Field(default_factory=ExportSection)

    @model_validator(mode="after")
    def _metric_belongs_to_task(self):
        metrics = TASKS[self.task.type].METRICS
        if self.eval.metric_for_best is None:
            self.eval.metric_for_best = metrics[0]
        if self.eval.metric_for_best not in metrics:
            raise ValueError(
                f"eval.metric_for_best: '{self.eval.metric_for_best}' is not a metric of task "
                f"'{self.task.type}'{did_you_mean(self.eval.metric_for_best, metrics)}; choose one of: "
                + ", ".join(metrics)
            )
        return self

    @property
    def output_dir(self) -> Path:
        return Path(self.export.output_dir.format(name=self.name))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# --- loading --------------------------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; every problem is raised at once as one UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        raise UserError(f"{path}: not valid YAML{at}: {getattr(err, 'problem', None) or err}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if raw is None:
        raise UserError(f"{path}: the recipe is empty; start from one in recipes/ or run `peftkit init`")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a mapping of sections (model:, data:, ...), not {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    for item in overrides:
        apply_override(raw, item)
    return validate(raw, source=str(path))


def apply_override(raw: dict, item: str) -> None:
    """Apply one `dotted.key=value` override; the value is read as YAML (so 16 is an int, [a, b] a list)."""
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"override '{item}' is not of the form section.key=value (e.g. train.epochs=1)")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


def validate(raw: dict, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        problems = [_describe(e) for e in err.errors()]
        raise UserError(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems)) from None


def json_schema() -> str:
    return json.dumps(Recipe.model_json_schema(), indent=2)


# --- error messages -------------------------------------------------------------------------------------------


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (several for a discriminated union)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _walk(loc: tuple) -> tuple[type[BaseModel] | None, list[str]]:
    """Follow an error location through the schema: the model holding its last key, and the dotted path
    without the union tags that pydantic inserts (('method', 'lora', 'rr') -> method.rr)."""
    cls: type[BaseModel] | None = Recipe
    path: list[str] = []
    parts = list(loc[:-1])
    while parts and cls is not None:
        key = parts.pop(0)
        path.append(str(key))
        field = cls.model_fields.get(key) if isinstance(key, str) else None
        candidates = _models_in(field.annotation) if field else []
        if field is not None and field.discriminator and parts:
            tag = parts.pop(0)
            cls = next((c for c in candidates if tag in typing.get_args(_tag_annotation(c))), None)
        else:
            cls = candidates[0] if candidates else None
    return cls, path


def _tag_annotation(cls: type[BaseModel]):
    field = cls.model_fields.get("name") or cls.model_fields.get("type")
    return field.annotation


def _describe(error: dict[str, Any]) -> str:
    loc = tuple(error["loc"])
    kind = error["type"]
    cls, parents = _walk(loc)
    leaf = [str(loc[-1])] if loc else []
    where = ".".join(parents + leaf) or "recipe"
    given = error.get("input")
    if kind == "extra_forbidden":
        valid = list(cls.model_fields) if cls else []
        return f"unknown key '{where}'{did_you_mean(loc[-1], valid)}; valid keys here: {', '.join(valid)}"
    if kind == "missing":
        return f"missing required key '{where}'"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tag = error["ctx"]["discriminator"].strip("'")
        registry = METHODS if loc[-1] == "method" else TASKS
        if kind == "union_tag_not_found":
            return f"'{where}.{tag}' is missing; choose one of: {', '.join(registry)}"
        bad = error["ctx"]["tag"]
        return (
            f"{where}.{tag}: unknown {loc[-1]} '{bad}'{did_you_mean(bad, registry)}; "
            f"choose one of: {', '.join(registry)}"
        )
    if kind == "value_error":
        return str(error["ctx"]["error"]) if "ctx" in error else error["msg"]
    message = error["msg"].replace("Input should be", "expected")
    if kind.endswith("_type") or kind.endswith("_parsing") or kind in ("literal_error", "enum"):
        return f"{where}: {message}, got {given!r} ({type(given).__name__})"
    return f"{where}: {message} (got {given!r})"
