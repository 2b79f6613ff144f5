"""Accuracy as a local `evaluate` module: the Hub copy of evaluate's metrics is unreachable offline. The
"multilabel" configuration (as evaluate's own, scikit-learn's accuracy_score) is subset accuracy: a row counts
when every one of its labels is right."""

import datasets
import evaluate
import numpy as np


class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        one = datasets.Value("int64")
        each = datasets.Sequence(one) if self.config_name == "multilabel" else one
        return evaluate.MetricInfo(
            description="Share of predictions equal to their reference.",
            citation="",
            inputs_description="predictions, references: class ids (multilabel: 0/1 per label).",
            features=datasets.Features({"predictions": each, "references": each}),
        )

    def _compute(self, predictions: list[int], references: list[int]) -> dict[str, float]:
        right = np.asarray(predictions) == np.asarray(references)  # (rows,), or (rows, labels) for multilabel
        return {"accuracy": float(np.mean(right.all(axis=1) if right.ndim == 2 else right))}
