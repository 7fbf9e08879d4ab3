"""The analyse stage: read what evaluate kept of every run in git (paths.RunRecord, the
metrics files), have analysis compute, plots draw and report write every table and figure of
the paper; metrics/summary.json; one MLflow run. From models/ it reads only each variant's
first seed's feature maps, which the train stage wrote (Figs. 5-7, fmnist.feature_maps): it
loads no model and imports no Keras. Where that file is not here (a clone whose DVC cache of
models is gone) it keeps the figures git holds, so the report can still be made again."""

from __future__ import annotations

import csv
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from fmnist import analysis, paths, plots, report, results, tracking
from fmnist.config import Config
from fmnist.data import Dataset
from fmnist.feature_maps import FeatureMaps
from fmnist.files import REMAKE_REMEDY, CorruptFileError, atomic_path, error_reason, read_json, write_text
from fmnist.records import (
    MONITORED_TEST_ACCURACY,
    MONITORED_TEST_LOSS,
    Analysis,
    BaselineMetrics,
    DataInfo,
    Misclassified,
    RunInfo,
    RunMetrics,
)

RECORD_REMEDY = "written by the evaluate stage: run `dvc repro`"


def load_runs(config: Config) -> list[analysis.TrainedRun]:
    runs = []
    for variant in config.variants:
        for seed in config.train.seeds:
            record = paths.run_record(variant, seed)
            runs.append(analysis.TrainedRun(
                variant, seed,
                history=read_json(record.history, RECORD_REMEDY),
                metrics=RunMetrics.read(paths.metrics_file(variant, seed), RECORD_REMEDY),
                run_info=RunInfo.read(record.run_info, RECORD_REMEDY)))
    return runs


def read_confusion(path: Path, n_classes: int) -> np.ndarray:
    """A run's confusion matrix as the evaluate stage wrote it (paths.RunRecord.confusion_matrix,
    (n_classes, n_classes) counts); a missing or damaged file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing ({RECORD_REMEDY})")
    try:
        confusion = np.loadtxt(path, delimiter=",", dtype=int, ndmin=2)
    except ValueError as error:
        raise CorruptFileError(f"{path} cannot be read as a confusion matrix ({error_reason(error)}): it is "
                               f"damaged or was replaced; {REMAKE_REMEDY}") from error
    if confusion.shape != (n_classes, n_classes):
        raise CorruptFileError(f"{path} holds {confusion.shape[0]} x {confusion.shape[1]} counts where the "
                               f"evaluate stage writes {n_classes} x {n_classes}: it is damaged or was "
                               f"replaced; {REMAKE_REMEDY}")
    return confusion


def write_curves_csv(runs: list[analysis.TrainedRun], path: Path) -> None:
    """Long format, one row per run and epoch: DVC's by-run template draws Figs. 2-3."""
    keys = ["loss", "accuracy", "val_loss", "val_accuracy", MONITORED_TEST_LOSS, MONITORED_TEST_ACCURACY]
    present = [k for k in keys if any(k in record for r in runs for record in r.history)]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "variant", "seed", "epoch", *present])
        for run in runs:
            for record in run.history:
                writer.writerow([run.name, run.variant, run.seed, int(record["epoch"]),
                                 *(record.get(k, "") for k in present)])


def tag_model_runs(config: Config, runs: list[analysis.TrainedRun]) -> None:
    """Mark each model run in the MLflow store with the paper's model it stands for (or
    ours), so that the UI can filter `tags.paper_model = 'CNN2+BN'` or `LIKE 'none%'`."""
    missing = [run.name for run in runs if not tracking.tag_run(
        run.run_info.mlflow_run_id,
        {analysis.PAPER_MODEL_TAG: analysis.paper_model_tag(config, run.variant)})]
    if missing:
        print(f"Not in this MLflow store (trained on another machine), not tagged: {', '.join(missing)}")


