"""A stage's MLflow run, start to end, and what it logs.

``run`` starts (or resumes) a run, tags it with what made it (fmnist.tracking.provenance)
and ends it FINISHED, KILLED or FAILED; a run that could not be ended (the store failed) is
marked FAILED by the next start of the same stage in the same workspace, so no run stays
RUNNING. Every model run logs one vocabulary of metrics: RESULT_METRICS once per run, the
per-epoch series under ``epoch_metric_name``'s names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from mlflow.tracking.context import registry as context_registry

from fmnist import paths
from fmnist.records import DataInfo
from fmnist.tracking.provenance import EXECUTION_TAG, execution, provenance_tags
from fmnist.tracking.store import (
    MAX_PARAM_LENGTH,
    STORE_ERRORS,
    TrackingError,
    guarded,
    not_found,
    reason,
    settling_races,
    store_error,
    use_store,
)

RUN_KEY_TAG = "fmnist.run_key"  # workspace + run name: finds runs an earlier attempt left RUNNING
# MLflow's system metrics (system/cpu_utilization_percentage, system/system_memory_usage_megabytes,
# system/gpu_0_utilization_percentage with nvidia-ml-py, ...): one sample every this many
# seconds (MLflow's default, 10, leaves a GPU run of 20 s with one point and a shorter run
# with none: MLflow drops the samples since its last write when the run ends)
SYSTEM_METRICS_INTERVAL = 2.0


@contextlib.contextmanager
def _system_metrics_interval() -> Iterator[None]:
    """MLflow reads its sampling interval from the environment when a run starts: set it
    for that moment only (a value the user exported wins)."""
    from mlflow.environment_variables import MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL as interval

    # its start/stop lines at INFO, four per run, are noise in a stage's output
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    if interval.defined:
        yield
        return
    interval.set(SYSTEM_METRICS_INTERVAL)
    try:
        yield
    finally:
        interval.unset()


def system_metrics_wanted() -> bool:
    """On, unless MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING is set false in the environment."""
    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING as enabled

    return not enabled.defined or enabled.get()


def run_title(name: str, execution_name: str) -> str:
    """The MLflow run name of run ``name`` (``cnn2-seed0``, a file and registry name: see
    paths.run_name) in a pipeline execution: ``cnn2-seed0 @ small``."""
    return f"{name} @ {execution_name}"


def run_is_usable(run_id: str) -> bool:
    try:
        MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as error:
        if not_found(error):
            return False
        raise store_error(error, f"looking up run {run_id}") from error
    except STORE_ERRORS as error:
        raise store_error(error, f"looking up run {run_id}") from error
    return True


@guarded("marking a run FAILED")
def mark_failed(run_id: str) -> None:
    """A run that can no longer be resumed must not stay RUNNING in the UI."""
    if run_is_usable(run_id):
        MlflowClient().set_terminated(run_id, status="FAILED")


@guarded("tagging a run")
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


@guarded("searching runs")
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
    except STORE_ERRORS as error:
        print(f"WARNING: could not mark MLflow run {run_id} {status} in "
              f"{mlflow.get_tracking_uri()} ({reason(error)}); the next run of this stage "
              "will.")
        if status == "FINISHED":
            raise store_error(error, f"ending run {run_id}") from error


@contextlib.contextmanager
def run(experiment_id: str, name: str, tags: dict[str, str], run_id: str | None = None,
        on_start: Any = None, parent_run_id: str | None = None,
        system_metrics: bool = False) -> Iterator[str]:
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
    # Seeds trained together keep their runs open at once: a run started while another is
    # active goes on MLflow's stack of active runs above it (ended first), not under it.
    sibling = mlflow.active_run() is not None and parent_run_id is None
    try:
        # False, not None: MLflow's own variable must not turn it on for runs that did not ask
        sample = system_metrics and system_metrics_wanted()
        with _system_metrics_interval():
            if run_id is not None and run_is_usable(run_id):
                active = mlflow.start_run(run_id=run_id, nested=sibling, log_system_metrics=sample)
            elif sibling:  # MLflow would make a new nested run the active run's child
                created = MlflowClient().create_run(experiment_id, run_name=title,
                                                    tags=context_registry.resolve_tags({}))
                active = mlflow.start_run(run_id=created.info.run_id, nested=True,
                                          log_system_metrics=sample)
            else:
                active = mlflow.start_run(experiment_id=experiment_id, run_name=title,
                                          parent_run_id=parent_run_id, nested=parent_run_id is not None,
                                          log_system_metrics=sample)
    except STORE_ERRORS as error:
        raise store_error(error, f"starting run {title or run_id}") from error
    try:
        if name:  # a stage's own run (not evaluate adding to train's): what made it
            tags = {**tags, **provenance_tags(), RUN_KEY_TAG: run_key(name),
                    EXECUTION_TAG: where, "mlflow.runName": title}
            _fail_left_running(active.info.experiment_id, run_key(name), active.info.run_id)
        mlflow.set_tags(tags)
        if on_start is not None:
            on_start(active.info.run_id)
    except STORE_ERRORS as error:
        _end("FAILED")
        raise store_error(error, f"starting run {active.info.run_id}") from error
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
        print(f"WARNING: MLflow run {run_id} is not in {uri}; nothing logged to it. To record it "
              f"again, {paths.retrain_remedy()}.")
        yield False
        return
    ended = _run_info(run_id)
    with run(experiment_id="", name="", tags={}, run_id=run_id):
        yield True
    if ended.status == "FINISHED" and ended.end_time:
        _restore_end(run_id, ended.end_time)


@guarded("looking up a run")
def _run_info(run_id: str) -> Any:
    return MlflowClient().get_run(run_id).info


@guarded("restoring a run's end time")
def _restore_end(run_id: str, end_time: int) -> None:
    """The run's Duration stays its training: what was added later does not stretch it."""
    MlflowClient().set_terminated(run_id, status="FINISHED", end_time=end_time)


