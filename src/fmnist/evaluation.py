"""The evaluate stage: the final model (after the last epoch) on the test set.

Accuracy and loss, scikit-learn's per-class precision/recall/F1 (the paper's Table IV),
the confusion matrix (Fig. 9), every misclassified image ranked by cross-entropy (Fig. 8),
and, for the first seed's runs, the feature maps (Figs. 5-7). They go to the run's record
in git (paths.RunRecord) beside copies of what the train stage left, so that the analyse
stage needs no model; the class probabilities go to predictions/ (cached by DVC).
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from fmnist import paths, plots, progress, tracking
from fmnist.config import Config
from fmnist.files import atomic_path, read_json
from fmnist.models import feature_layer_names, load_model_file
from fmnist.paths import RunRecord
from fmnist.records import (
    Misclassified,
    RunInfo,
    RunMetrics,
)
from fmnist.scoring import Evaluation, cross_entropy, run_metrics, score, tracked_results

# models/ is a cached DVC output: DVC puts back what the train stage wrote, or trains again.
MODEL_REMEDY = "run `dvc repro` (DVC restores it from its cache or re-runs the train stage)"



def top_errors(probabilities: np.ndarray, labels: np.ndarray, k: int | None = None) -> np.ndarray:
    """Indices of the k (default: all) misclassified examples with the highest cross-entropy,
    highest first."""
    losses = cross_entropy(probabilities, labels)
    wrong = np.flatnonzero(probabilities.argmax(axis=1) != labels)
    order = np.argsort(-losses[wrong], kind="stable")
    return wrong[order[:k]]


def first_of_class(labels: np.ndarray, label: int) -> int:
    matches = np.flatnonzero(labels == label)
    if not len(matches):
        raise ValueError(f"the test set has no image of class {label}")
    return int(matches[0])


def feature_maps(model: keras.Model, image: np.ndarray) -> dict[str, np.ndarray]:
    """Each conv block's activated output for one (28, 28) uint8 image, as (channels, h, w),
    by its layer's name (block1_relu, block1_skip, ...: what the block pools)."""
    names = feature_layer_names(model)
    probe = keras.Model(model.inputs[0], [model.get_layer(name).output for name in names])
    # a direct call, not predict(): no step function is compiled for one image
    outputs = probe(image[np.newaxis], training=False)
    if not isinstance(outputs, list | tuple):
        outputs = [outputs]
    # (1, h, w, channels) -> (channels, h, w); float32 also for a model trained in bfloat16
    return {name: np.transpose(keras.ops.convert_to_numpy(output)[0].astype("float32"), (2, 0, 1))
            for name, output in zip(names, outputs, strict=True)}


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


def draw_feature_maps(model: keras.Model, x_test: np.ndarray, y_test: np.ndarray,
                      class_names: tuple[str, ...], classes: Sequence[str], record: RunRecord,
                      title: str) -> None:
    """Figs. 5-7: every conv block's output for the first test image of each of ``classes``."""
    for class_name in classes:
        index = first_of_class(y_test, class_names.index(class_name))
        maps = feature_maps(model, x_test[index])
        plots.feature_maps(x_test[index], list(maps.values()), list(maps),
                           record.feature_maps(class_name),
                           f"{title}: conv block outputs for the first test {class_name} "
                           f"(test image {index})")


def evaluate_model(variant: str, seed: int, x_test: np.ndarray, y_test: np.ndarray,
                   class_names: tuple[str, ...], feature_map_classes: Sequence[str] = ()
                   ) -> RunMetrics:
    """Evaluate the run's model (paths.model_dir) and write every output where `paths` puts
    it: the metrics file, the run's record (feature maps of ``feature_map_classes``), the
    confusion CSV, the predictions; log them to its MLflow run."""
    files = paths.run_files(variant, seed)
    record_dir = paths.run_record(variant, seed).folder
    title = paths.run_name(variant, seed)
    model = load_model_file(files.model, MODEL_REMEDY)
    history = read_json(files.history, "written by the train stage")
    run_info = RunInfo.read(files.run_info)
    started = time.perf_counter()
    probabilities = np.asarray(model.predict(x_test, batch_size=1024, verbose=0))
    predict_seconds = time.perf_counter() - started
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
        draw_feature_maps(model, x_test, y_test, class_names, feature_map_classes, record, title)
        for source, copy in ((files.history, record.history), (files.run_info, record.run_info),
                             (files.architecture, record.architecture)):
            shutil.copyfile(source, copy)
    write_confusion_csv(evaluation, class_names, paths.confusion_csv(variant, seed))
    with atomic_path(paths.predictions_file(variant, seed)) as tmp, tmp.open("wb") as f:
        np.savez_compressed(f, probabilities=probabilities.astype("float32"), labels=y_test)
    metrics.write(paths.metrics_file(variant, seed))

    with tracking.resume(run_info.mlflow_run_id) as found:
        if found:
            tracking.log_results({**tracked_results(metrics), "predict_seconds": round(predict_seconds, 2)})
            tracking.log_artifacts(record_dir, folder="evaluation")
    return metrics


def evaluate_variant(config: Config, variant: str, x_test: np.ndarray, y_test: np.ndarray
                     ) -> dict[int, RunMetrics]:
    """The evaluate stage of one variant: ``evaluate_model`` for every seed of train.seeds in
    this process (the first seed's runs draw the feature maps: the paper shows one model per
    variant); the outputs of seeds no longer listed are removed. Returns each seed's metrics."""
    seeds = config.train.seeds
    results = {}
    for seed in seeds:
        print(progress.stage_label("evaluate", config.variants, seeds, variant, seed), flush=True)
        results[seed] = evaluate_model(variant, seed, x_test, y_test, config.evaluate.class_names,
                                       config.analyse.feature_map_classes if seed == seeds[0] else ())
    paths.remove_stale_seeds([folder for name, folder in paths.variant_outputs(variant).items()
                              if name != "models"], seeds)  # models/: the train stage's
    return results
