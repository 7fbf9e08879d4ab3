"""All of MLflow, behind a few functions: nothing else in the project imports mlflow.

The store is ``MLFLOW_TRACKING_URI`` when set, else the SQLite file mlflow.db at the
project root (``DVC_ROOT`` under ``dvc exp run --queue``), with artifacts in mlartifacts/
beside it. One run per trained model (variant x seed) and one for the SVC baseline, in the
experiment ``tracking.experiment``, all logging one vocabulary of metrics (see
RESULT_METRICS); the evaluate stage resumes a model's run by its id to add its results and
figures, keeping the run's end time. The analysis of each pipeline execution is a run of its
own experiment (``analysis_experiment``), so its summary numbers stay out of the model runs'
table and charts.

Faults: every failure of the store (an HTTP error or timeout, a full disk) becomes a
one-line TrackingError naming the store. MLflow's HTTP client is bounded by project
defaults (below) unless the user set MLflow's own variables. A run that could not be
ended (the store failed) is marked FAILED by the next start of the same stage in the same
workspace, so no run stays RUNNING.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
import types
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import requests
import sqlalchemy.exc
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from fmnist import paths
from fmnist.data import IMAGE_SIZE

_MAX_PARAM_LENGTH = 6000
# MLflow's HTTP client retries 7 times with 2^n s backoff and waits 120 s per request by
# default: minutes before a dead or hung server is reported. The project's defaults bound a
# request to 20 s and 3 tries (about a minute in the worst case); a value the user set wins.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
# MLflow 3's UI opens an experiment without this tag in its GenAI mode (an empty traces page);
# tagged, it opens the classic runs table, charts and Group by of model training.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
RUN_KEY_TAG = "fmnist.run_key"  # workspace + run name: finds runs an earlier attempt left RUNNING


class TrackingError(RuntimeError):
    """The tracking store cannot be used."""


_STORE_ERRORS = (mlflow.exceptions.MlflowException, requests.exceptions.RequestException,
                 sqlalchemy.exc.SQLAlchemyError, OSError)


def _reason(error: BaseException) -> str:
    """The cause, in one line: the database's own words (SQLAlchemy's first line may be only
    "(raised as a result of Query-invoked autoflush ...)"), and a full disk said as such."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            return f"the disk is full ({cause.strerror}); free space on it and run again"
        original = getattr(cause, "orig", None)  # the DB-API error under SQLAlchemy's
        if original is not None:
            if "disk is full" in str(original):
                return f"the disk is full ({original}); free space on it and run again"
            error = original
            break
        cause = cause.__cause__
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 400 else text[:400] + " ..."


