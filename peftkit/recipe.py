"""The recipe schema: one typed model per section. Defaults live here (and, for a method's or a task's own
options, in the `Config` class of that method's or task's file) and nowhere else.

Strict by design: an unknown key is an error with its dotted path and a did-you-mean, a wrong type says what
was expected and what was given, and every error in a recipe is reported at once.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from peftkit.errors import UserError, did_you_mean
from peftkit.methods import METHODS
from peftkit.sections import (
    DataSection,
    EvalSection,
    ExportSection,
    ModelSection,
    QuantizationSection,
    Section,
    TrainSection,
)
from peftkit.tasks import TASKS


def _union(registry: dict, tag: str) -> Any:
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
    def _metric_belongs_to_task(self) -> Recipe:
        task = TASKS[self.task.type]
        metrics = task.metrics(self.task)
        if self.eval.metric_for_best is None:
            self.eval.metric_for_best = metrics[0]
        if self.eval.metric_for_best not in metrics:
            # one of the task's metrics under other options (classification's problem_type): say so
            other = " as its task section sets it up" if self.eval.metric_for_best in task.METRICS else ""
            raise ValueError(
                f"eval.metric_for_best: '{self.eval.metric_for_best}' is not a metric of task '{self.task.type}'"
                f"{other}{did_you_mean(self.eval.metric_for_best, metrics)}; choose one of: " + ", ".join(metrics)
            )
        return self

    @model_validator(mode="after")
    def _labels_fit_the_task(self) -> Recipe:
        """The data section's label keys that only one kind of label takes (Task.label_kind)."""
        kind = TASKS[self.task.type].label_kind(self.task)
        if kind == "number" and self.data.labels is not None:
            raise ValueError(
                "data.labels: a regression target is a number, not one of a label set; remove data.labels (rows "
                "whose label is not a number fail, or are dropped with data.unknown_labels: drop)"
            )
        if kind != "classes" and self.data.label_separator is not None:
            raise ValueError(
                "data.label_separator splits a row's labels for multi-label classification "
                "(task.problem_type: multi_label); remove it, or set that problem type"
            )
        return self

    @model_validator(mode="after")
    def _generation_is_for_decoders(self) -> Recipe:
        if self.eval.generate is not None and self.task.type != "causal_lm":
            raise ValueError(
                f"eval.generate scores generated answers (task causal_lm with prompt/response or chat data); task "
                f"{self.task.type} answers without generating: remove eval.generate"
            )
        return self

    @model_validator(mode="after")
    def _packing_keeps_positions(self) -> Recipe:
        # peft's prompt tuning and P-tuning drop position_ids (they prepend virtual tokens to the whole row), and
        # packed sequences are told apart by them (packing.py): the sequences would attend to each other
        if self.task.type == "causal_lm" and self.task.packing and self.method.name in ("prompt_tuning", "p_tuning"):
            raise ValueError(
                f"task.packing does not work with method {self.method.name}: peft drops the position ids that keep "
                "packed sequences apart, and its virtual tokens would open only the first sequence of each row; "
                "set task.packing: false, or use another method (lora, prefix_tuning, ...)"
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


def _models_in(annotation: Any) -> list[type[BaseModel]]:
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


def _tag_annotation(cls: type[BaseModel]) -> Any:
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
