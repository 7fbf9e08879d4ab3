"""All of MLflow, behind a few functions: nothing else in the project imports mlflow.

The store is ``MLFLOW_TRACKING_URI`` when set, else the SQLite file mlflow.db at the
project root (``DVC_ROOT`` under ``dvc exp run --queue``), with artifacts in mlartifacts/
beside it. One run per trained model (variant x seed); the evaluate stage resumes that
run by its id to add its metrics and figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from fmnist import paths

_MAX_PARAM_LENGTH = 6000


class TrackingError(RuntimeError):
    """The tracking store cannot be used."""


def tracking_uri(root: Path | None = None) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = root or paths.project_root()
    return f"sqlite:///{root / paths.MLFLOW_DB}"


def _check_server(uri: str, timeout_s: float = 5.0) -> None:
    """A remote server that does not answer fails now, before anything is trained."""
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout_s) as response:
            if response.status != 200:
                raise TrackingError(f"MLflow tracking server {uri} answered {response.status} at "
                                    f"{health}")
    except (urllib.error.URLError, OSError) as error:
        raise TrackingError(
            f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) does not answer ({error}). "
            "Start it, fix the variable, or unset it to use the local mlflow.db.") from error


def use_store(root: Path | None = None) -> str:
    """Point MLflow at the project's store (a remote server must answer); return its URI."""
    uri = tracking_uri(root)
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def connect(experiment: str, root: Path | None = None) -> str:
    """Point MLflow at the project's store and return the experiment's id (created if new)."""
    root = root or paths.project_root()
    uri = use_store(root)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:"):
        # default would be ./mlruns relative to whatever directory the stage runs in
        artifact_location = (root / paths.MLFLOW_ARTIFACTS).as_uri()
    return mlflow.create_experiment(experiment, artifact_location=artifact_location)


def git_commit(root: Path | None = None) -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=root or Path.cwd())
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def run_is_usable(run_id: str) -> bool:
    try:
        MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return True


def mark_failed(run_id: str) -> None:
    """A run that can no longer be resumed must not stay RUNNING in the UI."""
    if run_is_usable(run_id):
        MlflowClient().set_terminated(run_id, status="FAILED")


@contextlib.contextmanager
def run(experiment_id: str, name: str, tags: dict[str, str], run_id: str | None = None,
        on_start: Any = None) -> Iterator[str]:
    """Start (or, given ``run_id``, resume) a run; end it FINISHED, KILLED or FAILED.

    ``on_start(run_id)`` is called as soon as the run exists, so the caller can record the
    id before any work (a killed process is then resumed, not orphaned).
    """
    if run_id is not None and run_is_usable(run_id):
        active = mlflow.start_run(run_id=run_id)
    else:
        active = mlflow.start_run(experiment_id=experiment_id, run_name=name)
    mlflow.set_tags(tags)
    if on_start is not None:
        on_start(active.info.run_id)
    try:
        yield active.info.run_id
    except KeyboardInterrupt:
        mlflow.end_run(status="KILLED")
        raise
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run(status="FINISHED")


@contextlib.contextmanager
def resume(run_id: str) -> Iterator[bool]:
    """Reopen a finished run to add to it (the evaluate stage); yields False, and logs
    nothing, when the store no longer holds that run (e.g. mlflow.db was deleted)."""
    uri = use_store()
    if not run_is_usable(run_id):
        print(f"WARNING: MLflow run {run_id} is not in {uri}; nothing logged to it. Re-run the "
              "train stage (`dvc repro -f train`) to record it again.")
        yield False
        return
    with run(experiment_id="", name="", tags={}, run_id=run_id):
        yield True


def log_params(params: dict[str, Any]) -> None:
    existing = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    fresh = {}
    for key, value in params.items():
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        text = text[:_MAX_PARAM_LENGTH]
        if key not in existing:  # a resumed run keeps its params (MLflow forbids changing them)
            fresh[key] = text
    if fresh:
        mlflow.log_params(fresh)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({key: float(value) for key, value in metrics.items()}, step=step)


def log_artifacts(*files: Path, folder: str | None = None) -> None:
    for file in files:
        if Path(file).is_dir():
            mlflow.log_artifacts(str(file), artifact_path=folder)
        else:
            mlflow.log_artifact(str(file), artifact_path=folder)


def log_keras_model(model: Any, example: np.ndarray, pip_requirements: list[str]) -> None:
    """The model through MLflow's Keras flavour, with a signature inferred from ``example``
    and the given pip requirements (MLflow would otherwise infer them in a subprocess).

    MLflow 3.17 fails when given ``input_example`` for Keras models (it writes the example
    before creating the model folder), so the example is logged as an artifact beside it.
    """
    from mlflow.models import infer_signature

    signature = infer_signature(example, np.asarray(model.predict(example, verbose=0)))
    mlflow.keras.log_model(model, name="model", signature=signature, pip_requirements=pip_requirements)
    with tempfile.TemporaryDirectory() as tmp:
        example_path = Path(tmp) / "input_example.npy"
        np.save(example_path, example)
        mlflow.log_artifact(str(example_path), artifact_path="model_input_example")


def load_logged_model(run_id: str) -> Any:
    return mlflow.keras.load_model(f"runs:/{run_id}/model")
