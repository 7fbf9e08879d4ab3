"""Test-set scores from class probabilities and true labels, for every kind of model (the
CNNs' evaluate stage, the SVC's baseline stage): numpy only, no Keras and no scikit-learn
(importing ``sklearn.metrics`` cost each evaluate stage 0.7-0.8 s; its report is rebuilt
below, the same numbers, tests/test_scoring.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fmnist import tracking
from fmnist.records import MONITORED_TEST_ACCURACY, BaselineMetrics, RunMetrics, Scores

_EPSILON = 1e-7  # Keras clips probabilities the same way in categorical cross-entropy


@dataclass(frozen=True)
class Evaluation:
    probabilities: np.ndarray  # (n, 10)
    labels: np.ndarray  # (n,)
    accuracy: float
    loss: float
    report: dict[str, Any]  # as scikit-learn's classification_report(output_dict=True)
    confusion: np.ndarray  # (10, 10): rows actual, columns predicted

    @property
    def predictions(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    @property
    def scores(self) -> Scores:
        """The scores every kind of model has, to 6 decimals (the SVC has no probabilities, so no loss)."""
        macro, weighted = self.report["macro avg"], self.report["weighted avg"]
        return Scores(test_accuracy=_rounded(self.accuracy), test_macro_f1=_rounded(macro["f1-score"]),
                      test_weighted_f1=_rounded(weighted["f1-score"]),
                      test_macro_precision=_rounded(macro["precision"]),
                      test_macro_recall=_rounded(macro["recall"]))


def _rounded(value: float) -> float:
    return round(float(value), 6)


def cross_entropy(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-example categorical cross-entropy, -log p(true class)."""
    true_class = probabilities[np.arange(len(labels)), labels]
    return -np.log(np.clip(true_class, _EPSILON, 1.0))


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, classes: int) -> np.ndarray:
    """(classes, classes) counts: rows the actual class, columns the predicted one."""
    return np.bincount(classes * labels + predictions, minlength=classes * classes).reshape(classes, classes)


def classification_report(confusion: np.ndarray, class_names: tuple[str, ...]) -> dict[str, Any]:
    """scikit-learn's ``classification_report(..., output_dict=True, zero_division=0)`` from
    the confusion matrix: per class and averaged (macro, weighted by support) precision,
    recall and F1 (2 tp / (actual + predicted), as scikit-learn computes it), and accuracy."""
    tp = np.diag(confusion).astype(np.float64)
    actual, predicted = confusion.sum(axis=1).astype(np.float64), confusion.sum(axis=0).astype(np.float64)

    def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
        return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)

    columns = {"precision": ratio(tp, predicted), "recall": ratio(tp, actual),
               "f1-score": ratio(2 * tp, actual + predicted)}
    report: dict[str, Any] = {
        name: {**{key: float(values[k]) for key, values in columns.items()}, "support": float(actual[k])}
        for k, name in enumerate(class_names)}
    report["accuracy"] = float(tp.sum() / actual.sum())
    for average, weights in (("macro avg", None), ("weighted avg", actual)):
        averaged = {key: float(np.average(values, weights=weights)) for key, values in columns.items()}
        report[average] = {**averaged, "support": float(actual.sum())}
    return report


def score(probabilities: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...]) -> Evaluation:
    """Every test-set metric from class probabilities (n, 10) and true labels (n,)."""
    labels = np.asarray(labels, dtype=np.int64)
    predictions = probabilities.argmax(axis=1)
    confusion = confusion_matrix(labels, predictions, len(class_names))
    return Evaluation(
        probabilities=probabilities, labels=labels,
        accuracy=float((predictions == labels).mean()),
        loss=float(cross_entropy(probabilities, labels).mean()),
        report=classification_report(confusion, class_names), confusion=confusion)


def run_metrics(evaluation: Evaluation, history: list[dict[str, float]]) -> RunMetrics:
    """The DVC metrics file of one trained model."""
    monitored = [record[MONITORED_TEST_ACCURACY] for record in history if MONITORED_TEST_ACCURACY in record]
    best = _rounded(max(monitored)) if monitored else None
    return RunMetrics(**asdict(evaluation.scores), test_loss=_rounded(evaluation.loss),
                      epochs=len(history), final_train_loss=_rounded(history[-1]["loss"]),
                      best_epoch_test_accuracy_selected_on_test=best)


def tracked_results(metrics: RunMetrics | BaselineMetrics) -> dict[str, float]:
    """A metrics file's results, under the same names in MLflow (tracking.RESULT_METRICS)."""
    return {key: value for key, value in metrics.as_json().items() if key in tracking.RESULT_METRICS}