def log_committed_baseline(config: Config, baseline: BaselineMetrics) -> bool:
    """Log the SVC's committed results (metrics/baseline.json) as a run of the model
    experiment tagged ``source: committed reference`` where the store holds no run with them:
    a fresh clone's `dvc repro` never fits the SVC (its stage is up to date by the committed
    dvc.lock), and the runs table would otherwise lack it. True when it logged one."""
    found = results.baseline_runs(config.tracking.experiment, baseline)
    if found["fitted"] or found["reference"]:
        return False
    experiment_id = tracking.connect(config.tracking.experiment)
    with tracking.run(experiment_id, "svc-baseline (committed reference)", {
            "kind": "baseline", "variant": "svc", results.SOURCE_TAG: results.COMMITTED_REFERENCE}):
        tracking.log_params({"svc.kernel": config.baseline.kernel, "svc.C": config.baseline.C,
                             "svc.gamma": config.baseline.gamma, "svc.train_size": baseline.train_size,
                             "svc.seed": config.baseline.seed})
        tracking.log_results({key: value for key, value in baseline.as_json().items()
                              if key in tracking.RESULT_METRICS})
        tracking.log_artifacts(paths.BASELINE_METRICS)
    print(f"The SVC was not fitted here (its stage is up to date); its committed results "
          f"({paths.BASELINE_METRICS}) are logged to MLflow as a run tagged "
          f"{results.SOURCE_TAG}={results.COMMITTED_REFERENCE!r}.")
    return True


def draw_feature_maps(config: Config, variants: list[str], out_dir: Path,
                      into: Path) -> dict[str, list[Path]]:
    """Figs. 5-7 of each variant's first-seed model, from the feature maps the train stage
    wrote (paths.RunFiles.feature_maps), into ``into`` (the analyse folder being made,
    ``out_dir``'s replacement), as paths.feature_maps_figure names them. A variant whose file
    is not here (DVC's cache gone) keeps its figures from ``out_dir`` (what git holds), saying
    so; without them either, a one-line error. Returns the variants drawn now, with their
    figures' final paths (in ``out_dir``)."""
    seed = config.train.seeds[0]
    classes = config.analyse.feature_map_classes
    drawn: dict[str, list[Path]] = {}
    if not classes:
        return drawn
    for variant in variants:
        final = [paths.feature_maps_figure(out_dir, variant, seed, name) for name in classes]
        figures = [paths.feature_maps_figure(into, variant, seed, name) for name in classes]
        figures[0].parent.mkdir(parents=True, exist_ok=True)
        maps_file = paths.run_files(variant, seed).feature_maps
        if not maps_file.is_file():
            missing = [str(figure) for figure in final if not figure.is_file()]
            if missing:
                raise FileNotFoundError(f"{maps_file} not found, and no earlier feature maps of it "
                                        f"({', '.join(missing)}); {paths.model_remedy(maps_file.parent)}")
            print(f"{maps_file} is not here (DVC's cache of models): its feature maps are kept "
                  f"as git holds them ({final[0].parent})")
            for kept, figure in zip(final, figures, strict=True):
                shutil.copyfile(kept, figure)
            continue
        maps = FeatureMaps.read(maps_file, paths.model_remedy(maps_file.parent))
        for class_name, figure in zip(classes, figures, strict=True):
            index, image, layers = maps.of_class(config.class_index(class_name))
            plots.feature_maps(image, list(layers.values()), list(layers), figure,
                               f"{paths.run_name(variant, seed)}: conv block outputs for the first test "
                               f"{class_name} (test image {index})")
        drawn[variant] = final
    return drawn


def log_feature_maps(config: Config, drawn: dict[str, list[Path]]) -> None:
    """Each drawn variant's figures to its first seed's MLflow run, under ``evaluation/`` (beside
    the evaluate stage's record); a run not in this store is left, as ``tag_model_runs`` does."""
    seed = config.train.seeds[0]
    for variant, figures in drawn.items():
        run_id = RunInfo.read(paths.run_record(variant, seed).run_info, RECORD_REMEDY).mlflow_run_id
        if tracking.run_is_usable(run_id):
            with tracking.resume(run_id):
                tracking.log_artifacts(*figures, folder="evaluation")


