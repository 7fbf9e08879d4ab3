"""Test-set scores from class probabilities and true labels, for every kind of model (the
CNNs' evaluate stage, the SVC's baseline stage): numpy and scikit-learn, no Keras."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix

from fmnist import tracking
from fmnist.records import MONITORED_TEST_ACCURACY, BaselineMetrics, RunMetrics, Scores

_EPSILON = 1e-7  # Keras clips probabilities the same way in categorical cross-entropy


@dataclass(frozen=True)
class Evaluation:
    probabilities: np.ndarray  # (n, 10)
    labels: np.ndarray  # (n,)
    accuracy: float
    loss: float
    report: dict[str, Any]  # scikit-learn's classification_report(output_dict=True)
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


def score(probabilities: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...]) -> Evaluation:
    """Every test-set metric from class probabilities (n, 10) and true labels (n,)."""
    labels = np.asarray(labels, dtype=np.int64)
    predictions = probabilities.argmax(axis=1)
    classes = list(range(len(class_names)))
    report = classification_report(labels, predictions, labels=classes, target_names=list(class_names),
                                   output_dict=True, zero_division=0)
    return Evaluation(
        probabilities=probabilities, labels=labels,
        accuracy=float((predictions == labels).mean()),
        loss=float(cross_entropy(probabilities, labels).mean()),
        report=report, confusion=confusion_matrix(labels, predictions, labels=classes))


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