@guarded("logging params")
def log_params(params: dict[str, Any]) -> None:
    existing = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    fresh = {}
    for key, value in params.items():
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        text = text[:MAX_PARAM_LENGTH]
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
    "compile_seconds": "of train_seconds, the time spent compiling (JAX only)",
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


def log_epoch(record: dict[str, float], run_id: str | None = None) -> None:
    """One epoch's record (its ``epoch`` key is the step) as the per-epoch series of run
    ``run_id`` (default: the active run; seeds trained together have several runs open)."""
    log_metrics({epoch_metric_name(key): value for key, value in record.items() if key != "epoch"},
                step=int(record["epoch"]), run_id=run_id)


def log_results(results: dict[str, float]) -> None:
    """A model's results, named from RESULT_METRICS only (a new quantity gets its name there)."""
    unknown = sorted(set(results) - set(RESULT_METRICS))
    if unknown:
        raise ValueError(f"{unknown} are not in tracking.RESULT_METRICS ({sorted(RESULT_METRICS)}); "
                         "name each result from that list or add its name there")
    log_metrics(results)


@guarded("logging the data set")
def log_dataset(name: str, images: np.ndarray, labels: np.ndarray, context: str,
                data_info: DataInfo) -> None:
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
    tags = {"origin": data_info.origin, "canonical_split": str(data_info.canonical_split)}
    # Runs started at once (queue workers) may both find the data set new and both insert it;
    # the loser's insert breaks the unique key.
    settling_races(lambda: mlflow.log_input(dataset, context=context, tags=tags),
                   lambda error: "dataset_pk" in str(error)
                   or "UNIQUE constraint failed: datasets" in str(error))


@guarded("logging an HTML page")
def log_html(html: str, artifact_file: str) -> None:
    """A self-contained page (figures inlined): MLflow's artifact viewer shows .html files in
    a sandboxed iframe loaded from a blob: URL, where relative links resolve to nothing."""
    mlflow.log_text(html, artifact_file)


@guarded("logging metrics")
def log_metrics(metrics: dict[str, float], step: int | None = None, run_id: str | None = None) -> None:
    mlflow.log_metrics({key: float(value) for key, value in metrics.items()}, step=step, run_id=run_id)


@guarded("logging epochs")
def log_epochs(records: list[dict[str, float]], run_id: str | None = None) -> None:
    """Epoch records (``log_epoch``'s names, step = ``epoch``) in one write to run ``run_id``
    (default: the active run)."""
    run_id = run_id or mlflow.active_run().info.run_id
    timestamp = int(time.time() * 1000)
    metrics = [Metric(epoch_metric_name(key), float(value), timestamp, int(record["epoch"]))
               for record in records for key, value in record.items() if key != "epoch"]
    for start in range(0, len(metrics), 1000):  # MLflow's log_batch limit
        MlflowClient().log_batch(run_id, metrics=metrics[start:start + 1000])


@guarded("re-logging the checkpoint's epochs")
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


@guarded("logging artifacts")
def log_artifacts(*files: Path, folder: str | None = None) -> None:
    for file in files:
        if Path(file).is_dir():
            mlflow.log_artifacts(str(file), artifact_path=folder)
        else:
            mlflow.log_artifact(str(file), artifact_path=folder)


@guarded("reading a run's tags")
def run_tags(run_id: str) -> dict[str, str]:
    if not run_is_usable(run_id):
        raise TrackingError(f"MLflow run {run_id} is not in {mlflow.get_tracking_uri()}; to log it "
                            f"again, {paths.retrain_remedy()}")
    return dict(MlflowClient().get_run(run_id).data.tags)


@guarded("reading a run's epochs")
def final_epoch_metric(run_id: str, keys: tuple[str, ...]) -> tuple[str, float] | None:
    """(key, value at the last epoch) of the first of ``keys`` that run ``run_id`` logged per
    epoch (``log_epoch``'s names); None where it logged none of them."""
    client = MlflowClient()
    for key in keys:
        history = client.get_metric_history(run_id, key)
        if history:
            return key, max(history, key=lambda metric: (metric.step, metric.timestamp)).value
    return None

