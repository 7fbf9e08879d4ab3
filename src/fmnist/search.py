"""A hyperparameter search with Optuna, beside the pipeline (not a DVC stage; docs/search.md).

    python -m fmnist.search [--workers N] [--storage URL]      (make search)

params.yaml's ``search`` section says what: the base variant, the space over its model and
recipe keys, the trials, sampler and pruner. Each trial trains through the pipeline's own
code (fmnist.models, fmnist.recipes, ``training.fit``: the same models, recipes, backend and
precision) on ``train_size`` training images and is scored by its final-epoch accuracy on
``validation_size`` other training images; each epoch's validation accuracy goes to the
pruner. **The test set is never read**: a trial's data holds no test images and
``train.monitor_test`` is off for it.

Every trial is an MLflow run nested under the search's run (in the experiment
``<tracking.experiment>-search``): its params, per-epoch curves and state (complete, pruned,
failed). The search's run gets each parameter's importance and the optimization history.
The best trial is written as a variant block (reports/search/<study>.yaml, and printed) to
paste into params.yaml's ``variants``: `dvc repro` then trains it on the whole training set
with every seed, and only then does the test set see it.

Workers: ``--workers N`` starts N processes on this machine, each loading the study from the
storage; the same command on another machine with a shared ``postgresql://`` storage joins
the same search. A stopped search resumes: the study is loaded, not created again; a trial
stopped by Ctrl-C, or whose worker was killed (its heartbeat stops; Optuna marks it failed
after two heartbeats), is marked failed, its MLflow run too, and its values run again.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import typing
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fmnist import cli, device, paths, tracking
from fmnist.cli import Interrupted
from fmnist.config import Config, ConfigError, ModelSpec, Recipe, SearchConfig
from fmnist.data import IMAGE_SIZE, Dataset, hold_out_validation, load_prepared
from fmnist.files import atomic_path, write_json, write_text
from fmnist.params import flatten, load_params

OBJECTIVE = "val_accuracy"  # the final epoch's, on the search's own validation split
FAILURE_ATTR = "failure"    # a trial that failed because of its values (diverged): it counts as run
RUN_ATTR = "mlflow_run"
SETTINGS_ATTR = "settings"  # what the study's trials were made with; a resumed study must match


class SearchError(RuntimeError):
    """The search cannot go on (a worker failed, the storage cannot be used)."""


def search_settings(config: Config) -> dict[str, Any]:
    """What makes two trials comparable: the search's data, epochs, seed and space, and the base
    variant's model and recipe (n_trials, the sampler, the pruner and the storage may change
    between runs of one study)."""
    search = _search(config)
    keys = ("base_variant", "space", "epochs", "train_size", "validation_size", "validation_seed", "seed")
    return json.loads(json.dumps({
        **{key: getattr(search, key) for key in keys},
        "model": dataclasses.asdict(config.variant(search.base_variant)),
        "recipe": dataclasses.asdict(config.recipe(search.base_variant)),
        "batch_size": config.train.batch_size, "backend": config.train.backend,
        "precision": config.train.precision}))


def _search(config: Config) -> SearchConfig:
    if config.search is None:
        raise ConfigError("params.yaml: missing section search (what to search; see docs/search.md)")
    if config.search.base_variant not in config.variants:
        raise ConfigError(f"params.yaml: search.base_variant = {config.search.base_variant!r} is invalid; "
                          f"allowed: {', '.join(config.variants)}")
    return config.search


def storage_url(search: SearchConfig, override: str | None = None) -> str:
    """``--storage``, else ``search.storage``, else SQLite's search.db at the project root."""
    url = override or search.storage
    return url or f"sqlite:///{paths.project_root() / paths.SEARCH_DB}"