class _DropStoreTracebacks(logging.Filter):
    """MLflow logs each database error with its traceback (mlflow.store.db.utils) before it
    raises it; the TrackingError that follows says the same in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("SQLAlchemy database error")


_STORE_LOGGER = "mlflow.store.db.utils"


def _store_error(error: BaseException, doing: str) -> TrackingError:
    uri = mlflow.get_tracking_uri()
    return TrackingError(f"MLflow tracking store {uri} failed while {doing}: {_reason(error)}")


def _guarded(doing: str):
    """Turn the store's failures (HTTP errors, timeouts, SQLite errors, a full disk) into a
    TrackingError that names the store."""
    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except TrackingError:
                raise
            except _STORE_ERRORS as error:
                raise _store_error(error, doing) from error
        return wrapper
    return decorate


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


def use_store(root: Path | None = None, create: bool = True) -> str:
    """Point MLflow at the project's store (a remote server must answer); return its URI.

    ``create=False`` (reading a model): a SQLite store that does not exist is an error, not
    a new empty file."""
    uri = tracking_uri(root)
    if uri.startswith(("http://", "https://")):
        for name, value in HTTP_DEFAULTS.items():  # MLflow reads them at each request
            os.environ.setdefault(name, value)
        _check_server(uri)
    store_logger = logging.getLogger(_STORE_LOGGER)
    debugging = os.environ.get("FMNIST_DEBUG", "").strip() not in ("", "0")  # as fmnist.cli
    if not debugging and not any(isinstance(f, _DropStoreTracebacks) for f in store_logger.filters):
        store_logger.addFilter(_DropStoreTracebacks())
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///").split("?")[0])
        if not create and not db.is_file():
            raise TrackingError(f"no MLflow store here: {db} does not exist; run this from the project's "
                                "folder after `dvc repro`, or set MLFLOW_TRACKING_URI to the store")
        mlflow.set_tracking_uri(uri)
        _open_sqlite_store(db)
    else:
        mlflow.set_tracking_uri(uri)
    return uri


@_guarded("creating or opening the store")
def _open_sqlite_store(db: Path) -> None:
    """Create or open the SQLite store under a file lock: stages started at once (`dvc queue
    start -j 2`) would otherwise each create its tables and fail ("table already exists")."""
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            MlflowClient().search_experiments(max_results=1)  # creates and migrates the tables
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@_guarded("opening the experiment")
def connect(experiment: str, root: Path | None = None) -> str:
    """Point MLflow at the project's store and return the experiment's id (created if new)."""
    root = root or paths.project_root()
    uri = use_store(root)
    artifact_location = None
    if uri.startswith("sqlite:"):
        # default would be ./mlruns relative to whatever directory the stage runs in
        artifact_location = (root / paths.MLFLOW_ARTIFACTS).as_uri()
    # Stages started at once (`dvc queue start -j 2`) may all find no experiment and all
    # create it (mlflow issue 4123): the losers' create fails as a duplicate; they re-read.
    def find_or_create() -> str:
        found = mlflow.get_experiment_by_name(experiment)
        if found is None:
            return mlflow.create_experiment(experiment, artifact_location=artifact_location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        if found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            MlflowClient().set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return found.experiment_id

    return _settling_races(find_or_create, lambda error: error.error_code == "RESOURCE_ALREADY_EXISTS")


def _settling_races(action: Callable[[], Any], lost_race: Callable[[Exception], bool],
                    attempts: int = 5) -> Any:
    """``action()``, tried again while it fails because a concurrent stage (a queue worker)
    inserted the same row first (``lost_race``); the retry finds the winner's row once its
    commit is visible."""
    for attempt in range(attempts - 1):
        try:
            return action()
        except mlflow.exceptions.MlflowException as error:
            if not lost_race(error):
                raise
        time.sleep(0.2 * (attempt + 1))
    return action()


def _git(*args: str, root: Path | None = None) -> str | None:
    """git's output, or None where it fails (no git, not a repository, no commit yet)."""
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, cwd=root or Path.cwd())
    except OSError:
        return None
    return result.stdout if result.returncode == 0 else None


def git_commit(root: Path | None = None) -> str:
    return (_git("rev-parse", "HEAD", root=root) or "unknown").strip() or "unknown"


# What a run's model came from, beyond the commit (every run of one `dvc repro` or of the
# experiments started from one commit shares that): the DVC experiment, the params that
# differ from the committed params.yaml, and whether the pipeline's inputs were committed.
# Set on every stage's own run (``run``) and copied to its registered version.
PROVENANCE_TAGS = ("git_commit", "dvc_exp_name", "workspace_committed", "params_changed")
# The files that decide what the pipeline computes; its outputs (dvc.lock, metrics/,
# reports/), which every `dvc repro` rewrites, do not count.
PIPELINE_INPUTS = (str(paths.PARAMS), "dvc.yaml", "src", "stages")


def params_changed(root: Path | None = None) -> str:
    """The params whose value in params.yaml differs from the committed one (``key=value``,
    comma-separated; "" for none; "unknown" outside git). Lists are one value."""
    from fmnist.config import flatten, read_yaml

    root = root or Path.cwd()
    committed = _git("show", f"HEAD:{paths.PARAMS}", root=root)
    if committed is None or not (root / paths.PARAMS).is_file():
        return "unknown"
    before = flatten(read_yaml(committed) or {})
    after = flatten(read_yaml((root / paths.PARAMS).read_text()) or {})
    changed = [f"{key}={json.dumps(after[key]) if isinstance(after[key], (list, dict)) else after[key]}"
               for key in after if before.get(key, object()) != after[key]]
    changed += [f"{key} (removed)" for key in before if key not in after]
    return ", ".join(changed)[:_MAX_PARAM_LENGTH]


def workspace_committed(root: Path | None = None) -> str:
    """"true" when params.yaml, dvc.yaml, src/ and stages/ have no uncommitted change,
    "false" when they have, "unknown" outside git."""
    status = _git("status", "--porcelain", "--", *PIPELINE_INPUTS, root=root)
    return "unknown" if status is None else str(not status.strip()).lower()


