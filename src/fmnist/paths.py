"""Every path the pipeline reads or writes, relative to the repository root.

dvc.yaml's deps and outs spell the same paths; the stages run with the repository root
as their working directory (DVC runs them there).
"""

from __future__ import annotations

import os
from pathlib import Path

PARAMS = Path("params.yaml")
# Written by the check_params stage when params.yaml is valid; every other stage depends on
# it, so DVC runs that check before any stage (and before deleting any output).
PARAMS_CHECKED = Path(".params_checked")

DATA_LOCAL = Path("data/local")  # data.source: local reads the four IDX files placed here

DATA_RAW = Path("data/raw")
SOURCE_INFO = DATA_RAW / "source.json"
DATA_PREPARED = Path("data/prepared")
PREPARED_ARRAYS = DATA_PREPARED / "fashion_mnist.npz"
PREPARED_INFO = DATA_PREPARED / "info.json"

MODELS = Path("models")
CHECKPOINTS = Path(".checkpoints")  # resumable training state; not a DVC output (DVC deletes those)
PREDICTIONS = Path("predictions")
METRICS = Path("metrics")
REPORTS = Path("reports")
DATASET_FIGURE = REPORTS / "figures" / "dataset.png"
EVAL_REPORTS = REPORTS / "eval"
ANALYSIS = REPORTS / "analysis"
REPORT = REPORTS / "report.md"
SUMMARY = METRICS / "summary.json"
ACCURACY = METRICS / "accuracy.json"  # mean test accuracy per variant: `dvc exp show`'s columns
BASELINE_METRICS = METRICS / "baseline.json"
CURVES = ANALYSIS / "curves.csv"

MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"


def run_name(variant: str, seed: int) -> str:
    """One trained model: a variant under one seed (also its MLflow run name)."""
    return f"{variant}-seed{seed}"


def model_dir(variant: str, seed: int) -> Path:
    return MODELS / variant / f"seed{seed}"


def checkpoint_dir(variant: str, seed: int) -> Path:
    return CHECKPOINTS / run_name(variant, seed)


def metrics_file(variant: str, seed: int) -> Path:
    return METRICS / "runs" / f"{run_name(variant, seed)}.json"


def eval_dir(variant: str, seed: int) -> Path:
    return EVAL_REPORTS / run_name(variant, seed)


def confusion_csv(variant: str, seed: int) -> Path:
    """(actual, predicted) per test image, for DVC's confusion plot template."""
    return REPORTS / "confusion" / f"{run_name(variant, seed)}.csv"


def predictions_file(variant: str, seed: int) -> Path:
    return PREDICTIONS / f"{run_name(variant, seed)}.npz"


def project_root() -> Path:
    """The repository whose stores (MLflow) we write to.

    ``dvc exp run --queue`` runs stages in a temporary copy; DVC sets DVC_ROOT to the
    repository it was started from, so runs still land in the main project's store.
    """
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
