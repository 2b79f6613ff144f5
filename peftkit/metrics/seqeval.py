"""Entity-level precision / recall / F1 (seqeval, as evaluate's own seqeval metric uses) as a local `evaluate`
module: the Hub copy is unreachable offline. An entity counts only when its type and its whole span are right,
which is the CoNLL evaluation; strict mode takes the IOB2 scheme literally (an I- without its B- starts
nothing)."""

import datasets
import evaluate
from seqeval.metrics import accuracy_score, classification_report


class Seqeval(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Entity-level precision, recall and F1 of BIO / IOB2 tag sequences, overall and per type.",
            citation="",
            inputs_description="predictions, references: lists of tag sequences (strings); strict: IOB2 strictly.",
            features=datasets.Features(
                {
                    "predictions": datasets.List(datasets.Value("string")),
                    "references": datasets.List(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions: list[list[str]], references: list[list[str]], strict: bool = False) -> dict:
        from seqeval.scheme import IOB2

        options = {"mode": "strict", "scheme": IOB2} if strict else {}
        report = classification_report(references, predictions, output_dict=True, zero_division=0, **options)
        overall = report.pop("micro avg")
        for average in ("macro avg", "weighted avg"):
            report.pop(average, None)
        return {
            "f1": float(overall["f1-score"]),
            "precision": float(overall["precision"]),
            "recall": float(overall["recall"]),
            "accuracy": float(accuracy_score(references, predictions)),
            "per_type": {
                name: {
                    "f1": float(s["f1-score"]),
                    "precision": float(s["precision"]),
                    "recall": float(s["recall"]),
                    "support": int(s["support"]),
                }
                for name, s in report.items()
            },
        }