def provenance(root: Path | None = None) -> dict[str, str]:
    """PROVENANCE_TAGS of work done now, in ``root`` (the working directory)."""
    return {"git_commit": git_commit(root), "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
            "workspace_committed": workspace_committed(root), "params_changed": params_changed(root)}


# Which pipeline execution a run belongs to, as a tag (the UI's Group by -> Tags) and in the
# run's name (the runs table and every chart legend): `dvc exp run` adds the same variants
# and seeds again, and without it three experiments' runs all read `cnn2-seed0`.
EXECUTION_TAG = "pipeline_run"


def execution(root: Path | None = None) -> str:
    """The name of the pipeline execution that runs now: the DVC experiment's (DVC sets
    DVC_EXP_NAME under every `dvc exp run`, choosing a name where the user gave none); in the
    workspace (`dvc repro`), ``workspace-<short commit>``, with ``-dirty`` (git describe's
    word) when params.yaml, dvc.yaml, src/ or stages/ differ from that commit: the commit says
    which code and params made the runs, where "workspace" alone would merge every commit's;
    ``workspace`` outside git."""
    name = os.environ.get("DVC_EXP_NAME", "")
    if name:
        return name
    commit = (_git("rev-parse", "--short", "HEAD", root=root) or "").strip()
    if not commit:
        return "workspace"
    return f"workspace-{commit}" + ("-dirty" if workspace_committed(root) == "false" else "")


def run_title(name: str, execution_name: str) -> str:
    """The MLflow run name of run ``name`` (``cnn2-seed0``, a file and registry name: see
    paths.run_name) in a pipeline execution: ``cnn2-seed0 @ small``."""
    return f"{name} @ {execution_name}"


def run_is_usable(run_id: str) -> bool:
    try:
        MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return False
        raise _store_error(error, f"looking up run {run_id}") from error
    except _STORE_ERRORS as error:
        raise _store_error(error, f"looking up run {run_id}") from error
    return True


@_guarded("marking a run FAILED")
def mark_failed(run_id: str) -> None:
    """A run that can no longer be resumed must not stay RUNNING in the UI."""
    if run_is_usable(run_id):
        MlflowClient().set_terminated(run_id, status="FAILED")


@_guarded("tagging a run")
def tag_run(run_id: str, tags: dict[str, str]) -> bool:
    """Set ``tags`` on a run, finished or not, without reopening it (its status and end time
    stay); False where the run is not in this store (trained on another machine) or was
    deleted (MLflow refuses to tag it)."""
    if not run_is_usable(run_id):
        return False
    client = MlflowClient()
    if client.get_run(run_id).info.lifecycle_stage != "active":
        return False
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    return True


@_guarded("searching runs")
def finished_runs(experiment: str, tags: dict[str, str]) -> list[dict[str, Any]]:
    """{"run_id", "tags", "metrics"} of the finished runs of ``experiment`` that carry
    ``tags``; none where the store lacks the experiment (``use_store`` first)."""
    found = mlflow.get_experiment_by_name(experiment)
    if found is None or any("'" in key + value for key, value in tags.items()):
        return []
    condition = " and ".join([f"tags.`{key}` = '{value}'" for key, value in tags.items()]
                             + ["attributes.status = 'FINISHED'"])
    return [{"run_id": r.info.run_id, "tags": dict(r.data.tags), "metrics": dict(r.data.metrics)}
            for r in MlflowClient().search_runs([found.experiment_id], filter_string=condition,
                                                max_results=1000)]


def run_key(name: str) -> str:
    """The same stage's run in the same workspace (a `dvc exp run --queue` copy is another)."""
    return f"{Path.cwd().resolve()}#{name}"


def analysis_experiment(experiment: str) -> str:
    """The experiment of the analyse stage's runs: one run per pipeline execution, beside
    (not among) the model runs they summarise."""
    return f"{experiment}-analysis"


def search_experiment(experiment: str) -> str:
    """The experiment of hyperparameter searches (fmnist.search): a run per search, its
    trials nested under it, apart from the pipeline's model runs."""
    return f"{experiment}-search"


