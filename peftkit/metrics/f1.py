"""F1 as a local `evaluate` module (scikit-learn's, as evaluate's own f1 uses): the Hub copy is unreachable
offline. average="macro" weights every class equally, so a rare class counts as much as a frequent one."""

import datasets
import evaluate
from sklearn.metrics import f1_score


class F1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Harmonic mean of precision and recall, per class or averaged.",
            citation="",
            inputs_description="predictions, references: class ids; labels: class ids to score; average.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
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
