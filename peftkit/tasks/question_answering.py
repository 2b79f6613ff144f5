"""Extractive question answering (SQuAD v1.1, and v2.0's unanswerable questions): the answer is a span of the
context, predicted as a start and an end position.

Contexts longer than `max_length` are cut into overlapping windows (`doc_stride` tokens of overlap) so no
answer is lost at a cut. Training labels each window with the answer's first and last token, or with position
0 (the [CLS] token) when the answer is not inside that window. Decoding takes the `n_best` start and end
candidates of every window, keeps spans inside the context no longer than `max_answer_length`, scores them by
start + end logit, and maps the best back to the original text through the tokenizer's offsets. With
`unanswerable`, "no answer" wins when [CLS]'s score beats every span. Scored by exact match and F1 (SQuAD).
"""

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from peftkit.data import ROW
from peftkit.errors import UserError
from peftkit.sections import Section
from peftkit.tasks.common import LabelKind

if TYPE_CHECKING:
    import torch
    from datasets import Dataset, DatasetDict
    from peft import PeftModel
    from transformers import BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase
    from transformers.utils import ModelOutput

COLUMNS = {"question": True, "context": True, "answers": True, "id": False}
TEXT_ROLES = ("question", "context")
LABEL_ROLE = None  # no label set: answers are spans of the context
LABELS_PER_TOKEN = False
SPLIT_BY = "context"  # questions on one paragraph stay in one split: no test paragraph is seen in training
METRICS = ("f1", "exact_match")
PEFT_TASK_TYPE = "QUESTION_ANS"
AUTO_CLASS = "AutoModelForQuestionAnswering"  # the transformers class with this task's head
PIPELINE_TAG = "question-answering"  # the Hub's name for the task
HEAD_MODULES = ("qa_outputs",)
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions", "meta_feature")
_METRIC_DIR = Path(__file__).resolve().parent.parent / "metrics"
log = logging.getLogger("peftkit")


class Config(Section):
    type: Literal["question_answering"]
    max_length: int = Field(384, gt=32, description="Tokens per window (question + context part).")
    doc_stride: int = Field(128, gt=0, description="Overlap, in tokens, between consecutive context windows.")
    max_answer_length: int = Field(30, gt=0, description="Longest answer, in tokens, that decoding considers.")
    n_best: int = Field(20, gt=0, description="Start and end candidates per window that decoding pairs up.")
    unanswerable: bool = Field(
        False, description="SQuAD 2.0: questions may have no answer (an empty answer list); predict '' for them."
    )
    bad_answers: Literal["error", "skip"] = Field(
        "error",
        description="An answer whose text is not at its answer_start in the context: fail, or drop it "
        "(and the question, if it had no other answer) and report the count.",
    )


