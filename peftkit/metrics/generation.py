"""Generated answers against reference answers, as a local `evaluate` module: exact match and token F1 as SQuAD
scores them (metrics/squad.py's normalisation: lower case, no punctuation, no articles), and ROUGE-L: the
F-measure of the longest common subsequence of the lower-cased alphanumeric tokens, as the rouge-score
package's rougeL computes it without stemming (that package is a source-only release that pulls in nltk, for a
dynamic programme of a few lines). All in percent, means over the answers.
"""

import re

import datasets
import evaluate

from peftkit.metrics.squad import f1, normalize


def rouge_l(prediction: str, reference: str) -> float:
    pred, ref = (re.sub(r"[^a-z0-9]+", " ", t.lower()).split() for t in (prediction, reference))
    if not pred or not ref:
        return float(pred == ref)
    previous = [0] * (len(ref) + 1)  # LCS lengths of the prediction so far against each prefix of ref
    for token in pred:
        current = [0]
        for j, other in enumerate(ref):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class Generation(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Exact match, token F1 and ROUGE-L of generated answers against references, in percent.",
            citation="",
            inputs_description="predictions: generated answers; references: the reference answers.",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        count = max(len(predictions), 1)
        pairs = list(zip(predictions, references))
        return {
            "exact_match": 100 * sum(normalize(p) == normalize(r) for p, r in pairs) / count,
            "f1": 100 * sum(f1(p, r) for p, r in pairs) / count,
            "rouge_l": 100 * sum(rouge_l(p, r) for p, r in pairs) / count,
        }