def shown_url(url: str) -> str:
    """``url`` without a password (it is printed and logged)."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if at and ":" in credentials:
        return f"{scheme}{sep}{credentials.split(':', 1)[0]}:***@{host}"
    return url


# --- the data ---------------------------------------------------------------------------------

def trial_data(data: Dataset, search: SearchConfig) -> Dataset:
    """The search's split of the prepared TRAINING images: ``validation_size`` held out
    (stratified, ``validation_seed``), ``train_size`` of the rest trained on (stratified; 0:
    all). Its test arrays are empty: no trial can compute a test-set number."""
    available = len(data.y_train)
    if search.validation_size >= available:
        raise ConfigError(f"params.yaml: search.validation_size = {search.validation_size} is invalid; "
                          f"allowed: fewer than the {available} prepared training images")
    x_train, y_train, x_val, y_val = hold_out_validation(data.x_train, data.y_train,
                                                         search.validation_size, search.validation_seed)
    if search.train_size > len(y_train):
        raise ConfigError(f"params.yaml: search.train_size = {search.train_size} is invalid; allowed: 0 "
                          f"(all) or at most {len(y_train)} (the prepared training images the "
                          "validation split leaves)")
    if 0 < search.train_size < len(y_train):
        x_train, y_train, _, _ = hold_out_validation(x_train, y_train, len(y_train) - search.train_size,
                                                     search.validation_seed)
    no_images = np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    return Dataset(x_train, y_train, x_val, y_val, no_images, np.zeros(0, np.uint8))


# --- the study --------------------------------------------------------------------------------

def _optuna():
    """Optuna, its experimental-feature warnings (heartbeats) and per-trial INFO lines quiet:
    this module prints one line per epoch and per trial."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def open_storage(url: str, heartbeat_s: int) -> Any:
    """Optuna's RDB storage at ``url`` with heartbeats: a RUNNING trial whose worker has been
    silent for two heartbeats is marked FAIL (``_on_stale``) by the next trial to start."""
    optuna = _optuna()
    # SQLite: wait for a lock held by another worker rather than fail at once
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat_s,
                                          grace_period=2 * heartbeat_s,
                                          heartbeat_stale_trial_callback=_on_stale)
    except Exception as error:  # noqa: BLE001 (SQLAlchemy's and the drivers' many kinds)
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise SearchError(f"the search storage {shown_url(url)} cannot be opened: {reason}") from error


def _on_stale(study: Any, trial: Any) -> None:
    """A trial whose worker stopped answering (killed): its MLflow run is marked FAILED and its
    values are queued to run again."""
    optuna = _optuna()
    optuna.storages.RetryFailedTrialCallback()(study, trial)
    run_id = trial.user_attrs.get(RUN_ATTR)
    if run_id:
        tracking.mark_failed(run_id)
    print(f"[search] trial {trial.number}: its worker stopped answering; marked failed, its values "
          "queued to run again", flush=True)


def _sampler(search: SearchConfig) -> Any:
    optuna = _optuna()
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=search.sampler_seed)
    return optuna.samplers.TPESampler(seed=search.sampler_seed)


def _pruner(search: SearchConfig) -> Any:
    optuna = _optuna()
    if search.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=search.pruner_startup_trials,
                                           n_warmup_steps=search.pruner_warmup_epochs)
    if search.pruner == "threshold":
        return optuna.pruners.ThresholdPruner(lower=search.prune_below,
                                              n_warmup_steps=search.pruner_warmup_epochs)
    return optuna.pruners.NopPruner()


def open_study(config: Config, url: str) -> Any:
    """The study ``search.study`` in ``url``: created, or loaded to go on. A study made with
    other settings (``search_settings``) is a one-line error, not a mix of incomparable trials."""
    optuna = _optuna()
    search = _search(config)
    storage = open_storage(url, search.heartbeat_s)
    study = optuna.create_study(storage=storage, study_name=search.study, direction="maximize",
                                sampler=_sampler(search), pruner=_pruner(search), load_if_exists=True)
    settings = search_settings(config)
    made_with = study.user_attrs.get(SETTINGS_ATTR)
    if made_with is None:
        study.set_user_attr(SETTINGS_ATTR, settings)
    elif made_with != settings:
        changed = sorted(key for key in settings.keys() | made_with.keys()
                         if settings.get(key) != made_with.get(key))
        raise ConfigError(f"params.yaml: search.study = {search.study!r} is invalid; allowed: a new name, "
                          f"or the settings the study in {shown_url(url)} was made with (changed: "
                          f"{', '.join(changed)})")
    return study


def trials_run(study: Any) -> int:
    """The trials that count towards ``n_trials``: complete, pruned, running, and failed
    because of their values (diverged); not those stopped by Ctrl-C, a kill or a crash, whose
    values run again."""
    from optuna.trial import TrialState

    return sum(1 for trial in study.get_trials(deepcopy=False)
               if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
               or (trial.state == TrialState.FAIL and FAILURE_ATTR in trial.user_attrs))


# --- one trial --------------------------------------------------------------------------------

