"""The MLflow store: which one (``tracking_uri``), opening it (``use_store``, ``connect``),
and its faults, shared by the package's other modules.

Every failure of the store (an HTTP error or timeout, a full disk) becomes a one-line
TrackingError naming the store (``guarded``). MLflow's HTTP client is bounded by project
defaults (HTTP_DEFAULTS) unless the user set MLflow's own variables; they are set when a
server store is opened, never on import.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import requests
import sqlalchemy.exc
from mlflow.tracking import MlflowClient

from fmnist import paths

MAX_PARAM_LENGTH = 6000  # characters of a param value MLflow stores
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


class TrackingError(RuntimeError):
    """The tracking store cannot be used."""


STORE_ERRORS = (mlflow.exceptions.MlflowException, requests.exceptions.RequestException,
                sqlalchemy.exc.SQLAlchemyError, OSError)


def reason(error: BaseException) -> str:
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


class _QuietStore(logging.Filter):
    """MLflow's store (mlflow.store.db.utils) says when it creates or updates its tables, a
    line the user did not ask for, and logs each database error with its traceback before it
    raises it: the TrackingError that follows says the same in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and not record.getMessage().startswith(
            "SQLAlchemy database error")


_STORE_LOGGER = "mlflow.store.db.utils"


def store_error(error: BaseException, doing: str) -> TrackingError:
    uri = mlflow.get_tracking_uri()
    return TrackingError(f"MLflow tracking store {uri} failed while {doing}: {reason(error)}")


def not_found(error: mlflow.exceptions.MlflowException) -> bool:
    """The store answered that the run, model or version asked for is not there."""
    return error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def guarded(doing: str):
    """Turn the store's failures (HTTP errors, timeouts, SQLite errors, a full disk) into a
    TrackingError that names the store."""
    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except TrackingError:
                raise
            except STORE_ERRORS as error:
                raise store_error(error, doing) from error
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
    if not debugging and not any(isinstance(f, _QuietStore) for f in store_logger.filters):
        store_logger.addFilter(_QuietStore())
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


@guarded("creating or opening the store")
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


@guarded("opening the experiment")
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

    return settling_races(find_or_create, lambda error: error.error_code == "RESOURCE_ALREADY_EXISTS")


def settling_races(action: Callable[[], Any], lost_race: Callable[[Exception], bool],
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

