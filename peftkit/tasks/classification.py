"""Sequence classification (sentiment, topic, ...): binary or multi-class, one label per text (or text pair).

The head is the model's own `...ForSequenceClassification` head (`classifier` on BERT, `score` on GPT-2 and
Llama), newly initialised and trained in full precision next to the adapter, and saved with it.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from peftkit.sections import Section
from peftkit.tasks.common import ClassWeights, LabelSmoothing, class_loss, load_labelled_model

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
METRICS = ("accuracy", "macro_f1")
PEFT_TASK_TYPE = "SEQ_CLS"
AUTO_CLASS = "AutoModelForSequenceClassification"  # the transformers class with this task's head
PIPELINE_TAG = "text-classification"  # the Hub's name for the task
HEAD_MODULES = ("classifier", "score")  # BERT / GPT-2 and Llama: trained in full, saved with the adapter
_METRIC_DIR = Path(__file__).resolve().parent.parent / "metrics"


class Config(Section):
    type: Literal["classification"]
    max_length: int = Field(256, gt=0, description="Longer texts are truncated to this many tokens.")
    class_weights: ClassWeights = None
    label_smoothing: LabelSmoothing = 0.0


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


loss = class_loss  # the Task hook: class weights and label smoothing (tasks/common.py)


def collator(tokenizer: "PreTrainedTokenizerBase") -> "DataCollatorWithPadding":
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer)


def eval_outputs(outputs: "ModelOutput", batch: "Mapping[str, torch.Tensor]") -> "tuple[torch.Tensor, torch.Tensor]":
    """(predictions, references) of one batch, as tensors that can be gathered across processes."""
    return outputs.logits.argmax(dim=-1), batch["labels"]


def compute_metrics(
    predictions: list,
    references: list,
    labels: list[str],
    config: Config | None = None,
    features: "Dataset | None" = None,
) -> dict:
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


def predict(
    model: "PreTrainedModel | PeftModel",
    tokenizer: "PreTrainedTokenizerBase",
    texts: list[str],
    config: Config,
    batch_size: int = 64,
) -> list[dict]:
    """Label and probability for each text."""
    import torch

    results = []
    labels = model.config.id2label
    device = next(model.parameters()).device
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        batch = tokenizer(chunk, truncation=True, max_length=config.max_length, padding=True, return_tensors="pt")
        with torch.no_grad():
            probs = model(**batch.to(device)).logits.float().softmax(dim=-1)
        best = probs.argmax(dim=-1)
        for text, i, p in zip(chunk, best.tolist(), probs.tolist()):
            results.append({"text": text, "label": labels[i], "probability": p[i]})
    return results
