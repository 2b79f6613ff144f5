"""What every task module defines (`Task`), and what several tasks share."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Protocol, runtime_checkable

from pydantic import Field

from peftkit.errors import UserError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("peftkit")

LabelKind = Literal["class", "classes", "number"]  # Task.label_kind: what one row's label is


@runtime_checkable
class Task(Protocol):
    """A task module (tasks/__init__.py registers it; tests/test_contracts.py checks each one). Heavy imports
    stay inside its functions, so `peftkit validate` starts without torch."""

    Config: ClassVar[type]  # its recipe section (a Section): `type: Literal[...]` plus its own options
    COLUMNS: ClassVar[dict[str, bool]]  # roles it reads from the data -> required?; data.columns maps them
    TEXT_ROLES: ClassVar[tuple[str, ...]]  # those of COLUMNS that hold text: an empty one fails or is dropped
    LABEL_ROLE: ClassVar[str | None]  # the column `data.labels` applies to (None: the task has no label set)
    LABELS_PER_TOKEN: ClassVar[bool]  # that column holds a list, one label per token (else one per row)
    SPLIT_BY: ClassVar[str | None]  # a column whose rows must stay in one split when splits are cut
    METRICS: ClassVar[tuple[str, ...]]  # every metric compute_metrics can return (`metrics(config)`: which, here)
    PEFT_TASK_TYPE: ClassVar[Literal["SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "CAUSAL_LM"]]  # so plain peft loads it
    AUTO_CLASS: ClassVar[str]  # the transformers Auto class with this task's head (model cards, `peftkit init`)
    PIPELINE_TAG: ClassVar[str]  # the Hub's name for the task (model cards)
    HEAD_MODULES: ClassVar[tuple[str, ...]]  # names the head may have: the ones present train in full, saved

    def metrics(self, config: Any) -> tuple[str, ...]:
        """What compute_metrics returns under this task section (a subset of METRICS, which lists every metric the
        task can return): eval.metric_for_best is one of them, the first by default."""

    def label_kind(self, config: Any) -> LabelKind:
        """What one row's LABEL_ROLE value is under this task section (data.load encodes it): "class", one label
        name (per token when LABELS_PER_TOKEN); "classes", a set of label names (multi-label); "number", a
        regression target. Tasks without a label role answer "class"."""

    def load_model(self, path: str, labels: list[str] | None, tokenizer: Any, **kwargs: Any) -> Any:
        """The pretrained model with this task's head (a fresh one over `labels`)."""

    def preprocess(self, splits: Any, tokenizer: Any, config: Any) -> Any:
        """The splits (a DatasetDict) tokenized into model inputs and targets."""

    def loss(self, config: Any, train: Any, labels: list[str] | None) -> Any:
        """The training loss `(logits, labels) -> tensor` when the task section changes it from the model's own
        (class weights, label smoothing), given the encoded train split and the label names; else None."""

    def collator(self, tokenizer: Any) -> Any:
        """Pads a list of encoded rows into a batch."""

    def eval_outputs(self, outputs: Any, batch: dict) -> tuple[Any, Any]:
        """(predictions, references) of one batch, as tensors to gather across processes."""

    def compute_metrics(
        self, predictions: list, references: list, labels: list[str] | None, config: Any, features: Any = None
    ) -> dict:
        """The task's METRICS over a whole split."""

    def predict(self, model: Any, tokenizer: Any, texts: list[str], config: Any) -> list[dict]:
        """`peftkit predict`: one result row per input text."""


# The loss options of the tasks that predict classes (classification, token classification): each Config declares
# `class_weights: ClassWeights = None` and `label_smoothing: LabelSmoothing = 0.0`, after its `type`.
ClassWeights = Annotated[
    Literal["balanced"] | list[float] | None,
    Field(
        description="Weigh each class in the loss: balanced (total / (classes x count) over the training labels, "
        "rows or tokens, as scikit-learn's), or one weight per label in id order. Rare classes then count: "
        "without, a model can score well by never predicting them (a tagger answering O)."
    ),
]
LabelSmoothing = Annotated[
    float, Field(ge=0, lt=1, description="Move this share of each target's probability to the other classes.")
]


def class_loss(config: Any, train: Any, labels: list[str]) -> Callable | None:
    """The `loss` hook of those tasks: cross_entropy with the section's class weights and label smoothing, or
    None (the model's own loss) without either."""
    return cross_entropy(config.class_weights, config.label_smoothing, train, labels)


def cross_entropy(
    class_weights: str | list[float] | None, smoothing: float, train: Any, labels: list[str]
) -> Callable | None:
    """`(logits, labels) -> loss`: cross-entropy over every scored position (-100 is not scored), each class
    weighted (`class_weights`: "balanced", from the counts in the encoded `train` split, or one per label), and
    `smoothing` of each target spread over the other classes; None when neither is asked (the model's own)."""
    if class_weights is None and not smoothing:
        return None
    weights = _class_weights(class_weights, train, labels) if class_weights is not None else None
    if weights is not None:
        log.info("class weights (%s): %s", "balanced" if class_weights == "balanced" else "given",
                 ", ".join(f"{name} {w:.3g}" for name, w in zip(labels, weights)))  # fmt: skip

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        weight = torch.tensor(weights, device=logits.device) if weights is not None else None
        flat = logits.float().reshape(-1, logits.shape[-1])  # per row, or per token for tagging
        return F.cross_entropy(flat, targets.reshape(-1), weight=weight, ignore_index=-100, label_smoothing=smoothing)

    return loss


def given_weights(asked: list[float], labels: list[str]) -> list[float]:
    """task.class_weights given as a list: one per label, in id order."""
    if len(asked) != len(labels):
        raise UserError(
            f"task.class_weights: {len(asked)} weight(s) for {len(labels)} labels ({', '.join(labels)}); give "
            "one per label, in id order, or 'balanced'"
        )
    return [float(w) for w in asked]


def _class_weights(asked: str | list[float], train: Any, labels: list[str]) -> list[float]:
    if asked != "balanced":
        return given_weights(asked, labels)
    counts = Counter()
    for value in train["labels"]:
        counts.update(v for v in (value if isinstance(value, list) else [value]) if v != -100)
    total = sum(counts.values())
    # a class with no training example gets weight 1: it is never a target, so its weight changes nothing
    return [total / (len(labels) * counts[i]) if counts[i] else 1.0 for i in range(len(labels))]


def load_labelled_model(
    auto_class: str, path: str, labels: list[str], tokenizer: PreTrainedTokenizerBase, **kwargs: Any
) -> PreTrainedModel:
    """A transformers `Auto...` model with a fresh head over `labels` (ids in their order)."""
    import transformers

    model = getattr(transformers, auto_class).from_pretrained(
        path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        **kwargs,
    )
    # Decoder models (GPT-2, Llama) need the pad id on the config, not only on the tokenizer: their classification
    # heads read it to find each row's last token, and refuse batches of more than one row without it.
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model