def _fail_left_running(experiment_id: str, key: str, current_run_id: str) -> None:
    """Mark FAILED the runs of ``key`` that an earlier attempt left RUNNING (killed, or its
    store failed before it could end them) and that are not being resumed now."""
    if "'" in key:  # cannot be quoted in a filter string; nothing to find then
        return
    client = MlflowClient()
    for found in client.search_runs([experiment_id], max_results=100, filter_string=(
            f"attributes.status = 'RUNNING' and tags.`{RUN_KEY_TAG}` = '{key}'")):
        if found.info.run_id != current_run_id:
            client.set_terminated(found.info.run_id, status="FAILED")
            print(f"Marked MLflow run {found.info.run_id} ({found.info.run_name}) FAILED: an "
                  "earlier attempt left it RUNNING.")


def _end(status: str) -> None:
    """End the active run; when the store fails, say so and leave the run for the next start."""
    run_id = mlflow.active_run().info.run_id
    try:
        mlflow.end_run(status=status)  # pops the active run before it calls the store
    except _STORE_ERRORS as error:
        print(f"WARNING: could not mark MLflow run {run_id} {status} in "
              f"{mlflow.get_tracking_uri()} ({_reason(error)}); the next run of this stage "
              "will.")
        if status == "FINISHED":
            raise _store_error(error, f"ending run {run_id}") from error


@contextlib.contextmanager
def run(experiment_id: str, name: str, tags: dict[str, str], run_id: str | None = None,
        on_start: Any = None, parent_run_id: str | None = None) -> Iterator[str]:
    """Start (or, given ``run_id``, resume) a run; end it FINISHED, KILLED or FAILED.

    ``name`` (``cnn2-seed0``) is the run's name within a pipeline execution; MLflow's run
    name adds the execution (``run_title``), which is also the EXECUTION_TAG. A resumed
    run takes the name and tags of the execution that resumes it (which finishes it).
    ``on_start(run_id)`` is called as soon as the run exists, so the caller can record the
    id before any work (a killed process is then resumed, not orphaned). A new or resumed
    named run marks FAILED what earlier attempts of it left RUNNING (found by ``name`` and
    the working directory, RUN_KEY_TAG, whatever the execution). ``parent_run_id``: a new
    run is nested under that run (a search's trial under the search), from any process.
    """
    where = execution()
    title = run_title(name, where) if name else ""
    try:
        if run_id is not None and run_is_usable(run_id):
            active = mlflow.start_run(run_id=run_id)
        else:
            active = mlflow.start_run(experiment_id=experiment_id, run_name=title,
                                      parent_run_id=parent_run_id, nested=parent_run_id is not None)
    except _STORE_ERRORS as error:
        raise _store_error(error, f"starting run {title or run_id}") from error
    try:
        if name:  # a stage's own run (not evaluate adding to train's): what made it
            tags = {**tags, **provenance(), RUN_KEY_TAG: run_key(name),
                    EXECUTION_TAG: where, "mlflow.runName": title}
            _fail_left_running(active.info.experiment_id, run_key(name), active.info.run_id)
        mlflow.set_tags(tags)
        if on_start is not None:
            on_start(active.info.run_id)
    except _STORE_ERRORS as error:
        _end("FAILED")
        raise _store_error(error, f"starting run {active.info.run_id}") from error
    except BaseException:
        _end("FAILED")
        raise
    try:
        yield active.info.run_id
    except KeyboardInterrupt:
        _end("KILLED")
        raise
    except BaseException:
        _end("FAILED")
        raise
    _end("FINISHED")


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
    ended = _run_info(run_id)
    with run(experiment_id="", name="", tags={}, run_id=run_id):
        yield True
    if ended.status == "FINISHED" and ended.end_time:
        _restore_end(run_id, ended.end_time)


@_guarded("looking up a run")
def _run_info(run_id: str) -> Any:
    return MlflowClient().get_run(run_id).info


@_guarded("restoring a run's end time")
def _restore_end(run_id: str, end_time: int) -> None:
    """The run's Duration stays its training: what was added later does not stretch it."""
    MlflowClient().set_terminated(run_id, status="FINISHED", end_time=end_time)


@_guarded("logging params")
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