def suggest(trial: Any, search: SearchConfig) -> dict[str, Any]:
    """The trial's value of every key of the space: a whole number where both ends of a range
    are whole and the key is not a float."""
    hints = {**typing.get_type_hints(ModelSpec), **typing.get_type_hints(Recipe)}
    values = {}
    for key, entry in search.space.items():
        ((form, bounds),) = entry.items()
        if form == "choices":
            values[key] = trial.suggest_categorical(key, bounds)
        elif all(isinstance(v, int) for v in bounds) and hints[key] is not float:
            values[key] = trial.suggest_int(key, bounds[0], bounds[1], log=form == "log_range")
        else:
            values[key] = trial.suggest_float(key, float(bounds[0]), float(bounds[1]),
                                              log=form == "log_range")
    return values


class Objective:
    """One worker's trials: each trains the base variant with the trial's values through
    ``training.fit``, logs a nested MLflow run and returns the final epoch's val_accuracy."""

    def __init__(self, config: Config, data: Dataset, experiment_id: str, parent_run_id: str):
        self.config = config
        self.search = _search(config)
        self.data = data
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id

    def __call__(self, trial: Any) -> float:
        optuna = _optuna()
        from fmnist.training import TrainingError  # noqa: PLC0415 (imports Keras: after the backend)

        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        values = suggest(trial, self.search)
        try:
            return self._train(trial, values)
        except optuna.TrialPruned:
            raise
        except (TrainingError, ConfigError) as error:  # diverged, or values that cannot go together
            trial.set_user_attr(FAILURE_ATTR, str(error))
            print(f"[search] trial {trial.number}: failed: {error}", flush=True)
            raise
        except KeyboardInterrupt:
            trial.study.enqueue_trial(trial.params)  # its values run again when the search resumes
            raise

    def _train(self, trial: Any, values: dict[str, Any]) -> float:
        import keras

        from fmnist import progress, recipes, training  # noqa: PLC0415 (Keras: after the backend)
        from fmnist.models import build_model  # noqa: PLC0415

        optuna = _optuna()
        config, search, data = self.config, self.search, self.data
        spec, recipe = config.searched_variant(values, where=f"search trial {trial.number}")
        # the trial's recipe and epochs; the test set neither monitored nor passed (trial_data)
        train = dataclasses.replace(config.train, **dataclasses.asdict(recipe), epochs=search.epochs,
                                    seeds=(search.seed,), monitor_test=False)
        name = f"{search.study}-trial{trial.number}"
        history: list[dict[str, float]] = []
        state = "complete"
        keras.utils.set_random_seed(search.seed)
        with device.training_setup(config.train.precision) as (precision, _devices):
            model = recipes.compile_model(build_model(spec, search.base_variant), recipe, search.epochs,
                                          len(data.y_train), train.batch_size)
            tags = {"kind": "search-trial", "search_study": search.study, "search_trial": str(trial.number),
                    "variant": search.base_variant, "seed": str(search.seed),
                    "keras_backend": device.backend(), "precision": precision, "device": device.describe()}
            started = time.perf_counter()
            with tracking.run(self.experiment_id, name, tags, parent_run_id=self.parent_run_id,
                              on_start=lambda run_id: trial.set_user_attr(RUN_ATTR, run_id)) as run_id:
                tracking.log_params(flatten({
                    "variant": search.base_variant, "seed": search.seed, "model": spec,
                    "train": {k: v for k, v in dataclasses.asdict(train).items() if k != "seeds"},
                    "data": {"train": len(data.y_train), "validation": len(data.y_val), "test": 0},
                    "search": {"study": search.study, "trial": trial.number, **values}}))
                line = progress.EpochLine(f"[search {search.study} trial {trial.number}]", search.epochs)

                def on_epoch(record: dict[str, float]) -> None:
                    history.append(record)
                    tracking.log_epoch(record)
                    line(record)
                    trial.report(record[OBJECTIVE], int(record["epoch"]))
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"{OBJECTIVE} {record[OBJECTIVE]:.4f} at epoch "
                                                 f"{int(record['epoch'])}")

                recorder = training.EpochRecorder(on_epoch, None, train.batch_size)
                try:
                    with cli.stop_at_safe_points():
                        training.fit(model, data, train, [training.StopWhenAsked(), recorder],
                                     seed=search.seed)
                except optuna.TrialPruned:
                    state = "pruned"
                tracking.log_results({"train_seconds": round(time.perf_counter() - started, 1)})
                tracking.tag_run(run_id, {"search_state": state})
        keras.backend.clear_session()  # the next trial's model starts from an empty graph
        value = history[-1][OBJECTIVE]
        print(f"[search] trial {trial.number}: {state}, {OBJECTIVE} {value:.4f} after epoch "
              f"{len(history)} ({', '.join(f'{k} {_short(v)}' for k, v in values.items())})", flush=True)
        if state == "pruned":
            raise optuna.TrialPruned(f"{OBJECTIVE} {value:.4f} at epoch {len(history)}")
        return value


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_trials(config: Config, url: str) -> int:
    """This worker's part: trials of the study until ``n_trials`` have run (see ``trials_run``);
    returns how many it ran."""
    optuna = _optuna()
    from fmnist.training import TrainingError  # noqa: PLC0415 (imports Keras: after the backend)

    search = _search(config)
    study = optuna.load_study(study_name=search.study, storage=open_storage(url, search.heartbeat_s),
                              sampler=_sampler(search), pruner=_pruner(search))
    parent_run_id = study.user_attrs.get(RUN_ATTR)
    if not parent_run_id:
        raise SearchError(f"the study {search.study} in {shown_url(url)} has no MLflow run yet: start the "
                          "search with `python -m fmnist.search` (without --worker)")
    data = trial_data(load_prepared(paths.PREPARED_ARRAYS), search)
    experiment_id = tracking.connect(tracking.search_experiment(config.tracking.experiment))
    optuna.storages.fail_stale_trials(study)  # a killed worker's trials, before counting
    before = len(study.get_trials(deepcopy=False))
    if trials_run(study) >= search.n_trials:
        return 0

    def stop_when_done(study: Any, trial: Any) -> None:
        if trials_run(study) >= search.n_trials:
            study.stop()

    try:
        study.optimize(Objective(config, data, experiment_id, parent_run_id),
                       catch=(TrainingError, ConfigError), callbacks=[stop_when_done])
    except KeyboardInterrupt as error:
        raise Interrupted("interrupted; the trial running is marked failed and its values run again: "
                          "run the same command to resume the search") from error
    return len(study.get_trials(deepcopy=False)) - before


