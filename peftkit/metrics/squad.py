"""SQuAD exact match and F1 as a local `evaluate` module (the logic of the official SQuAD v1.1/v2.0 evaluation
script, which evaluate's own squad metric wraps): the Hub copy is unreachable offline.

Answers are compared after normalisation (lower case, no punctuation, no articles a/an/the, single spaces);
each prediction scores the best match over the question's gold answers. An unanswerable question has no gold
answers and is right only when the prediction is empty too.
"""

import collections
import re
import string

import datasets
import evaluate


def normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1(prediction: str, truth: str) -> float:
    pred, gold = normalize(prediction).split(), normalize(truth).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


class Squad(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Exact match and token F1 of extracted answers, in percent (SQuAD v1.1 / v2.0).",
            citation="",
            inputs_description="predictions: answer strings ('' = no answer); references: lists of gold answers.",
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.List(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        exact, overlap = [], []
        for prediction, golds in zip(predictions, references):
            golds = golds or [""]  # unanswerable: only the empty answer is right
            exact.append(max(float(normalize(prediction) == normalize(g)) for g in golds))
            overlap.append(max(f1(prediction, g) for g in golds))
        count = max(len(exact), 1)
        return {"exact_match": 100 * sum(exact) / count, "f1": 100 * sum(overlap) / count}