def analyse(config: Config, data: Dataset, data_info: DataInfo, baseline: BaselineMetrics,
            out_dir: Path, report_file: Path, summary_file: Path) -> Analysis:
    """Compute and draw everything of the analyse stage; log it as an MLflow run."""
    runs = load_runs(config)
    class_names = config.evaluate.class_names
    summary = analysis.summarise(config, runs, baseline, data_info)
    first_seed = config.train.seeds[0]
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        write_curves_csv(runs, tmp / paths.CURVES.name)
        curve_figures = []
        for key, label, file in (
                ("loss", "Training loss", "training_loss.png"),
                (MONITORED_TEST_ACCURACY, "Test accuracy (monitored only)", "test_accuracy.png")):
            if all(key in r.history[0] for r in runs):
                curves = {v: analysis.mean_curve([r.history for r in runs if r.variant == v], key)
                          for v in summary.variants}  # the tables' order
                plots.training_curves(curves, tmp / file, label,
                                      f"{label} per epoch (mean over seeds {list(config.train.seeds)})")
                curve_figures.append(file)
        # Error analysis (Fig. 8, Table III, Fig. 9) of the variant the paper analyses.
        error_run = paths.run_name(config.analyse.error_variant, first_seed)
        record = paths.run_record(config.analyse.error_variant, first_seed)
        errors = analysis.error_analysis(
            Misclassified.read_csv(record.errors),
            read_confusion(record.confusion_matrix, len(class_names)),
            read_json(record.classification_report, RECORD_REMEDY), class_names,
            config.analyse.top_errors, error_run)
        worst = [error.index for error in errors.top_errors]
        plots.error_grid(data.x_test[worst], [
            f"({chr(97 + n)}) predicted {e.predicted} ({e.probability_predicted:.2f})\n"
            f"actual {e.actual} ({e.probability_actual:.1e})"
            for n, e in enumerate(errors.top_errors)],
            tmp / "top_errors.png", f"Highest cross-entropy errors: {error_run}")
        # Feature maps (Figs. 5-7) of the first seed's models; the report links them from reports/
        drawn = draw_feature_maps(config, list(summary.variants), out_dir, tmp)
        feature_maps = {
            variant: {class_name: Path(os.path.relpath(
                paths.feature_maps_figure(out_dir, variant, first_seed, class_name), report_file.parent)
            ).as_posix() for class_name in config.analyse.feature_map_classes}
            for variant in summary.variants}
        summary = replace(summary, curve_figures=tuple(curve_figures), error_analysis=errors,
                          feature_maps=feature_maps)
        summary.write(tmp / Analysis.FILE)
    architectures = {variant: paths.run_record(variant, first_seed).architecture.read_text()
                     for variant in config.variants}
    claims = analysis.check_claims(summary)
    write_text(report_file, report.markdown(config, summary, claims, runs, architectures))
    metrics = analysis.compact(summary)
    metrics.write(summary_file)
    # Its own experiment: the summary numbers would otherwise fill the model runs' chart view
    # with one-bar charts and join every legend; there, each run is one pipeline execution.
    experiment_id = tracking.connect(tracking.analysis_experiment(config.tracking.experiment))
    tag_model_runs(config, runs)
    log_feature_maps(config, drawn)
    log_committed_baseline(config, baseline)
    with tracking.run(experiment_id, "analysis", {
            "kind": "analysis", "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
            "model_experiment": config.tracking.experiment}):
        tracking.log_metrics(analysis.numeric_summary(metrics))
        tracking.log_artifacts(report_file, summary_file)
        tracking.log_html(report.report_html(report_file.read_text(), report_file.parent), "report.html")
        tracking.log_artifacts(out_dir, folder="analysis")
    return summary