@contextlib.contextmanager
def _workers(count: int, url: str) -> Iterator[list[subprocess.Popen]]:
    """``count`` worker processes (``--worker``), each in its own session: a Ctrl-C at the
    terminal reaches them once, through this process, which stops those still running."""
    command = [sys.executable, "-m", "fmnist.search", "--worker", "--storage", url]
    processes = [subprocess.Popen(command, start_new_session=True) for _ in range(count)]
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # their trials end KILLED and run again
        for process in processes:
            process.wait()


def run_workers(count: int, url: str) -> None:
    """The trials in ``count`` processes on this machine, all loading the study from ``url``."""
    try:
        with _workers(count, url) as processes:
            codes = [process.wait() for process in processes]
    except KeyboardInterrupt as error:
        raise Interrupted("interrupted; the workers' running trials are marked failed and their values "
                          "run again: run the same command to resume the search") from error
    failed = [code for code in codes if code != 0]
    if failed:
        raise SearchError(f"{len(failed)} of {count} workers failed (exit codes {failed}; see their "
                          "output above); their trials are marked failed: run the same command to resume")


# --- the result -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Summary:
    counts: dict[str, int]              # trials by state
    best_trial: int | None
    best_value: float | None
    importance: dict[str, float]        # fANOVA, normalised; empty with fewer than 2 complete trials
    variant_yaml: str                   # the block to paste into params.yaml's variants ("" if none)


def _rounded(value: Any) -> Any:
    """Floats to 4 significant digits: a variant a person reads (and the values are not exact
    optima anyway)."""
    return float(f"{value:.4g}") if isinstance(value, float) else value


def variant_block(config: Config, values: dict[str, Any]) -> dict[str, Any]:
    """The best trial as a params.yaml variant: the base variant's keys as written, the
    searched ones overriding (rounded), checked as a variant."""
    search = _search(config)
    values = {key: _rounded(value) for key, value in values.items()}
    config.searched_variant(values)
    return {**config.variant_keys[search.base_variant], **values}