def load_model(
    path: str, labels: list[str] | None, tokenizer: "PreTrainedTokenizerBase", **kwargs: Any
) -> "PreTrainedModel":
    from transformers import AutoModelForQuestionAnswering

    model = AutoModelForQuestionAnswering.from_pretrained(path, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def preprocess(splits: "DatasetDict", tokenizer: "PreTrainedTokenizerBase", config: Config) -> "DatasetDict":
    """Check the answers, then cut every example into windows with start/end labels and what decoding needs."""
    from datasets import DatasetDict

    encoded = {}
    for name, split in splits.items():
        split = _check_answers(split, config, name)
        windows = split.map(
            lambda b: _windows(tokenizer, b, config),
            batched=True,
            remove_columns=split.column_names,
            desc=f"tokenize {name}",
        )
        encoded[name] = windows.add_column("meta_feature", list(range(len(windows))))
    return DatasetDict(encoded)


def _check_answers(split: "Dataset", config: Config, name: str) -> "Dataset":
    bad, unanswered = [], []
    for row, context, answers in zip(split[ROW], split["context"], split["answers"]):
        if not answers["text"]:
            unanswered.append(row)
        for text, start in zip(answers["text"], answers["answer_start"]):
            if context[start : start + len(text)] != text:
                bad.append(row)
                break
    if unanswered and not config.unanswerable:
        raise UserError(
            f"data: {len(unanswered)} question(s) in {name} have no answer (source rows {unanswered[:5]}); for "
            "SQuAD 2.0-style data set task.unanswerable: true"
        )
    if bad and config.bad_answers == "error":
        raise UserError(
            f"data: {len(bad)} question(s) in {name} have an answer that is not at its answer_start in the context "
            f"(source rows {bad[:5]}); fix the offsets, or set task.bad_answers: skip to drop those answers"
        )
    if bad:
        log.warning("data: %d question(s) in %s had an answer not at its answer_start; dropped", len(bad), name)

        def keep(example: dict) -> dict:
            pairs = [
                (t, s)
                for t, s in zip(example["answers"]["text"], example["answers"]["answer_start"])
                if example["context"][s : s + len(t)] == t
            ]
            example["answers"] = {"text": [t for t, _ in pairs], "answer_start": [s for _, s in pairs]}
            return example

        had_answers = {row for row, a in zip(split[ROW], split["answers"]) if a["text"]}
        split = split.map(keep).filter(lambda e: bool(e["answers"]["text"]) or e[ROW] not in had_answers)
    return split


def _windows(tokenizer: "PreTrainedTokenizerBase", batch: dict[str, list], config: Config) -> dict:
    """Overlapping windows of each (question, context) with start/end labels, context offsets, and the gold
    answers of the example each window came from."""
    encoded = tokenizer(
        [q.lstrip() for q in batch["question"]],
        batch["context"],
        truncation="only_second",
        max_length=config.max_length,
        stride=config.doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    source = encoded.pop("overflow_to_sample_mapping")
    starts, ends, offsets, contexts, golds, ids = [], [], [], [], [], []
    for i, offset in enumerate(encoded.pop("offset_mapping")):
        example = source[i]
        in_context = [s == 1 for s in encoded.sequence_ids(i)]
        offsets.append([o if inside else None for o, inside in zip(offset, in_context)])
        answers = batch["answers"][example] if "answers" in batch else {"text": []}
        start = end = 0  # [CLS]: no answer in this window
        if answers["text"]:
            first = answers["answer_start"][0]
            last = first + len(answers["text"][0])
            tokens = [k for k, inside in enumerate(in_context) if inside]
            if offset[tokens[0]][0] <= first and offset[tokens[-1]][1] >= last:
                start = next(k for k in tokens if offset[k][1] > first)
                end = next(k for k in reversed(tokens) if offset[k][0] < last)
        starts.append(start)
        ends.append(end)
        contexts.append(batch["context"][example])
        golds.append(answers["text"])
        ids.append(str(batch["id"][example] if "id" in batch else batch[ROW][example]))
    return {
        **encoded,
        "start_positions": starts,
        "end_positions": ends,
        "offset_mapping": offsets,
        "context": contexts,
        "gold_answers": golds,
        "example_id": ids,
    }


def metrics(config: Config) -> tuple[str, ...]:
    """Every one of METRICS, whatever the section says."""
    return METRICS


def label_kind(config: Config) -> LabelKind:
    """No label role: the answer of tasks without one."""
    return "class"


def loss(config: Config, train: "Dataset", labels: list[str] | None) -> None:
    """The model's own loss (the task has no class weights or smoothing to apply)."""
    return None


def collator(tokenizer: "PreTrainedTokenizerBase") -> "Callable[[list[dict]], BatchEncoding]":
    """Pads the model inputs; the decoding columns (offsets, context, gold answers) stay in the dataset and
    are found again through meta_feature, the window's index."""
    from transformers import DataCollatorWithPadding

    pad = DataCollatorWithPadding(tokenizer)

    def collate(features: list[dict]) -> "BatchEncoding":
        return pad([{k: v for k, v in f.items() if k in MODEL_INPUTS} for f in features])

    return collate


def eval_outputs(outputs: "ModelOutput", batch: "Mapping[str, torch.Tensor]") -> "tuple[torch.Tensor, torch.Tensor]":
    """(start and end logits (B, 2, L), window indices)."""
    import torch

    return torch.stack([outputs.start_logits, outputs.end_logits], dim=1), batch["meta_feature"]


def compute_metrics(
    predictions: list,
    references: list,
    labels: list[str] | None,
    config: Config,
    features: "Dataset | None" = None,
) -> dict:
    import evaluate

    by_example = {}
    for logits, index in zip(predictions, references):
        window = features[index]
        by_example.setdefault(window["example_id"], []).append((logits, window))
    answers, golds = [], []
    for windows in by_example.values():
        answers.append(best_answer(windows, config))
        golds.append(windows[0][1]["gold_answers"])
    squad = evaluate.load(str(_METRIC_DIR / "squad.py"))
    return squad.compute(predictions=answers, references=golds)


def best_answer(windows: list[tuple[tuple[list[float], list[float]], dict]], config: Config) -> str:
    """The best-scoring span over all windows of one example ('' for no answer when allowed)."""
    best_score, best_text, null_score = float("-inf"), "", float("inf")
    for (start_logits, end_logits), window in windows:
        offsets, context = window["offset_mapping"], window["context"]
        null_score = min(null_score, start_logits[0] + end_logits[0])
        n = len(offsets)
        starts = sorted(range(n), key=lambda k: -start_logits[k])[: config.n_best]
        ends = sorted(range(n), key=lambda k: -end_logits[k])[: config.n_best]
        for s in starts:
            for e in ends:
                if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > config.max_answer_length:
                    continue
                score = start_logits[s] + end_logits[e]
                if score > best_score:
                    best_score, best_text = score, context[offsets[s][0] : offsets[e][1]]
    if config.unanswerable and null_score > best_score:
        return ""
    return best_text


def predict(
    model: "PreTrainedModel | PeftModel",
    tokenizer: "PreTrainedTokenizerBase",
    texts: list[str],
    config: Config,
    context: str | None = None,
) -> list[dict]:
    """Answer each question (texts) from `context`."""
    import torch

    if not context:
        raise UserError("question answering needs a context: peftkit predict RUN_DIR 'question?' --context TEXT|FILE")
    batch = {"question": texts, "context": [context] * len(texts), "id": [str(i) for i in range(len(texts))]}
    windows = _windows(tokenizer, batch, config)
    inputs = tokenizer.pad(
        {k: windows[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in windows}, return_tensors="pt"
    )
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(**inputs.to(device))
    per_question = {}
    for i, example in enumerate(windows["example_id"]):
        logits = (out.start_logits[i].tolist(), out.end_logits[i].tolist())
        window = {"offset_mapping": windows["offset_mapping"][i], "context": context}
        per_question.setdefault(example, []).append((logits, window))
    return [{"question": q, "answer": best_answer(per_question[str(i)], config)} for i, q in enumerate(texts)]
