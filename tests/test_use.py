"""Using the trained models after the tiny pipeline: the Model Registry, the predict command,
and the registry's alias served over HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from fmnist import paths, serve
from fmnist.tracking_server import free_port
from tests.conftest import BUILT_VARIANTS, built_copy, real_params, run, shrink, venv_env

pytestmark = pytest.mark.slow

VARIANTS = BUILT_VARIANTS


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, built_pipeline) -> Path:
    """A tiny repository after `dvc repro`: two variants, one seed, registered."""
    assert built_pipeline.params["registry"]["champion_variant"] == "authors_cnn2_bn_skip"  # the default
    return built_copy(built_pipeline, tmp_path_factory.mktemp("use") / "repo")


def _client(repo: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def _run_id(repo: Path, variant: str) -> str:
    return json.loads((repo / "models" / variant / "seed0" / "run.json").read_text())["mlflow_run_id"]


def _a_correctly_classified_test_image(repo: Path, variant: str) -> tuple[np.ndarray, int, float]:
    """(image, label, probability) of the first test image the evaluate stage got right (seed 0)."""
    data = np.load(repo / "data" / "prepared" / "fashion_mnist.npz")
    probabilities = np.load(repo / paths.predictions_file(variant, 0))["probabilities"]
    right = np.flatnonzero(probabilities.argmax(axis=1) == data["y_test"])
    assert len(right), "the tiny model got no test image right"
    index = int(right[0])
    return data["x_test"][index], int(data["y_test"][index]), float(probabilities[index].max())


def test_every_trained_model_is_a_version_and_the_alias_follows_the_params(pipeline):
    client = _client(pipeline)
    commit = run(["git", "rev-parse", "HEAD"], pipeline).stdout.strip()
    for variant in VARIANTS:
        (version,) = client.search_model_versions(f"name = 'fashion-mnist-{variant}'")
        assert version.run_id == _run_id(pipeline, variant)
        assert version.tags["seed"] == "0" and version.tags["variant"] == variant
        assert version.tags["data_source"] == "local" and version.tags["canonical_split"] == "False"
        assert version.tags["git_commit"] == commit
    champion = client.get_model_version_by_alias("fashion-mnist-authors_cnn2_bn_skip", "champion")
    assert champion.run_id == _run_id(pipeline, "authors_cnn2_bn_skip")

    # Registering again finds the versions by run id: none is added.
    run(["dvc", "repro", "--force", "--single-item", "register"], pipeline)
    for variant in VARIANTS:
        assert len(client.search_model_versions(f"name = 'fashion-mnist-{variant}'")) == 1

    # An experiment registers its models, tagged with its name and params, and leaves the
    # alias: tests/test_pipeline.py (an experiment on one variant) and tests/test_compare.py
    # (the champion's variant in two experiments) ask it of their experiments.
    run(["git", "add", "-A"], pipeline)
    run(["git", "commit", "-qm", "results"], pipeline)

    # The alias is a param: a committed change moves it, re-running only the registration, and
    # it leaves the other model.
    params = yaml.safe_load((pipeline / "params.yaml").read_text())
    params["registry"]["champion_variant"] = "cnn2"
    (pipeline / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "champion: cnn2"], pipeline)
    moved = run(["dvc", "repro"], pipeline)
    assert {line.split("'")[1] for line in moved.stdout.splitlines()
            if line.startswith("Running stage")} == {"check_params", "register"}
    assert ("@champion: fashion-mnist-authors_cnn2_bn_skip version 1 -> fashion-mnist-cnn2 version 1"
            in moved.stdout)
    assert _aliases(client, "fashion-mnist-cnn2") == {"champion": "1"}
    assert "champion" not in _aliases(client, "fashion-mnist-authors_cnn2_bn_skip")
    run(["git", "revert", "--no-edit", "HEAD"], pipeline)
    run(["dvc", "repro"], pipeline)
    assert _aliases(client, "fashion-mnist-authors_cnn2_bn_skip") == {"champion": "1"}


def test_predict_classifies_a_png_written_from_a_test_image(pipeline, tmp_path):
    class_names = real_params()["evaluate"]["class_names"]
    image, label, probability = _a_correctly_classified_test_image(pipeline, "authors_cnn2_bn_skip")
    Image.fromarray(image).save(tmp_path / "item.png")
    # the default model: params.yaml's registry alias, from the repository's store
    result = run([sys.executable, "-m", "fmnist.predict", str(tmp_path / "item.png"), "--json"], pipeline)
    (record,) = json.loads(result.stdout)
    assert record["class"] == class_names[label] and record["class_index"] == label
    assert record["probability"] == pytest.approx(probability, abs=1e-4)  # the evaluate stage's
    assert list(record["probabilities"]) == class_names

    # a model folder of the train stage, and the plain-text output
    image, label, _ = _a_correctly_classified_test_image(pipeline, "cnn2")
    np.save(tmp_path / "item.npy", image)
    result = run([sys.executable, "-m", "fmnist.predict", "--model", "models/cnn2/seed0",
                  str(tmp_path / "item.npy")], pipeline)
    header, line = result.stdout.splitlines()
    assert header.startswith("model: models/cnn2/seed0 (a train-stage model folder, MLflow run ")
    assert line.startswith(f"{tmp_path / 'item.npy'}: {class_names[label]} (")


def _post(url: str, payload: dict) -> tuple[int, str]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for_ping(server: subprocess.Popen, base: str, log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert server.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"the server did not answer /ping in {timeout_s:.0f} s"
        try:
            with urllib.request.urlopen(f"{base}/ping", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)


def _stop(server: subprocess.Popen, log) -> None:
    """SIGTERM the server's process group (SIGKILL after a minute); wait until it is gone."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=60)
    log.close()
    deadline = time.monotonic() + 30
    while _group_alive(server.pid) and time.monotonic() < deadline:
        time.sleep(0.5)


