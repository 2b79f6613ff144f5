"""F1 as a local `evaluate` module (scikit-learn's, as evaluate's own f1 uses): the Hub copy is unreachable
offline. average="macro" weights every class equally, so a rare class counts as much as a frequent one. The
"multilabel" configuration (as evaluate's own) takes one 0/1 list per row, a place per label; "micro" then pools
every row x label decision."""

import datasets
import evaluate
from sklearn.metrics import f1_score


class F1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Harmonic mean of precision and recall, per class or averaged.",
            citation="",
            inputs_description="predictions, references: class ids (multilabel: 0/1 per label); labels: the ids "
            "to score; average.",
            features=_features(self.config_name),
        )

    def _compute(
        self,
        predictions: list[int],
        references: list[int],
        labels: list[int] | None = None,
        average: str | None = "macro",
    ) -> dict[str, float | list[float]]:
        score = f1_score(references, predictions, labels=labels, average=average, zero_division=0)
        return {"f1": score.tolist() if average is None else float(score)}


def _features(config_name: str) -> datasets.Features:
    one = datasets.Value("int64")
    each = datasets.Sequence(one) if config_name == "multilabel" else one  # a row's 0/1 per label, or a class id
    return datasets.Features({"predictions": each, "references": each})