# --- One vocabulary of metrics across every model run (the CNNs and the SVC) -------------
# Results: one value per run (no step), the same name for the same quantity in every kind of
# run, so that one column of the runs table ranks all models. Counts (epochs, images) are
# params, not metrics.
RESULT_METRICS = {
    "test_accuracy": "accuracy of the final model on the test set",
    "test_loss": "categorical cross-entropy on the test set (models with probabilities)",
    "test_macro_f1": "F1 on the test set, unweighted mean over classes",
    "test_weighted_f1": "F1 on the test set, mean weighted by class support",
    "test_macro_precision": "precision on the test set, unweighted mean over classes",
    "test_macro_recall": "recall on the test set, unweighted mean over classes",
    "best_epoch_test_accuracy_selected_on_test": "the paper's kind of number: the best epoch as "
                                                  "seen on the test set (flatters; never selects)",
    "train_seconds": "time to fit the model (all attempts of a resumed training)",
    "predict_seconds": "time to predict the test set",
}
# Series: one value per epoch (step = epoch). Keras' names, except the test set's, which is
# monitored only (the paper's Fig. 3) and named so that no series shares a result's name.
MONITOR_PREFIX = "monitor_"


def epoch_metric_name(key: str) -> str:
    """``test_accuracy`` (an epoch's monitored value) -> ``monitor_test_accuracy``; Keras'
    ``loss``, ``accuracy``, ``val_*`` and ``epoch_seconds`` keep their names."""
    name = MONITOR_PREFIX + key if key.startswith("test_") else key
    if name in RESULT_METRICS:
        raise ValueError(f"per-epoch metric {key!r} would take the result name {name!r}")
    return name


def log_epoch(record: dict[str, float]) -> None:
    """One epoch's record (its ``epoch`` key is the step) as the per-epoch series."""
    log_metrics({epoch_metric_name(key): value for key, value in record.items() if key != "epoch"},
                step=int(record["epoch"]))


def log_results(results: dict[str, float]) -> None:
    """A model's results, named from RESULT_METRICS only (a new quantity gets its name there)."""
    unknown = sorted(set(results) - set(RESULT_METRICS))
    if unknown:
        raise ValueError(f"{unknown} are not in tracking.RESULT_METRICS ({sorted(RESULT_METRICS)}); "
                         "name each result from that list or add its name there")
    log_metrics(results)


@_guarded("logging the data set")
def log_dataset(name: str, images: np.ndarray, labels: np.ndarray, context: str,
                data_info: dict[str, Any]) -> None:
    """Images and labels of the prepared data as an MLflow dataset input of the active run
    (the runs table's Dataset column). Source: the prepared arrays' file; digest: the MD5 of
    the arrays' bytes (the same data gives the same digest in every run); tags: where the data
    came from and whether the train/test split is the canonical one."""
    digest = hashlib.md5(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels).tobytes())
    source = (paths.project_root() / paths.PREPARED_ARRAYS).as_uri()
    with warnings.catch_warnings():  # MLflow 3.17 registers its local-file source twice and
        # warns that a file URI "can be interpreted in multiple ways" (both the same class)
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        dataset = mlflow.data.from_numpy(images, targets=labels, source=source, name=name,
                                         digest=digest.hexdigest()[:16])
    tags = {"origin": str(data_info["origin"]), "canonical_split": str(data_info["canonical_split"])}
    # Runs started at once (queue workers) may both find the data set new and both insert it;
    # the loser's insert breaks the unique key.
    _settling_races(lambda: mlflow.log_input(dataset, context=context, tags=tags),
                    lambda error: "dataset_pk" in str(error)
                    or "UNIQUE constraint failed: datasets" in str(error))


@_guarded("logging an HTML page")
def log_html(html: str, artifact_file: str) -> None:
    """A self-contained page (figures inlined): MLflow's artifact viewer shows .html files in
    a sandboxed iframe loaded from a blob: URL, where relative links resolve to nothing."""
    mlflow.log_text(html, artifact_file)


@_guarded("logging metrics")
def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({key: float(value) for key, value in metrics.items()}, step=step)


