"""The evaluate stage: the final model (after the last epoch) on the test set.

Accuracy and loss, scikit-learn's per-class precision/recall/F1 (the paper's Table IV),
the confusion matrix (Fig. 9), and the class probabilities the analyse stage reads.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix

from fmnist import plots, tracking
from fmnist.files import atomic_path, read_json, write_json
from fmnist.models import load_model_file
from fmnist.paths import RunFiles

# models/ is a cached DVC output: DVC puts back what the train stage wrote, or trains again.
MODEL_REMEDY = "run `dvc repro` (DVC restores it from its cache or re-runs the train stage)"

SELECTED_ON_TEST = "best_epoch_test_accuracy_selected_on_test"
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


def run_metrics(evaluation: Evaluation, history: list[dict[str, float]]) -> dict[str, Any]:
    """The DVC metrics file of one trained model."""
    metrics = {
        **tracked_results(evaluation),  # the names MLflow's runs table shows for the same numbers
        "epochs": len(history),
        "final_train_loss": round(history[-1]["loss"], 6),
    }
    monitored = [record["test_accuracy"] for record in history if "test_accuracy" in record]
    if monitored:
        # The paper's kind of number: the best epoch chosen by looking at the test set. Shown
        # for comparison only; it flatters, and nothing in the pipeline selects on it.
        metrics[SELECTED_ON_TEST] = round(max(monitored), 6)
    return metrics


def tracked_results(evaluation: Evaluation) -> dict[str, float]:
    """The test-set results in MLflow's vocabulary (tracking.RESULT_METRICS), shared by every
    kind of model; a model without probabilities (the SVC) has no test loss."""
    macro, weighted = evaluation.report["macro avg"], evaluation.report["weighted avg"]
    results = {"test_accuracy": evaluation.accuracy, "test_loss": evaluation.loss,
               "test_macro_f1": macro["f1-score"], "test_weighted_f1": weighted["f1-score"],
               "test_macro_precision": macro["precision"], "test_macro_recall": macro["recall"]}
    return {key: round(float(value), 6) for key, value in results.items()}


def report_table(evaluation: Evaluation, class_names: tuple[str, ...]) -> str:
    """Table IV as Markdown: precision, recall, F1 and support per class, then averages."""
    lines = ["| Class | Label | Precision | Recall | F1 | Support |", "|---|---|---|---|---|---|"]
    rows = [(name, str(label)) for label, name in enumerate(class_names)]
    rows += [("macro avg", "-"), ("weighted avg", "-")]
    for name, label in rows:
        entry = evaluation.report[name]
        lines.append(f"| {name} | {label} | {entry['precision']:.2f} | {entry['recall']:.2f} | "
                     f"{entry['f1-score']:.2f} | {int(entry['support'])} |")
    lines.append(f"| accuracy | - | | | {evaluation.accuracy:.4f} | {len(evaluation.labels)} |")
    return "\n".join(lines) + "\n"


def write_confusion_csv(evaluation: Evaluation, class_names: tuple[str, ...], path: Path) -> None:
    """One row per test image (actual, predicted): what DVC's confusion template renders."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        for actual, predicted in zip(evaluation.labels, evaluation.predictions, strict=True):
            writer.writerow([class_names[actual], class_names[predicted]])


def evaluate_model(model_dir: Path, x_test: np.ndarray, y_test: np.ndarray,
                   class_names: tuple[str, ...], metrics_file: Path, report_dir: Path,
                   confusion_csv: Path, predictions_file: Path, title: str) -> dict[str, Any]:
    """Evaluate models/<variant>/seed<k>/ and write every output; log them to its MLflow run."""
    files = RunFiles(Path(model_dir))
    model = load_model_file(files.model, MODEL_REMEDY)
    history = read_json(files.history, "written by the train stage")
    run_info = read_json(files.run_info, "written by the train stage")
    started = time.perf_counter()
    probabilities = np.asarray(model.predict(x_test, batch_size=1024, verbose=0))
    predict_seconds = time.perf_counter() - started
    evaluation = score(probabilities, y_test, class_names)
    metrics = run_metrics(evaluation, history)

    with atomic_path(report_dir) as tmp:
        tmp.mkdir()
        (tmp / "classification_report.json").write_text(json.dumps(evaluation.report, indent=1))
        (tmp / "classification_report.md").write_text(report_table(evaluation, class_names))
        np.savetxt(tmp / "confusion_matrix.csv", evaluation.confusion, fmt="%d", delimiter=",")
        plots.confusion_matrix(evaluation.confusion, class_names, tmp / "confusion_matrix.png",
                               title=f"Confusion matrix: {title}")
    write_confusion_csv(evaluation, class_names, confusion_csv)
    with atomic_path(predictions_file) as tmp, tmp.open("wb") as f:
        np.savez_compressed(f, probabilities=probabilities.astype("float32"), labels=y_test)
    write_json(metrics_file, metrics)

    with tracking.resume(run_info["mlflow_run_id"]) as found:
        if found:
            results = {**tracked_results(evaluation), "predict_seconds": round(predict_seconds, 2)}
            if SELECTED_ON_TEST in metrics:
                results[SELECTED_ON_TEST] = metrics[SELECTED_ON_TEST]
            tracking.log_results(results)
            tracking.log_artifacts(report_dir, folder="evaluation")
    return metrics