def test_the_alias_is_served_over_http_and_answers_a_real_request(pipeline, tmp_path):
    """`make serve`'s command on a free port: a real test image in, its class out; a wrong shape
    is a 400 naming the shape; stopped, it leaves no process behind."""
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "fmnist.serve", "--port", str(port)], cwd=pipeline,
                              env=venv_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for_ping(server, base, tmp_path / "serve.log")

        image, label, probability = _a_correctly_classified_test_image(pipeline, "authors_cnn2_bn_skip")
        status, body = _post(f"{base}/invocations", {"inputs": [image.tolist()]})
        assert status == 200, body
        (probabilities,) = json.loads(body)["predictions"]
        assert int(np.argmax(probabilities)) == label
        assert max(probabilities) == pytest.approx(probability, abs=1e-4)

        status, body = _post(f"{base}/invocations", {"inputs": [image.reshape(784).tolist()]})
        assert status == 400 and "Shape of input (1, 784) does not match expected shape (-1, 28, 28)" in body
        status, body = _post(f"{base}/invocations", {"inputs": [(image.astype(int) + 256).tolist()]})
        assert status == 400 and "out of bounds for uint8" in body and len(body) < 1000
    finally:
        _stop(server, log)
    assert not _group_alive(server.pid), "a process of the server (uvicorn) was left running"


# --- A registered model without a pipeline: a tiny untrained model, logged and registered as the
# train and register stages do, for what does not need a trained one (errors, limits, names)

TINY = "fashion-mnist-cnn2"


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> Path:
    """A folder whose mlflow.db holds ``TINY`` version 1 (alias champion), logged by a run
    with the train stage's tags, as if trained in the DVC experiment ``tiny-exp``."""
    from fmnist import device, tracking
    from fmnist.config import parse_params
    from fmnist.models import build_model

    root = tmp_path_factory.mktemp("registered")
    config = parse_params(shrink(real_params()))
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.setenv("DVC_EXP_NAME", "tiny-exp")  # as `dvc exp run` sets it
        experiment_id = tracking.connect("fashion-mnist-cnn", root)
        tags = {"variant": "cnn2", "seed": "0", "dvc_stage": "train@cnn2"}
        with tracking.run(experiment_id, "cnn2-seed0", tags) as run_id:
            tracking.log_keras_model(build_model(config.variant("cnn2"), "cnn2"), "cnn2-seed0",
                                     np.zeros((2, 28, 28), np.uint8), config.evaluate.class_names,
                                     device.pip_requirements())
        version = tracking.register_version(TINY, run_id, "cnn2-seed0", tags, "tiny")
        tracking.set_alias(TINY, version, "champion", "fashion-mnist-")
    (root / "run_id").write_text(run_id)
    return root


def _origin(root: Path) -> str:
    return (f"{TINY} version 1 (models:/{TINY}@champion), trained by MLflow run cnn2-seed0 @ tiny-exp "
            f"({(root / 'run_id').read_text()}) in DVC experiment tiny-exp, stage train@cnn2, git commit ")


def _fmnist(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          env=venv_env(), timeout=300)