def summarise(config: Config, study: Any) -> Summary:
    """Count the trials, write the best as a variant block, the parameter importances and the
    optimization history (reports/search/), and log them to the active (the search's) run."""
    optuna = _optuna()
    from optuna.trial import TrialState

    search = _search(config)
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(1 for t in trials if t.state == state)
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
    tracking.log_metrics({f"trials_{state}": count for state, count in counts.items()})
    files = paths.search_files(search.study)
    if counts["complete"] == 0:
        return Summary(counts, None, None, {}, "")
    best = study.best_trial
    importance: dict[str, float] = {}
    if counts["complete"] >= 2:
        try:
            importance = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError) as error:  # e.g. a parameter that never varied
            print(f"[search] parameter importance not computed: {error}")
    block = variant_block(config, best.params)
    header = (f"# The best trial of search {search.study} (trial {best.number}; {counts['complete']} "
              f"complete, {counts['pruned']} pruned, {counts['fail']} failed): {OBJECTIVE} "
              f"{best.value:.4f} after {search.epochs} epochs\n# on {search.train_size or 'all'} training "
              f"images, {search.validation_size} held out (seed {search.validation_seed}); the test set "
              "was not read.\n# Paste under `variants:` in params.yaml; `dvc repro` trains it on the whole "
              "training set with every seed.\n")
    text = header + yaml.safe_dump({search.study: block}, sort_keys=False, default_flow_style=None)
    write_text(files["variant"], text)
    write_json(files["importance"], {"objective": OBJECTIVE, "importance": importance})
    _history_figure(study, files["history"])
    tracking.log_metrics({f"best_{OBJECTIVE}": best.value, "best_trial": best.number,
                          **{f"importance_{key}": value for key, value in importance.items()}})
    tracking.log_artifacts(files["variant"], files["importance"], files["history"])
    return Summary(counts, best.number, best.value, importance, text)


def _history_figure(study: Any, path: Path) -> None:
    """Optuna's optimization-history plot (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as optuna_plots

    axes = optuna_plots.plot_optimization_history(study, target_name=OBJECTIVE)
    with atomic_path(path) as tmp:
        axes.figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(axes.figure)


# --- the command ------------------------------------------------------------------------------

def search(config: Config, url: str, workers: int = 1) -> Summary:
    """Run (or resume, or join) the search: the study and its MLflow run, the trials (here, or
    in ``workers`` processes), then the summary."""
    study = open_study(config, url)
    search_config = _search(config)
    experiment_id = tracking.connect(tracking.search_experiment(config.tracking.experiment))
    tags = {"kind": "search", "search_study": search_config.study, "variant": search_config.base_variant,
            "search_storage": shown_url(url)}
    with tracking.run(experiment_id, search_config.study, tags, run_id=study.user_attrs.get(RUN_ATTR),
                      on_start=lambda run_id: study.set_user_attr(RUN_ATTR, run_id)):
        tracking.log_params(flatten({"search": {
            key: value for key, value in dataclasses.asdict(search_config).items()
            if key not in ("storage", "n_trials")}}))
        print(f"[search] study {search_config.study} in {shown_url(url)}: {trials_run(study)} of "
              f"{search_config.n_trials} trials run; {workers} worker(s)", flush=True)
        if workers == 1:
            run_trials(config, url)
        else:
            run_workers(workers, url)
        return summarise(config, study)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run params.yaml's hyperparameter search (docs/search.md).")
    parser.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    parser.add_argument("--storage", help="the study's storage URL, over search.storage (e.g. a "
                                          "postgresql:// URL with a password that must not be in git)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # started by --workers
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be 1 or more")
    config = load_params(paths.PARAMS)
    url = storage_url(_search(config), args.storage)
    device.select_backend(config.train.backend)  # before Keras is first imported
    if args.worker:
        run_trials(config, url)
        return
    summary = search(config, url, args.workers)
    print("[search] trials: " + ", ".join(f"{count} {state}" for state, count in summary.counts.items()))
    if summary.best_trial is None:
        print("[search] no trial completed: no variant to suggest")
        return
    files = paths.search_files(_search(config).study)
    if summary.importance:
        print("[search] importance: " + ", ".join(f"{key} {value:.2f}"
                                                  for key, value in summary.importance.items()))
    print(f"[search] best: trial {summary.best_trial}, {OBJECTIVE} {summary.best_value:.4f}; written to "
          f"{files['variant']} (and {files['history'].name}):\n")
    print(summary.variant_yaml)


if __name__ == "__main__":
    cli.stage_main(main)
