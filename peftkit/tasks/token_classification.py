"""Token classification (named-entity recognition, ...): one tag per word, BIO / IOB2 tags.

Words are split into sub-words by the tokenizer; each word's tag goes on its first sub-word and the others are
ignored by the loss and the metrics (-100), unless `label_all_subwords` (then they get the word's tag, with B-
turned into I-). Scored at the entity level with seqeval (CoNLL's evaluation: type and whole span must match),
overall and per entity type. Words past `max_length` sub-words are cut off and not scored.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from peftkit.sections import Section
from peftkit.tasks.common import ClassWeights, LabelKind, LabelSmoothing, class_loss, load_labelled_model

if TYPE_CHECKING:
    import torch
    from datasets import Dataset, DatasetDict
    from peft import PeftModel
    from transformers import (
        BatchEncoding,
        DataCollatorForTokenClassification,
        PreTrainedModel,
        PreTrainedTokenizerBase,
    )
    from transformers.utils import ModelOutput

COLUMNS = {"tokens": True, "tags": True}
TEXT_ROLES = ()  # tokens are checked as lists: none empty, one tag each
LABEL_ROLE = "tags"
SPLIT_BY = None  # rows are independent: split them one by one
LABELS_PER_TOKEN = True
METRICS = ("f1", "precision", "recall", "accuracy")
PEFT_TASK_TYPE = "TOKEN_CLS"
AUTO_CLASS = "AutoModelForTokenClassification"  # the transformers class with this task's head
PIPELINE_TAG = "token-classification"  # the Hub's name for the task
HEAD_MODULES = ("classifier", "score")
IGNORE = -100  # the label of positions the loss and the metrics skip
_METRIC_DIR = Path(__file__).resolve().parent.parent / "metrics"


class Config(Section):
    type: Literal["token_classification"]
    max_length: int = Field(128, gt=0, description="Sentences longer than this many sub-words are cut off.")
    label_all_subwords: bool = Field(
        False, description="Train on every sub-word of a word (B- becomes I- after the first), not only the first."
    )
    strict: bool = Field(False, description="Score IOB2 strictly (an I- tag without its B- starts no entity).")
    class_weights: ClassWeights = None
    label_smoothing: LabelSmoothing = 0.0


def load_model(path: str, labels: list[str], tokenizer: "PreTrainedTokenizerBase", **kwargs: Any) -> "PreTrainedModel":
    return load_labelled_model(AUTO_CLASS, path, labels, tokenizer, **kwargs)


def preprocess(splits: "DatasetDict", tokenizer: "PreTrainedTokenizerBase", config: Config) -> "DatasetDict":
    """Tokenize the words (no padding: the collator pads each batch) and align the tags to sub-words."""
    first = next(iter(splits.values()))  # every split has the same columns and tag names (data.load)
    names = first.features["tags"].feature.names
    inside = [
        names.index("I-" + n[2:]) if n.startswith("B-") and "I-" + n[2:] in names else i for i, n in enumerate(names)
    ]

    def encode(batch: dict[str, list]) -> "BatchEncoding":
        encoded = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=config.max_length)
        encoded["labels"] = [align(encoded.word_ids(i), tags) for i, tags in enumerate(batch["tags"])]
        return encoded

    def align(word_ids: list[int | None], tags: list[int]) -> list[int]:
        labels, previous = [], None
        for word in word_ids:
            if word is None:  # special tokens
                labels.append(IGNORE)
            elif word != previous:
                labels.append(tags[word])
            else:
                labels.append(inside[tags[word]] if config.label_all_subwords else IGNORE)
            previous = word
        return labels

    return splits.map(encode, batched=True, remove_columns=first.column_names, desc="tokenize")


def metrics(config: Config) -> tuple[str, ...]:
    """Every one of METRICS, whatever the section says."""
    return METRICS


def label_kind(config: Config) -> LabelKind:
    """One tag per token (LABELS_PER_TOKEN)."""
    return "class"


loss = class_loss  # the Task hook: class weights and label smoothing (tasks/common.py)


def collator(tokenizer: "PreTrainedTokenizerBase") -> "DataCollatorForTokenClassification":
    from transformers import DataCollatorForTokenClassification

    return DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE)


def eval_outputs(outputs: "ModelOutput", batch: "Mapping[str, torch.Tensor]") -> "tuple[torch.Tensor, torch.Tensor]":
    """(predicted tag ids, reference tag ids) per position; -100 marks positions that are not scored."""
    return outputs.logits.argmax(dim=-1), batch["labels"]


def compute_metrics(
    predictions: list,
    references: list,
    labels: list[str],
    config: Config | None = None,
    features: "Dataset | None" = None,
) -> dict:
    import evaluate

    pred_tags, ref_tags = [], []
    for pred, ref in zip(predictions, references):
        kept = [(p, r) for p, r in zip(pred, ref) if r != IGNORE]
        pred_tags.append([labels[p] for p, _ in kept])
        ref_tags.append([labels[r] for _, r in kept])
    seqeval = evaluate.load(str(_METRIC_DIR / "seqeval.py"))
    return seqeval.compute(predictions=pred_tags, references=ref_tags, strict=bool(config and config.strict))


def predict(
    model: "PreTrainedModel | PeftModel",
    tokenizer: "PreTrainedTokenizerBase",
    texts: list[str],
    config: Config,
    batch_size: int = 64,
) -> list[dict]:
    """Entities found in each text (words split at whitespace)."""
    import torch

    tags = model.config.id2label
    device = next(model.parameters()).device
    results = []
    for start in range(0, len(texts), batch_size):
        chunk = [text.split() for text in texts[start : start + batch_size]]
        batch = tokenizer(
            chunk,
            is_split_into_words=True,
            truncation=True,
            max_length=config.max_length,
            padding=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            best = model(**batch.to(device)).logits.argmax(dim=-1).tolist()
        for i, words in enumerate(chunk):
            word_tags, previous = ["O"] * len(words), None
            for position, word in enumerate(batch.word_ids(i)):
                if word is not None and word != previous:
                    word_tags[word] = tags[best[i][position]]
                previous = word
            results.append({"text": " ".join(words), "entities": entities(words, word_tags)})
    return results


def entities(words: list[str], tags: list[str]) -> list[dict]:
    """BIO tags -> [{"type", "text", "start", "end"}] (word indices, end exclusive); a stray I- starts one."""
    found = []
    for i, (word, tag) in enumerate(zip(words, tags)):
        kind = tag[2:] if tag[:2] in ("B-", "I-") else None
        if kind and (tag.startswith("B-") or not found or found[-1]["type"] != kind or found[-1]["end"] != i):
            found.append({"type": kind, "text": word, "start": i, "end": i + 1})
        elif kind:
            found[-1]["text"] += " " + word
            found[-1]["end"] = i + 1
    return found
