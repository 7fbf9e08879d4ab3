"""The hyperparameter search (fmnist.search) on tiny data: the space's errors before any trial,
trials that prune and log nested MLflow runs, no test-set number anywhere, two workers on
one PostgreSQL study, and a killed search that resumes."""

from __future__ import annotations

import copy
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from fmnist import download, paths, search, tracking, tracking_server, training
from fmnist.config import ConfigError, parse_params
from fmnist.prepare import prepare
from tests.conftest import REPO, TINY_TRAIN_PER_CLASS, venv_env


def _name(run) -> str:
    """A run's name within its pipeline execution (MLflow's adds ``@ <execution>``)."""
    return run.info.run_name.split(" @ ")[0]


EXPERIMENT = "fashion-mnist-cnn-search"  # params.yaml's tracking.experiment + "-search"
HAS_POSTGRES = bool(shutil.which("pg_ctl")) or bool(list(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")))


def tiny_search(raw: dict, **settings) -> dict:
    """``raw`` (shrunk params) with a search small enough for tiny data: CNN2, a learning rate
    that learns and one that cannot (1e-9: the seed's initial model, every epoch), 2 epochs."""
    raw = copy.deepcopy(raw)
    raw["search"].update({
        "base_variant": "cnn2", "n_trials": 4, "epochs": 2, "train_size": 0, "validation_size": 60,
        "space": {"learning_rate": {"choices": [0.01, 1.0e-9]}, "dropout_rate": {"range": [0.2, 0.5]}},
        "sampler": "random", "pruner": "median", "pruner_startup_trials": 1, "pruner_warmup_epochs": 0,
        **settings})
    return raw


def make_project(root: Path, raw: dict, idx_dir: Path) -> Path:
    """A project folder as the search sees it: params.yaml and the prepare stage's arrays."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    config = parse_params(raw)
    download.download(config.data, root / paths.DATA_RAW, local_dir=idx_dir)
    prepare(root / paths.DATA_RAW, root / paths.PREPARED_ARRAYS, root / paths.PREPARED_INFO,
            validation_size=0, validation_seed=0)
    return root


def search_env(root: Path) -> dict[str, str]:
    env = venv_env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    env["DVC_ROOT"] = str(root)
    return env


def run_search(root: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fmnist.search", *args], cwd=root, capture_output=True,
                          text=True, env=search_env(root), timeout=timeout)


def load_study(root: Path, raw: dict, url: str | None = None):
    return optuna.load_study(study_name=raw["search"]["study"],
                             storage=url or f"sqlite:///{root / paths.SEARCH_DB}")


def search_runs(root: Path) -> tuple:
    """(the search's run, its trials' runs) in the project's MLflow store."""
    client = MlflowClient(f"sqlite:///{root / paths.MLFLOW_DB}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [run for run in runs if run.data.tags.get("kind") == "search"]
    trials = [run for run in runs if run.data.tags.get("kind") == "search-trial"]
    assert len(parents) == 1
    return client, parents[0], trials


# --- the space: one-line errors before any trial runs -------------------------------------------

@pytest.mark.parametrize(("space", "message"), [
    ({"learning_rat": {"range": [0.001, 0.01]}},
     "params.yaml: unknown key search.space.learning_rat; allowed keys: blocks, "),
    ({"learning_rate": {"range": [0.01, 0.001]}},
     "params.yaml: search.space.learning_rate.range = [0.01, 0.001] is invalid; allowed: [low, high] "
     "with low < high"),
    ({"dropout_rate": {"range": [0.3, 0.3]}},
     "params.yaml: search.space.dropout_rate.range = [0.3, 0.3] is invalid; allowed: [low, high] with "
     "low < high"),
    ({"learning_rate": {"log_range": [0, 0.01]}},
     "params.yaml: search.space.learning_rate.log_range = [0, 0.01] is invalid; allowed: [low, high] "
     "with 0 < low < high"),
    ({"augment_flip": {"choices": []}},
     "params.yaml: search.space.augment_flip.choices = [] is invalid; allowed: a non-empty list"),
    ({"dropout_rate": {"between": [0.1, 0.5]}},
     "params.yaml: search.space.dropout_rate = {'between': [0.1, 0.5]} is invalid; allowed: {range: "),
    ({"dropout_rate": {"range": [0.1, 1.5]}},  # the high end is no dropout rate
     "params.yaml: search.space.dropout_rate = 1.5 is invalid; allowed: a number in [0, 1)"),
    ({"augment_translate": {"range": [0.5, 2]}},  # a whole-number key
     "params.yaml: search.space.augment_translate = 0.5 is invalid; allowed: a whole number"),
    ({}, "params.yaml: search.space = {} is invalid; allowed: at least one key to search"),
])
def test_a_bad_space_is_a_one_line_error_naming_the_key(tiny_params, space, message):
    raw = copy.deepcopy(tiny_params)
    raw["search"]["space"] = space
    with pytest.raises(ConfigError) as error:
        parse_params(raw)
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_a_weight_decay_search_on_an_adam_variant_is_refused(tiny_params):
    raw = copy.deepcopy(tiny_params)
    raw["search"].update(base_variant="cnn2", space={"weight_decay": {"log_range": [0.01, 0.1]}})
    with pytest.raises(ConfigError, match=r"^params.yaml: search.space.weight_decay = 0.01 is invalid; "
                                          r"allowed: a number >= 0 with optimizer adamw"):
        parse_params(raw)


def test_an_unknown_base_variant_is_refused_by_the_search_not_the_pipeline(tiny_params):
    # a variant removed from params.yaml must not stop `dvc repro` (check_params notes it)
    raw = copy.deepcopy(tiny_params)
    raw["search"]["base_variant"] = "cnn9"
    config = parse_params(raw)
    assert any(note.startswith("search.base_variant 'cnn9' skipped") for note in config.notes)
    with pytest.raises(ConfigError, match="^params.yaml: search.base_variant = 'cnn9' is invalid; allowed: "
                                          "cnn2, "):
        search._search(config)


def test_the_command_stops_on_a_bad_space_before_any_trial(tmp_path, tiny_params):
    raw = copy.deepcopy(tiny_params)
    raw["search"]["space"] = {"learning_rate": {"range": [0.01, 0.001]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    result = run_search(tmp_path, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip() == ("ERROR: params.yaml: search.space.learning_rate.range = [0.01, 0.001] "
                                     "is invalid; allowed: [low, high] with low < high")
    assert not (tmp_path / paths.SEARCH_DB).exists() and not (tmp_path / paths.MLFLOW_DB).exists()


def test_only_check_params_depends_on_the_search_keys():
    """A search is not a stage: editing `search` re-runs check_params (all of params.yaml) and nothing
    else (its output never changes)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, definition in stages.items():
        params = definition.get("do", definition).get("params", [])
        keys = [key for entry in params for key in ([entry] if isinstance(entry, str) else entry)]
        assert not [key for key in keys if key.split(".")[0] == "search"], name
        assert "search" not in definition.get("do", definition)["cmd"]


def test_the_search_split_holds_out_training_images_and_no_test_images(tiny_config):
    import numpy as np

    from fmnist.data import Dataset
    from tests.conftest import tiny_images

    x, y = tiny_images(TINY_TRAIN_PER_CLASS, seed=1)
    x_test, y_test = tiny_images(6, seed=2)
    data = Dataset(x, y, x[:0], y[:0], x_test, y_test)
    settings = dataclasses_replace(tiny_config.search, validation_size=40, train_size=100)
    split = search.trial_data(data, settings)
    assert len(split.y_val) == 40 and len(split.y_train) == 100
    assert len(split.x_test) == 0 and len(split.y_test) == 0
    assert np.bincount(split.y_val).tolist() == [4] * 10  # stratified
    with pytest.raises(ConfigError, match=r"search.train_size = 500 is invalid; allowed: 0 \(all\) or at "
                                          r"most 200"):
        search.trial_data(data, dataclasses_replace(settings, train_size=500))


def dataclasses_replace(value, **changes):
    import dataclasses

    return dataclasses.replace(value, **changes)


# --- searches on tiny data -------------------------------------------------------------------

@pytest.mark.slow
def test_a_search_prunes_logs_nested_runs_and_writes_the_best_variant(tmp_path, tiny_params, tiny_idx_dir,
                                                                     monkeypatch):
    raw = tiny_search(tiny_params)
    root = make_project(tmp_path / "project", raw, tiny_idx_dir)
    monkeypatch.chdir(root)
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    seen = []  # what every trial trained on: no test image, the test set not monitored
    real_fit = training.fit

    def spy(model, data, train, callbacks, initial_epoch=0, seed=0):
        seen.append((len(data.x_test), len(data.y_test), train.monitor_test, len(data.y_train),
                     len(data.y_val)))
        return real_fit(model, data, train, callbacks, initial_epoch, seed)

    monkeypatch.setattr(training, "fit", spy)
    config = parse_params(raw)
    summary = search.search(config, search.storage_url(config.search))

    study = load_study(root, raw)
    trials = study.get_trials()
    assert len(trials) == 4 and len(seen) == 4
    assert set(seen) == {(0, 0, False, 180, 60)}
    states = {trial.number: trial.state for trial in trials}
    # the sampler's seed gives trial 0 1e-9 (it completes: the startup trial) and trial 1 0.01; a
    # later trial at 1e-9 stays at the initial model's accuracy, below the median of the completed
    # trials' first epochs: pruned after its first epoch
    for trial in trials:
        if trial.params["learning_rate"] == 1e-9 and trial.number > 0:
            assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [1]
    assert TrialState.PRUNED in states.values() and TrialState.COMPLETE in states.values()
    assert summary.counts["complete"] + summary.counts["pruned"] == 4

    client, parent, runs = search_runs(root)
    assert parent.info.status == "FINISHED" and parent.data.params["search.base_variant"] == "cnn2"
    assert sorted(_name(run) for run in runs) == [f"cnn4_bn_aug_search-trial{n}" for n in range(4)]
    for run in runs:
        trial = study.trials[int(run.data.tags["search_trial"])]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.run_id == trial.user_attrs[search.RUN_ATTR]
        assert run.data.tags["search_state"] == trial.state.name.lower()
        assert run.data.params["data.test"] == "0" and run.data.params["train.monitor_test"] == "False"
        assert float(run.data.params["search.learning_rate"]) == trial.params["learning_rate"]
        curve = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.step for m in sorted(curve, key=lambda m: m.step)] == sorted(trial.intermediate_values)
        assert not [key for key in run.data.metrics if "test" in key]  # no test-set number at all
    assert parent.data.metrics["trials_pruned"] == summary.counts["pruned"]
    assert parent.data.metrics["best_val_accuracy"] == study.best_value
    assert "importance_dropout_rate" in parent.data.metrics or summary.counts["complete"] < 2
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"cnn4_bn_aug_search.yaml", "cnn4_bn_aug_search-history.png"} <= artifacts

    # the best trial as a variant block: pasted under `variants:`, it is a valid variant
    text = (root / "reports" / "search" / "cnn4_bn_aug_search.yaml").read_text()
    assert text.startswith("# The best trial of search cnn4_bn_aug_search")
    assert "test set was not read" in text
    block = yaml.safe_load(text)
    best = study.best_params
    assert block == {"cnn4_bn_aug_search": {"learning_rate": best["learning_rate"],
                                            "dropout_rate": float(f"{best['dropout_rate']:.4g}")}}
    pasted = copy.deepcopy(raw)
    pasted["variants"].update(block)
    assert parse_params(pasted).variant("cnn4_bn_aug_search").dropout_rate == block[
        "cnn4_bn_aug_search"]["dropout_rate"]

    # run again: the search is done, nothing trains, the study is the same
    seen.clear()
    search.search(config, search.storage_url(config.search))
    assert seen == [] and len(load_study(root, raw).trials) == 4


@pytest.mark.slow
def test_a_search_killed_mid_trial_resumes_and_runs_its_values_again(tmp_path, tiny_params, tiny_idx_dir):
    raw = tiny_search(tiny_params, n_trials=3, epochs=3, pruner="none", heartbeat_s=1)
    root = make_project(tmp_path / "project", raw, tiny_idx_dir)
    env = search_env(root)
    process = subprocess.Popen([sys.executable, "-m", "fmnist.search"], cwd=root, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    try:
        for line in process.stdout:  # killed (as by the OOM killer) in trial 1's second epoch
            lines.append(line)
            if "trial 1] | epoch 1/3" in line:
                process.send_signal(signal.SIGKILL)
                break
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL, "".join(lines)
    killed = load_study(root, raw).trials[1]
    assert killed.state == TrialState.RUNNING  # as the kill left it

    time.sleep(2.5)  # two heartbeats: the trial is stale now
    result = run_search(root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "trial 1: its worker stopped answering; marked failed, its values queued to run again" in (
        result.stdout)
    study = load_study(root, raw)
    states = [trial.state for trial in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert study.trials[2].params == killed.params  # the killed trial's values, run again
    assert study.trials[2].system_attrs["failed_trial"] == 1

    client, parent, runs = search_runs(root)
    assert parent.info.status == "FINISHED"  # the first attempt's run, resumed
    by_name = {_name(run): run for run in runs}
    assert by_name["cnn4_bn_aug_search-trial1"].info.status == "FAILED"
    assert [by_name[f"cnn4_bn_aug_search-trial{n}"].info.status for n in (0, 2, 3)] == ["FINISHED"] * 3
    assert (root / "reports" / "search" / "cnn4_bn_aug_search.yaml").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_POSTGRES, reason="PostgreSQL is not installed (make deps-system)")
def test_two_workers_share_one_search_on_postgresql(tmp_path, tiny_params, tiny_idx_dir):
    raw = tiny_search(tiny_params, n_trials=6, pruner="none")
    root = make_project(tmp_path / "project", raw, tiny_idx_dir)
    # PostgreSQL runs as the postgres user when we are root: its folder must be reachable,
    # which pytest's tmp_path (mode 700) is not
    server_dir = Path(tempfile.mkdtemp(prefix="fmnist-search-"))
    server_dir.chmod(0o755)
    data = server_dir / "postgres"
    port = tracking_server.free_port()
    try:
        tracking_server._start_postgres(data, port)
        # the tracking server's cluster: the search's database beside MLflow's
        url = f"postgresql://{tracking_server.DB_USER}@127.0.0.1:{port}/{tracking_server.SEARCH_DATABASE}"
        result = run_search(root, "--workers", "2", "--storage", url)
        assert result.returncode == 0, result.stdout + result.stderr
        study = load_study(root, raw, url)
        trials = study.get_trials()
    finally:
        tracking_server._stop_postgres(data)
        shutil.rmtree(server_dir, ignore_errors=True)
    assert not (root / paths.SEARCH_DB).exists()  # the study lived in PostgreSQL
    # six trials, each run once, by both workers
    assert [trial.number for trial in trials] == list(range(6))
    assert all(trial.state == TrialState.COMPLETE for trial in trials)
    assert len({trial.user_attrs["worker"] for trial in trials}) == 2
    client, parent, runs = search_runs(root)
    assert sorted(_name(run) for run in runs) == [f"cnn4_bn_aug_search-trial{n}" for n in range(6)]
    assert {run.data.tags["mlflow.parentRunId"] for run in runs} == {parent.info.run_id}
    assert all(math.isfinite(run.data.metrics["val_accuracy"]) for run in runs)
    assert tracking.search_experiment("fashion-mnist-cnn") == EXPERIMENT


@pytest.mark.slow
def test_a_search_stopped_by_a_signal_marks_its_trial_and_resumes(tmp_path, tiny_params, tiny_idx_dir):
    """Ctrl-C or SIGTERM: the trial running is failed (not lost), its MLflow run KILLED, its values
    queued; the same command goes on from there."""
    raw = tiny_search(tiny_params, n_trials=2, epochs=3, pruner="none")
    root = make_project(tmp_path / "project", raw, tiny_idx_dir)
    process = subprocess.Popen([sys.executable, "-m", "fmnist.search"], cwd=root, env=search_env(root),
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if "trial 0] | epoch 1/3" in line:
                process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    output = "".join(lines)
    assert process.returncode == 130, output
    assert "ERROR: interrupted; the trial running is marked failed and its values run again" in output
    study = load_study(root, raw)
    assert [trial.state for trial in study.trials] == [TrialState.FAIL, TrialState.WAITING]
    stopped = study.trials[0].params

    result = run_search(root)
    assert result.returncode == 0, result.stdout + result.stderr
    study = load_study(root, raw)
    assert [trial.state for trial in study.trials] == [TrialState.FAIL] + [TrialState.COMPLETE] * 2
    assert study.trials[1].params == stopped  # the stopped trial's values, run again
    _, parent, runs = search_runs(root)
    assert parent.info.status == "FINISHED"
    assert {_name(run): run.info.status for run in runs} == {
        "cnn4_bn_aug_search-trial0": "KILLED", "cnn4_bn_aug_search-trial1": "FINISHED",
        "cnn4_bn_aug_search-trial2": "FINISHED"}
