"""All of MLflow, behind a few functions: nothing else in the project imports mlflow.

The store is ``MLFLOW_TRACKING_URI`` when set, else the SQLite file mlflow.db at the
project root (``DVC_ROOT`` under ``dvc exp run --queue``), with artifacts in mlartifacts/
beside it. One run per trained model (variant x seed) and one for the SVC baseline, in the
experiment ``tracking.experiment``, all logging one vocabulary of metrics (see
RESULT_METRICS); the evaluate stage resumes a model's run by its id to add its results and
figures, keeping the run's end time. The analysis of each pipeline execution is a run of its
own experiment (``analysis_experiment``), so its summary numbers stay out of the model runs'
table and charts.

Its modules, by job (each name below is re-exported here: callers use ``tracking.connect``):

- ``store``: which store, opening it and its experiments, and its faults: every failure of
  the store (an HTTP error or timeout, a full disk) becomes a one-line TrackingError naming
  the store; MLflow's HTTP client is bounded by project defaults unless the user set
  MLflow's own variables.
- ``provenance``: what made a run (git commit, DVC experiment, changed params) and the
  pipeline execution it belongs to.
- ``runs``: a run's lifecycle (a run that could not be ended is marked FAILED by the next
  start of the same stage in the same workspace, so no run stays RUNNING) and what it logs.
- ``models``: logging a Keras model, loading and serving it, tracing a model URI to its run.
- ``registry``: registered versions, their tags and aliases.

Importing the package sets nothing: MLflow is configured by ``use_store`` and ``connect``.
"""

from fmnist.tracking.models import (
    ModelOrigin,
    load_logged_model,
    load_pyfunc,
    log_keras_model,
    model_metadata,
    model_origin,
    model_signature,
    scoring_app,
)
from fmnist.tracking.provenance import (
    EXECUTION_TAG,
    PIPELINE_INPUTS,
    PROVENANCE_TAGS,
    execution,
    git_commit,
    params_changed,
    provenance_tags,
    workspace_committed,
)
from fmnist.tracking.registry import (
    alias_version,
    messages_off,
    model_version,
    register_version,
    set_alias,
    tag_version,
    version_of_run,
)
from fmnist.tracking.runs import (
    MONITOR_PREFIX,
    RESULT_METRICS,
    RUN_KEY_TAG,
    analysis_experiment,
    epoch_metric_name,
    final_epoch_metric,
    finished_runs,
    log_artifacts,
    log_dataset,
    log_epoch,
    log_epochs,
    log_html,
    log_metrics,
    log_missing_steps,
    log_params,
    log_results,
    mark_failed,
    resume,
    run,
    run_is_usable,
    run_key,
    run_tags,
    run_title,
    search_experiment,
    tag_run,
)
from fmnist.tracking.store import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    HTTP_DEFAULTS,
    TrackingError,
    connect,
    tracking_uri,
    use_store,
)

__all__ = [
    # store
    "EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "HTTP_DEFAULTS", "TrackingError", "connect",
    "tracking_uri", "use_store",
    # provenance
    "EXECUTION_TAG", "PIPELINE_INPUTS", "PROVENANCE_TAGS", "execution", "git_commit",
    "params_changed", "provenance_tags", "workspace_committed",
    # runs
    "MONITOR_PREFIX", "RESULT_METRICS", "RUN_KEY_TAG", "analysis_experiment", "epoch_metric_name",
    "final_epoch_metric", "finished_runs", "log_artifacts", "log_dataset", "log_epoch", "log_epochs",
    "log_html", "log_metrics", "log_missing_steps", "log_params", "log_results", "mark_failed",
    "resume", "run", "run_is_usable", "run_key", "run_tags", "run_title", "search_experiment", "tag_run",
    # models
    "ModelOrigin", "load_logged_model", "load_pyfunc", "log_keras_model", "model_metadata",
    "model_origin", "model_signature", "scoring_app",
    # registry
    "alias_version", "messages_off", "model_version", "register_version", "set_alias", "tag_version",
    "version_of_run",
]
