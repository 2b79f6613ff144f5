"""Regression scores as a local `evaluate` module (the Hub's mse / pearsonr / spearmanr are unreachable offline):
MSE, RMSE, MAE (lower is better) and Pearson's and Spearman's correlations (scipy's, as evaluate's own use).
A constant prediction has no correlation to measure; it scores 0 there, not NaN, so metrics.json stays JSON."""

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr, spearmanr


class Regression(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Errors and correlations of predicted numbers against their references.",
            citation="",
            inputs_description="predictions, references: numbers.",
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
        )

    def _compute(self, predictions: list[float], references: list[float]) -> dict[str, float]:
        predicted, actual = np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.float64)
        mse = float(np.mean((predicted - actual) ** 2))
        varies = len(predicted) > 1 and np.ptp(predicted) > 0 and np.ptp(actual) > 0
        return {
            "mse": mse,
            "rmse": mse**0.5,
            "mae": float(np.mean(np.abs(predicted - actual))),
            "pearson": float(pearsonr(predicted, actual)[0]) if varies else 0.0,
            "spearman": float(spearmanr(predicted, actual)[0]) if varies else 0.0,
        }