def test_a_model_or_store_that_does_not_exist_is_one_line_for_serve_and_predict(registered, tmp_path):
    np.save(tmp_path / "item.npy", np.zeros((28, 28), np.uint8))
    store = f"sqlite:///{registered / 'mlflow.db'}"
    for module, model, expected in [
        ("fmnist.serve", "models:/fashion-mnist-nope@champion",
         f"no registered model 'fashion-mnist-nope' in {store} (it holds {TINY}); the register stage "
         "registers the trained models (`dvc repro`)"),
        ("fmnist.serve", f"models:/{TINY}@best",
         f"registered model '{TINY}' in {store} has no alias 'best' (its aliases: champion)"),
        ("fmnist.predict", f"models:/{TINY}/7",
         f"registered model '{TINY}' in {store} has no version 7 (its versions: 1)")]:
        extra = [str(tmp_path / "item.npy")] if module == "fmnist.predict" else ["--port", "0"]
        result = _fmnist(module, "--model", model, *extra, cwd=registered)
        assert (result.returncode, result.stderr.strip()) == (1, f"ERROR: {expected}"), result.stderr
        assert result.stdout == ""
    # no store here: said, and none is created
    result = _fmnist("fmnist.predict", "--model", f"models:/{TINY}@champion", str(tmp_path / "item.npy"),
                     cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith(f"ERROR: no MLflow store here: {tmp_path / 'mlflow.db'} does not exist")
    assert not (tmp_path / "mlflow.db").exists()


def test_predict_names_the_registered_version_its_run_and_dvc_experiment(registered, tmp_path):
    np.save(tmp_path / "item.npy", np.zeros((28, 28), np.uint8))
    result = _fmnist("fmnist.predict", "--model", f"models:/{TINY}@champion", str(tmp_path / "item.npy"),
                     cwd=registered)
    assert result.returncode == 0, result.stderr
    header, line = result.stdout.splitlines()
    assert header.startswith(f"model: {_origin(registered)}")
    assert line.startswith(f"{tmp_path / 'item.npy'}: ")
    result = _fmnist("fmnist.predict", "--model", f"models:/{TINY}@champion", str(tmp_path / "item.npy"),
                     "--json", cwd=registered)
    (record,) = json.loads(result.stdout)
    assert record["model"].startswith(_origin(registered))


def test_serve_refuses_a_taken_port_before_loading_the_model(registered):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = _fmnist("fmnist.serve", "--model", f"models:/{TINY}@champion", "--port", str(port),
                         cwd=registered)
        seconds = time.monotonic() - started
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"ERROR: cannot listen on 127.0.0.1:{port}: Address already in use; stop what uses it or serve "
        "on another port (--port, or `make serve PORT=...`)")
    assert "Serving" not in result.stdout  # the model was not loaded (tens of seconds)
    assert seconds < 60


def _post_body(url: str, body, headers: dict[str, str]) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_the_served_model_names_itself_and_refuses_an_oversized_request_with_413(registered, tmp_path):
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "fmnist.serve", "--model", f"models:/{TINY}@champion",
                               "--port", str(port)], cwd=registered, env=venv_env(), stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for_ping(server, base, tmp_path / "serve.log")
        assert (tmp_path / "serve.log").read_text().startswith(f"Serving {_origin(registered)}")

        image = np.full((28, 28), 255, np.uint8).tolist()
        body = json.dumps({"inputs": [image] * 3000}).encode()  # 3000 images, 9.5 MB: over 8 MiB
        assert len(body) > serve.DEFAULT_MAX_REQUEST_MB * 2**20
        started = time.monotonic()
        status, answer = _post_body(f"{base}/invocations", body, {})
        assert time.monotonic() - started < 10
        assert status == 413 and "\n" not in answer
        assert json.loads(answer) == {"error_code": "REQUEST_TOO_LARGE", "message": (
            f"a request of {len(body):,} bytes is over the limit of {8 * 2**20:,} bytes; send the images "
            "in several requests")}
        # chunked, without a Content-Length: counted as it arrives
        chunks = (body[i:i + 2**20] for i in range(0, len(body), 2**20))
        status, answer = _post_body(f"{base}/invocations", chunks, {"Transfer-Encoding": "chunked"})
        assert status == 413 and json.loads(answer)["error_code"] == "REQUEST_TOO_LARGE"
        # under the limit: answered
        status, answer = _post_body(f"{base}/invocations", json.dumps({"inputs": [image] * 2}).encode(), {})
        assert status == 200, answer
        assert np.asarray(json.loads(answer)["predictions"]).shape == (2, 10)
    finally:
        _stop(server, log)
    assert not _group_alive(server.pid), "a process of the server was left running"