@_guarded("re-logging the checkpoint's epochs")
def log_missing_steps(records: list[dict[str, float]], step_key: str = "epoch") -> int:
    """Log every (metric, step) of ``records`` (epoch records, named as ``log_epoch`` names
    them) that the active run lacks (a resumed run whose store failed while an epoch was
    logged); returns how many values were logged."""
    client = MlflowClient()
    run_id = mlflow.active_run().info.run_id
    keys = dict.fromkeys(key for record in records for key in record if key != step_key)
    timestamp = int(time.time() * 1000)
    missing = []
    for key in keys:
        name = epoch_metric_name(key)
        logged = {metric.step for metric in client.get_metric_history(run_id, name)}
        missing += [Metric(name, float(record[key]), timestamp, int(record[step_key]))
                    for record in records if key in record and int(record[step_key]) not in logged]
    for start in range(0, len(missing), 1000):  # MLflow's log_batch limit
        client.log_batch(run_id, metrics=missing[start:start + 1000])
    return len(missing)


@_guarded("logging artifacts")
def log_artifacts(*files: Path, folder: str | None = None) -> None:
    for file in files:
        if Path(file).is_dir():
            mlflow.log_artifacts(str(file), artifact_path=folder)
        else:
            mlflow.log_artifact(str(file), artifact_path=folder)


# MLflow 3.17.2's Keras flavour writes the input example into the model folder before it
# creates that folder, so ``mlflow.keras.log_model(..., input_example=...)`` raises
# FileNotFoundError (mlflow issue #16183; its fix, PR #16300, was closed unmerged).
# ``Model.log`` takes any flavour module with a ``save_model``: this one is mlflow.keras with
# the folder made first, so the example lands inside the logged model, as MLflow means it.
def _save_keras_model(path: str, **kwargs: Any) -> None:
    os.makedirs(path, exist_ok=True)
    mlflow.keras.save_model(path=path, **kwargs)


# Model.log records the flavour under the module's __name__
_KERAS_FLAVOR = types.SimpleNamespace(__name__="mlflow.keras", save_model=_save_keras_model)


