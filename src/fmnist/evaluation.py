"""The evaluate stage: the final model (after the last epoch) on the test set.

It scores the class probabilities the train stage predicted with the model in memory
(paths.RunFiles.test_probabilities): it loads no model and imports no Keras, so it starts in
seconds. Accuracy and loss, the per-class precision/recall/F1 (the paper's Table IV, to
scikit-learn's definitions, computed in numpy by fmnist.scoring), the confusion matrix (Fig.
9), every misclassified image ranked by cross-entropy (Fig. 8). They go to the run's record
in git (paths.RunRecord) beside copies of what the train stage left; the class probabilities
go to predictions/ (cached by DVC). The feature maps (Figs. 5-7) are probed by the train
stage too and drawn by the analyse stage (fmnist.feature_maps).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np

from fmnist import paths, plots, progress, tracking
from fmnist.config import Config
from fmnist.data import NUM_CLASSES
from fmnist.files import CorruptFileError, atomic_path, error_reason, read_json
from fmnist.paths import RunRecord
from fmnist.records import Misclassified, RunMetrics
from fmnist.scoring import Evaluation, cross_entropy, run_metrics, score, tracked_results


def load_test_probabilities(path: Path, n_test: int) -> np.ndarray:
    """The train stage's (n_test, 10) float32 class probabilities of the test set; a missing,
    damaged or mismatched file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (the train stage writes it beside the model); "
                                f"{paths.model_remedy(path.parent)}")
    try:
        with path.open("rb") as f:  # an .npy file only (np.load would also open an archive)
            probabilities = np.lib.format.read_array(f, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise CorruptFileError(f"{path} cannot be read ({error_reason(error)}): it is damaged or was "
                               f"replaced; {paths.model_remedy(path.parent)}") from error
    if probabilities.shape != (n_test, NUM_CLASSES) or probabilities.dtype != np.float32:
        raise CorruptFileError(f"{path} holds {probabilities.dtype} {probabilities.shape} where the train "
                               f"stage writes float32 ({n_test}, {NUM_CLASSES}) for this test set: it "
                               f"was replaced or made from other data; {paths.model_remedy(path.parent)}")
    return probabilities


def top_errors(probabilities: np.ndarray, labels: np.ndarray, k: int | None = None) -> np.ndarray:
    """Indices of the k (default: all) misclassified examples with the highest cross-entropy,
    highest first."""
    losses = cross_entropy(probabilities, labels)
    wrong = np.flatnonzero(probabilities.argmax(axis=1) != labels)
    order = np.argsort(-losses[wrong], kind="stable")
    return wrong[order[:k]]


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


def write_errors_csv(evaluation: Evaluation, class_names: tuple[str, ...], path: Path) -> None:
    """Every misclassified test image, highest cross-entropy first."""
    losses = cross_entropy(evaluation.probabilities, evaluation.labels)
    Misclassified.write_csv(path, [
        Misclassified(index=int(i), actual=class_names[evaluation.labels[i]],
                      predicted=class_names[evaluation.predictions[i]],
                      probability_predicted=float(evaluation.probabilities[i].max()),
                      probability_actual=float(evaluation.probabilities[i, evaluation.labels[i]]),
                      cross_entropy=float(losses[i]))
        for i in top_errors(evaluation.probabilities, evaluation.labels)])


def evaluate_model(variant: str, seed: int, y_test: np.ndarray, class_names: tuple[str, ...]
                   ) -> RunMetrics:
    """Score the run's test-set probabilities (paths.run_files) against ``y_test`` and write
    every output where `paths` puts it: the metrics file, the run's record, the confusion CSV,
    the predictions; log them to its MLflow run."""
    files = paths.run_files(variant, seed)
    record_dir = paths.run_record(variant, seed).folder
    title = paths.run_name(variant, seed)
    probabilities = load_test_probabilities(files.test_probabilities, len(y_test))
    history = read_json(files.history, "written by the train stage", files.remedy)
    run_info = files.read_run_info()
    evaluation = score(probabilities, y_test, class_names)
    metrics = run_metrics(evaluation, history)

    with atomic_path(record_dir) as tmp:
        tmp.mkdir()
        record = RunRecord(tmp)
        record.classification_report.write_text(json.dumps(evaluation.report, indent=1))
        record.classification_table.write_text(report_table(evaluation, class_names))
        np.savetxt(record.confusion_matrix, evaluation.confusion, fmt="%d", delimiter=",")
        plots.confusion_matrix(evaluation.confusion, class_names, record.confusion_figure,
                               title=f"Confusion matrix: {title}")
        write_errors_csv(evaluation, class_names, record.errors)
        for source, copy in ((files.history, record.history), (files.run_info, record.run_info),
                             (files.architecture, record.architecture)):
            shutil.copyfile(source, copy)
    write_confusion_csv(evaluation, class_names, paths.confusion_csv(variant, seed))
    with atomic_path(paths.predictions_file(variant, seed)) as tmp, tmp.open("wb") as f:
        np.savez_compressed(f, probabilities=probabilities, labels=y_test)
    metrics.write(paths.metrics_file(variant, seed))

    with tracking.resume(run_info.mlflow_run_id) as found:
        if found:
            tracking.log_results(tracked_results(metrics))  # predict_seconds: the train stage's
            tracking.log_artifacts(record_dir, folder="evaluation")
    return metrics


def evaluate_variant(config: Config, variant: str, y_test: np.ndarray) -> dict[int, RunMetrics]:
    """The evaluate stage of one variant: ``evaluate_model`` for every seed of train.seeds in
    this process; the outputs of seeds no longer listed are removed. Returns each seed's metrics."""
    seeds = config.train.seeds
    results = {}
    for seed in seeds:
        print(progress.stage_label("evaluate", config.variants, seeds, variant, seed), flush=True)
        results[seed] = evaluate_model(variant, seed, y_test, config.evaluate.class_names)
    paths.remove_stale_seeds([folder for name, folder in paths.variant_outputs(variant).items()
                              if name != "models"], seeds)  # models/: the train stage's
    return results
