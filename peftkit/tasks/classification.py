"""Sequence classification (sentiment, topic, ...) of a text (or text pair), with transformers' three problem
types (`task.problem_type`):

- single_label: binary or multi-class, one label per text; softmax + cross-entropy over the label set;
- multi_label: any number of labels per text (none too); a sigmoid + binary cross-entropy per label, and a label is
  predicted when its probability reaches `task.threshold`;
- regression: one number per text; one output, mean squared error.

The head is the model's own `...ForSequenceClassification` head (`classifier` on BERT, `score` on GPT-2 and
Llama), newly initialised and trained in full precision next to the adapter, and saved with it: one output per
label, or one for regression (its "label set" is the label column's name). The loss is the task's own (`loss`)
except for single-label without class weights or smoothing, so it never depends on transformers guessing the
problem type from the labels' dtype.
"""

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from peftkit.sections import Section
from peftkit.tasks.common import (
    ClassWeights,
    LabelKind,
    LabelSmoothing,
    class_loss,
    given_weights,
    load_labelled_model,
)

if TYPE_CHECKING:
    import torch
    from datasets import Dataset, DatasetDict
    from peft import PeftModel
    from transformers import BatchEncoding, DataCollatorWithPadding, PreTrainedModel, PreTrainedTokenizerBase
    from transformers.utils import ModelOutput

COLUMNS = {"text": True, "text_pair": False, "label": True}
TEXT_ROLES = ("text", "text_pair")
LABEL_ROLE = "label"
SPLIT_BY = None  # rows are independent: split them one by one
LABELS_PER_TOKEN = False
PROBLEM_METRICS = {  # what compute_metrics returns for each problem type; the first is eval.metric_for_best's default
    "single_label": ("accuracy", "macro_f1"),
    "multi_label": ("micro_f1", "macro_f1", "subset_accuracy"),
    "regression": ("mse", "rmse", "mae", "pearson", "spearman"),  # mse, rmse, mae: lower is better (train.py)
}
METRICS = tuple(dict.fromkeys(m for names in PROBLEM_METRICS.values() for m in names))
_LABEL_KIND: dict[str, LabelKind] = {"single_label": "class", "multi_label": "classes", "regression": "number"}
PEFT_TASK_TYPE = "SEQ_CLS"
AUTO_CLASS = "AutoModelForSequenceClassification"  # the transformers class with this task's head
PIPELINE_TAG = "text-classification"  # the Hub's name for the task
HEAD_MODULES = ("classifier", "score")  # BERT / GPT-2 and Llama: trained in full, saved with the adapter
_METRIC_DIR = Path(__file__).resolve().parent.parent / "metrics"


log = logging.getLogger("peftkit")


class Config(Section):
    type: Literal["classification"]
    problem_type: Literal["single_label", "multi_label", "regression"] = Field(
        "single_label",
        description="single_label: one class per text (softmax). multi_label: any number of classes per text (a "
        "sigmoid each; the label column holds lists, or text split at data.label_separator). regression: one "
        "number per text (mean squared error; the label column holds numbers). transformers' problem_type. "
        "multi_label takes class_weights as BCE's pos_weight (balanced: each label's negatives / positives).",
    )
    max_length: int = Field(256, gt=0, description="Longer texts are truncated to this many tokens.")
    threshold: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="multi_label: a label is predicted when its probability reaches this (the other problem "
        "types do not read it).",
    )
    class_weights: ClassWeights = None  # multi_label: BCE's pos_weight per label (balanced: negatives / positives)
    label_smoothing: LabelSmoothing = 0.0

    @model_validator(mode="after")
    def _options_fit_the_problem_type(self) -> "Config":
        problems = []
        if self.problem_type != "single_label" and self.label_smoothing:
            problems.append(
                f"task.label_smoothing is for single_label classification (a softmax over the classes); remove it "
                f"for {self.problem_type}"
            )
        if self.problem_type == "regression" and self.class_weights is not None:
            problems.append("task.class_weights weighs classes; regression has none: remove it")
        # task.threshold is not refused for the others: a resolved recipe (recipe.yaml) holds every key
        if problems:
            raise ValueError("; ".join(problems))
        return self


def metrics(config: Config) -> tuple[str, ...]:
    return PROBLEM_METRICS[config.problem_type]


def label_kind(config: Config) -> LabelKind:
    return _LABEL_KIND[config.problem_type]


def load_model(path: str, labels: list[str], tokenizer: "PreTrainedTokenizerBase", **kwargs: Any) -> "PreTrainedModel":
    return load_labelled_model(AUTO_CLASS, path, labels, tokenizer, **kwargs)