def model_signature(class_names: list[str] | tuple[str, ...]) -> Any:
    """(n, 28, 28) uint8 pixels in, (n, classes) float32 probabilities out.

    uint8, not float: pyfunc refuses other dtypes, so pixels scaled to [0, 1] cannot pass
    for pixels (the model scales 0-255 itself, fmnist.models)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, IMAGE_SIZE, IMAGE_SIZE))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(class_names)), "probabilities")]))


def model_metadata(class_names: list[str] | tuple[str, ...]) -> dict[str, Any]:
    return {"class_names": list(class_names),
            "input": "uint8 pixels 0-255, shape (n, 28, 28), white item on a black background "
                     "(as Fashion-MNIST)",
            "output": "probabilities, shape (n, classes), column i is class_names[i]"}


@_guarded("logging the model")
def log_keras_model(model: Any, name: str, example: np.ndarray, class_names: list[str] | tuple[str, ...],
                    pip_requirements: list[str]) -> str:
    """Log the model through MLflow's Keras flavour as ``name`` (the run's name); return its URI.

    The logged model holds its signature (``model_signature``), the class names and the
    input contract in its metadata, ``example`` as its input example (MLflow validates that
    it is served correctly) and the given pip requirements (MLflow would otherwise infer them
    in a subprocess).
    """
    example = np.asarray(example)
    if example.dtype != np.uint8 or example.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"input example must be (n, {IMAGE_SIZE}, {IMAGE_SIZE}) uint8 pixels, got "
                         f"{example.shape} {example.dtype}")
    info = mlflow.models.Model.log(
        artifact_path=None, name=name, flavor=_KERAS_FLAVOR, model=model,
        signature=model_signature(class_names), input_example=example,
        metadata=model_metadata(class_names), pip_requirements=pip_requirements)
    return info.model_uri


@_guarded("loading the model")
def load_pyfunc(uri: str) -> tuple[Callable[[np.ndarray], np.ndarray], list[str]]:
    """A logged or registered model (models:/<name>@<alias>, runs:/..., a local MLflow model
    folder) as (predict function, class names from its metadata)."""
    model = mlflow.pyfunc.load_model(uri)
    names = (model.metadata.metadata or {}).get("class_names")
    if not names:
        raise TrackingError(f"the model {uri} names no classes in its metadata (logged before they "
                            "were recorded); train it again")
    return (lambda pixels: np.asarray(model.predict(pixels))), list(names)


@dataclasses.dataclass(frozen=True)
class ModelOrigin:
    """Which model a URI names: its registry entry and the run (and DVC experiment) that
    trained it; empty strings where the URI or the store does not say."""

    uri: str
    name: str = ""
    version: str = ""
    run_id: str = ""
    run_name: str = ""
    dvc_experiment: str = ""
    dvc_stage: str = ""
    git_commit: str = ""

    def describe(self) -> str:
        """One line, e.g. ``fashion-mnist-cnn2 version 1 (models:/fashion-mnist-cnn2@champion),
        trained by MLflow run cnn2-seed0 @ workspace-1a2b3c4 (<id>) in the workspace (no DVC
        experiment), stage train@cnn2, git commit 1a2b3c4``."""
        text = f"{self.name} version {self.version} ({self.uri})" if self.name else self.uri
        if self.run_id:
            text += f", trained by MLflow run {self.run_name or '?'} ({self.run_id})"
            text += (f" in DVC experiment {self.dvc_experiment}" if self.dvc_experiment
                     else " in the workspace (no DVC experiment)")
            if self.dvc_stage:
                text += f", stage {self.dvc_stage}"
            if self.git_commit:
                text += f", git commit {self.git_commit[:7]}"
        return text


def _missing(error: mlflow.exceptions.MlflowException) -> bool:
    return error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def _registered_version(client: MlflowClient, uri: str) -> Any:
    """The model version ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` names;
    a name, alias or version the registry lacks is a TrackingError listing what it has.
    None for the other forms (``models:/<name>/<stage>``, ``models:/m-<id>``)."""
    path = uri.removeprefix("models:/")
    name, alias = path.split("@", 1) if "@" in path else (path.rsplit("/", 1)[0], None)
    version = None if alias is not None or "/" not in path else path.rsplit("/", 1)[1]
    if alias is None and not (version or "").isdigit():
        return None
    try:
        registered = client.get_registered_model(name)
    except mlflow.exceptions.MlflowException as error:
        if not _missing(error):
            raise
        names = sorted(m.name for m in client.search_registered_models())
        raise TrackingError(f"no registered model {name!r} in {mlflow.get_tracking_uri()} (it holds "
                            f"{', '.join(names) if names else 'none'}); the register stage "
                            "registers the trained models (`dvc repro`)") from error
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException as error:
        if not _missing(error):
            raise
        if alias is not None:
            have = f"its aliases: {', '.join(sorted(registered.aliases)) or 'none'}"
            what = f"alias {alias!r}"
        else:
            versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
            have = f"its versions: {', '.join(map(str, versions)) or 'none'}"
            what = f"version {version}"
        raise TrackingError(f"registered model {name!r} in {mlflow.get_tracking_uri()} has no {what} "
                            f"({have})") from error


@_guarded("looking up the model")
def model_origin(uri: str) -> ModelOrigin:
    """Which registered model version and run ``uri`` (``models:/...``, ``runs:/<id>/...``)
    names, read from the store (``use_store`` first); a model the store lacks is a
    TrackingError naming what it holds. Other URIs and local folders: the URI alone."""
    client = MlflowClient()
    name = version = run_id = ""
    if uri.startswith("models:/"):
        found = _registered_version(client, uri)
        if found is not None:
            name, version, run_id = found.name, str(found.version), found.run_id or ""
    elif uri.startswith("runs:/"):
        run_id = uri.removeprefix("runs:/").split("/")[0]
    if not run_id or not run_is_usable(run_id):
        return ModelOrigin(uri, name, version)
    trained = client.get_run(run_id)
    tags = trained.data.tags
    return ModelOrigin(uri, name, version, run_id, trained.info.run_name or "",
                       tags.get("dvc_exp_name", ""), tags.get("dvc_stage", ""), tags.get("git_commit", ""))


@_guarded("loading the model")
def scoring_app(uri: str) -> Any:
    """MLflow's scoring server (the ASGI app of ``mlflow models serve``: /ping, /invocations)
    for the model ``uri``, loaded in this process."""
    from mlflow.pyfunc import scoring_server

    return scoring_server.init(mlflow.pyfunc.load_model(uri))


def load_logged_model(run_id: str, name: str) -> Any:
    """The Keras model logged as ``name`` in run ``run_id``."""
    return mlflow.keras.load_model(f"runs:/{run_id}/{name}")


@_guarded("reading a run's tags")
def run_tags(run_id: str) -> dict[str, str]:
    if not run_is_usable(run_id):
        raise TrackingError(f"MLflow run {run_id} is not in {mlflow.get_tracking_uri()}; re-run its "
                            "train stage (`dvc repro -f train@<variant>-<seed>`) to log it again")
    return dict(MlflowClient().get_run(run_id).data.tags)


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while a write of several steps runs (a version with its tags and
    description; an alias moved from one model to another), then act on them as they would
    have: a Ctrl-C or a SIGTERM (``stage_main``: exit 130) never leaves the registry half-written,
    e.g. with no model holding the alias. Each write takes a second or less."""
    if threading.current_thread() is not threading.main_thread():  # only it handles signals
        yield
        return
    received: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.getsignal(signum) for signum in held}
    for signum in held:
        signal.signal(signum, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            signal.raise_signal(received[0])  # its own handler acts now


@_guarded("registering a model version")
def register_version(model_name: str, run_id: str, logged_name: str, tags: dict[str, str],
                     description: str) -> str:
    """The version of registered model ``model_name`` that holds run ``run_id``'s logged model
    ``logged_name``: the existing one when that run is registered already (re-running adds no
    duplicate), else a new one; ``tags`` and the run's PROVENANCE_TAGS are set on it either
    way. Returns the version."""
    client = MlflowClient()
    logged = run_tags(run_id)
    tags = {**tags, **{key: logged.get(key, "unknown") for key in PROVENANCE_TAGS}}
    with _uninterrupted():
        found = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
        if found:
            version = str(min(int(v.version) for v in found))
        else:
            version = mlflow.register_model(f"runs:/{run_id}/{logged_name}", model_name, tags=tags).version
        client.update_registered_model(model_name, description=description)
        for key, value in tags.items():
            client.set_model_version_tag(model_name, version, key, value)
    return str(version)


@_guarded("setting a registry alias")
def set_alias(model_name: str, version: str, alias: str, prefix: str) -> None:
    """Point ``alias`` at ``version`` of ``model_name``, and remove it from the other registered
    models named ``prefix``... (the alias marks one model a user should take, not one per
    variant)."""
    client = MlflowClient()
    with _uninterrupted():
        for other in client.search_registered_models(filter_string=f"name LIKE '{prefix}%'"):
            if other.name != model_name and alias in (other.aliases or {}):
                client.delete_registered_model_alias(other.name, alias)
        client.set_registered_model_alias(model_name, alias, version)


def _version_entry(version: Any) -> dict[str, Any]:
    return {"model": version.name, "version": str(version.version), "run_id": version.run_id,
            "tags": dict(version.tags or {})}


@_guarded("reading a model version")
def model_version(model_name: str, version: str) -> dict[str, Any] | None:
    """{"model", "version", "run_id", "tags"} of a registered version; None where there is none."""
    try:
        return _version_entry(MlflowClient().get_model_version(model_name, version))
    except mlflow.exceptions.MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


@_guarded("looking up a model version")
def version_of_run(model_name: str, run_id: str) -> dict[str, Any] | None:
    """The (first) version of ``model_name`` that holds run ``run_id``'s model, or None."""
    found = MlflowClient().search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    return _version_entry(min(found, key=lambda v: int(v.version))) if found else None


@_guarded("reading a registry alias")
def alias_version(alias: str, prefix: str) -> dict[str, Any] | None:
    """The version ``alias`` points at among the registered models named ``prefix``...
    (``model_version``'s fields), or None where no model carries it."""
    client = MlflowClient()
    for model in client.search_registered_models(filter_string=f"name LIKE '{prefix}%'"):
        if alias in (model.aliases or {}):
            return _version_entry(client.get_model_version_by_alias(model.name, alias))
    return None


@_guarded("tagging a model version")
def tag_version(model_name: str, version: str, tags: dict[str, str]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)


@_guarded("reading a run's epochs")
def final_epoch_metric(run_id: str, keys: tuple[str, ...]) -> tuple[str, float] | None:
    """(key, value at the last epoch) of the first of ``keys`` that run ``run_id`` logged per
    epoch (``log_epoch``'s names); None where it logged none of them."""
    client = MlflowClient()
    for key in keys:
        history = client.get_metric_history(run_id, key)
        if history:
            return key, max(history, key=lambda metric: (metric.step, metric.timestamp)).value
    return None