def preprocess(splits: "DatasetDict", tokenizer: "PreTrainedTokenizerBase", config: Config) -> "DatasetDict":
    """Tokenize without padding (the collator pads each batch to its own longest sequence)."""

    def encode(batch: dict[str, list]) -> "BatchEncoding":
        pair = batch.get("text_pair")
        encoded = tokenizer(batch["text"], pair, truncation=True, max_length=config.max_length)
        encoded["labels"] = batch["label"]
        return encoded

    columns = next(iter(splits.values())).column_names  # the same in every split (data.load)
    return splits.map(encode, batched=True, remove_columns=columns, desc="tokenize")


def loss(config: Config, train: "Dataset", labels: list[str]) -> Callable | None:
    """single_label: cross-entropy with class weights and label smoothing (tasks/common.py), or the model's own.
    multi_label: binary cross-entropy per label (with pos_weight from task.class_weights). regression: MSE."""
    if config.problem_type == "single_label":
        return class_loss(config, train, labels)
    if config.problem_type == "regression":

        def mse(logits: "torch.Tensor", targets: "torch.Tensor") -> "torch.Tensor":
            import torch.nn.functional as F

            return F.mse_loss(logits.float()[:, 0], targets.float())  # logits (B, 1), targets (B,)

        return mse
    weights = _pos_weight(config.class_weights, train, labels) if config.class_weights is not None else None

    def bce(logits: "torch.Tensor", targets: "torch.Tensor") -> "torch.Tensor":
        import torch
        import torch.nn.functional as F

        pos_weight = torch.tensor(weights, device=logits.device) if weights is not None else None
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), pos_weight=pos_weight)  # (B, L)

    return bce


def _pos_weight(asked: str | list[float], train: "Dataset", labels: list[str]) -> list[float]:
    """Multi-label class weights as BCE's pos_weight: given, one per label; balanced, each label's negatives over
    its positives in the training split (1 for a label with none)."""
    if asked != "balanced":
        return given_weights(asked, labels)
    import numpy as np

    targets = np.asarray(train["labels"], dtype=np.float64).reshape(-1, len(labels))  # (rows, labels) of 0/1
    positives = targets.sum(axis=0)
    weights = [float((len(targets) - p) / p) if p else 1.0 for p in positives]
    log.info("pos_weight (balanced): %s", ", ".join(f"{name} {w:.3g}" for name, w in zip(labels, weights)))
    return weights


def collator(tokenizer: "PreTrainedTokenizerBase") -> "DataCollatorWithPadding":
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer)


def eval_outputs(outputs: "ModelOutput", batch: "Mapping[str, torch.Tensor]") -> "tuple[torch.Tensor, torch.Tensor]":
    """(predictions, references) of one batch, as tensors that can be gathered across processes: class ids; for
    multi-label each label's probability (B, L), thresholded in compute_metrics; for regression the value (B,).
    Which one the labels say: data.load encodes label sets as 0/1 floats (B, L) and numbers as floats (B,)."""
    logits, targets = outputs.logits, batch["labels"]
    if not targets.is_floating_point():
        return logits.argmax(dim=-1), targets
    if targets.ndim == 2:
        return logits.float().sigmoid(), targets
    return logits.float()[:, 0], targets


def compute_metrics(
    predictions: list,
    references: list,
    labels: list[str],
    config: Config,
    features: "Dataset | None" = None,
) -> dict:
    if config.problem_type == "multi_label":
        return _multi_label_metrics(predictions, references, labels, config.threshold)
    if config.problem_type == "regression":
        return _regression_metrics(predictions, references)
    import evaluate

    # evaluate.load("accuracy") fetches the metric script from the Hub and fails offline; these local modules
    # load offline (peftkit/metrics/).
    accuracy = evaluate.load(str(_METRIC_DIR / "accuracy.py"))
    f1 = evaluate.load(str(_METRIC_DIR / "f1.py"))
    ids = list(range(len(labels)))
    per_class = f1.compute(predictions=predictions, references=references, labels=ids, average=None)["f1"]
    return {
        "accuracy": accuracy.compute(predictions=predictions, references=references)["accuracy"],
        "macro_f1": f1.compute(predictions=predictions, references=references, labels=ids, average="macro")["f1"],
        "f1_per_class": dict(zip(labels, per_class)),
    }


def _multi_label_metrics(predictions: list, references: list, labels: list[str], threshold: float) -> dict:
    """micro F1 (every row x label decision pooled: frequent labels weigh more), macro F1 (the mean of each
    label's F1), subset accuracy (rows whose whole label set is right), each label's F1; and the collapse check:
    one label set predicted for every row while the references hold several."""
    import evaluate
    import numpy as np

    predicted = (np.asarray(predictions, dtype=np.float64) >= threshold).astype(np.int64)  # (rows, labels)
    actual = np.asarray(references, dtype=np.float64).round().astype(np.int64)
    f1 = evaluate.load(str(_METRIC_DIR / "f1.py"), "multilabel")
    accuracy = evaluate.load(str(_METRIC_DIR / "accuracy.py"), "multilabel")
    ids = list(range(len(labels)))
    scores = {"predictions": predicted.tolist(), "references": actual.tolist()}
    result = {
        "micro_f1": f1.compute(**scores, labels=ids, average="micro")["f1"],
        "macro_f1": f1.compute(**scores, labels=ids, average="macro")["f1"],
        "subset_accuracy": accuracy.compute(**scores)["accuracy"],
        "f1_per_class": dict(zip(labels, f1.compute(**scores, labels=ids, average=None)["f1"])),
    }
    predicted_sets, actual_sets = {tuple(r) for r in predicted}, {tuple(r) for r in actual}
    result.update(predicted_label_sets=len(predicted_sets), reference_label_sets=len(actual_sets))
    if len(predicted_sets) == 1 and len(actual_sets) > 1:
        (only,) = predicted_sets
        names = [name for name, on in zip(labels, only) if on]
        said = "no label" if not names else "the label set {" + ", ".join(names) + "}"
        share = float(np.mean((actual == np.asarray(only)).all(axis=1)))
        result.update(
            collapsed_to=said,
            collapsed_share=share,
            collapsed_over=f"{len(actual):,} rows",
            collapse_detail=f"the model predicts {said} for all {len(actual):,} rows scored, while the data has "
            f"{len(actual_sets)} different label sets: it has collapsed to one answer (its subset accuracy, "
            f"{share:.3f}, is that set's share)",
        )
    return result


def _regression_metrics(predictions: list, references: list) -> dict:
    """MSE, RMSE, MAE, Pearson's and Spearman's correlations; and the collapse check: predictions that barely
    vary (their spread under 1% of the references') are a constant, whatever the input."""
    import evaluate
    import numpy as np

    result = evaluate.load(str(_METRIC_DIR / "regression.py")).compute(predictions=predictions, references=references)
    spread, actual_spread = float(np.std(predictions)), float(np.std(references))
    if actual_spread > 0 and spread < 0.01 * actual_spread:
        mean = float(np.mean(predictions))
        result.update(
            collapsed_to=f"{mean:.4g}",
            collapsed_over=f"{len(references):,} rows",
            collapse_detail=f"the model predicts about {mean:.4g} for all {len(references):,} rows scored (spread "
            f"{spread:.2g}, the references' {actual_spread:.2g}): it has collapsed to a constant (its MSE, "
            f"{result['mse']:.4g}, is near the references' variance, {actual_spread**2:.4g})",
        )
    return result


def predict(
    model: "PreTrainedModel | PeftModel",
    tokenizer: "PreTrainedTokenizerBase",
    texts: list[str],
    config: Config,
    batch_size: int = 64,
) -> list[dict]:
    """For each text: single_label, its label and that label's probability; multi_label, the labels whose
    probability reaches task.threshold (most probable first) and every label's probability; regression, the
    value."""
    import torch

    results = []
    labels = model.config.id2label
    device = next(model.parameters()).device
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        batch = tokenizer(chunk, truncation=True, max_length=config.max_length, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**batch.to(device)).logits.float()
        if config.problem_type == "regression":
            results += [{"text": text, "value": v} for text, v in zip(chunk, logits[:, 0].tolist())]
            continue
        if config.problem_type == "multi_label":
            for text, p in zip(chunk, logits.sigmoid().tolist()):
                ranked = sorted(range(len(p)), key=lambda i: -p[i])
                results.append(
                    {
                        "text": text,
                        "labels": [labels[i] for i in ranked if p[i] >= config.threshold],
                        "probabilities": {labels[i]: p[i] for i in ranked},
                    }
                )
            continue
        probs = logits.softmax(dim=-1)
        best = probs.argmax(dim=-1)
        for text, i, p in zip(chunk, best.tolist(), probs.tolist()):
            results.append({"text": text, "label": labels[i], "probability": p[i]})
    return results
