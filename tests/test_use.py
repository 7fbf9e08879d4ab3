"""Using the trained models after the tiny pipeline: the Model Registry, the predict command,
and the registry's alias served over HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
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

from fmnist.tracking_server import free_port
from tests.conftest import make_dvc_repo, only_variants, real_params, run, shrink, venv_env, write_tiny_idx

pytestmark = pytest.mark.slow
VARIANTS = ["cnn2", "authors_cnn2_bn_skip"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """A tiny repository after `dvc repro`: two variants, one seed, registered."""
    root = tmp_path_factory.mktemp("use")
    params = only_variants(shrink(real_params()), VARIANTS)
    assert params["registry"]["champion_variant"] == "authors_cnn2_bn_skip"  # the shipped default
    repo = make_dvc_repo(root / "repo", params, local_data=write_tiny_idx(root / "idx"))
    run(["dvc", "repro"], repo)
    return repo


def _client(repo: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def _run_id(repo: Path, variant: str) -> str:
    return json.loads((repo / "models" / variant / "seed0" / "run.json").read_text())["mlflow_run_id"]


def _a_correctly_classified_test_image(repo: Path, run_name: str) -> tuple[np.ndarray, int, float]:
    """(image, label, probability) of the first test image the evaluate stage got right."""
    data = np.load(repo / "data" / "prepared" / "fashion_mnist.npz")
    probabilities = np.load(repo / "predictions" / f"{run_name}.npz")["probabilities"]
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

    # An experiment registers its models, tagged with its name, and leaves the alias.
    run(["git", "add", "-A"], pipeline)
    run(["git", "commit", "-qm", "results"], pipeline)
    experiment = run(["dvc", "exp", "run", "-n", "short", "-S", "train.epochs=1"], pipeline)
    assert ("@champion stays at fashion-mnist-authors_cnn2_bn_skip version 1: experiment short"
            in experiment.stdout)
    (_, second) = sorted(client.search_model_versions("name = 'fashion-mnist-authors_cnn2_bn_skip'"),
                         key=lambda version: int(version.version))
    assert second.tags["dvc_exp_name"] == "short" and second.tags["params_changed"] == "train.epochs=1"
    assert _aliases(client, "fashion-mnist-authors_cnn2_bn_skip") == {"champion": "1"}
    run(["git", "checkout", "-f", "HEAD", "--", "."], pipeline)
    run(["dvc", "checkout", "-f"], pipeline)

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
    image, label, probability = _a_correctly_classified_test_image(pipeline, "authors_cnn2_bn_skip-seed0")
    Image.fromarray(image).save(tmp_path / "item.png")
    # the default model: params.yaml's registry alias, from the repository's store
    result = run([sys.executable, "-m", "fmnist.predict", str(tmp_path / "item.png"), "--json"], pipeline)
    (record,) = json.loads(result.stdout)
    assert record["class"] == class_names[label] and record["class_index"] == label
    assert record["probability"] == pytest.approx(probability, abs=1e-4)  # the evaluate stage's
    assert list(record["probabilities"]) == class_names

    # a model folder of the train stage, and the plain-text output
    image, label, _ = _a_correctly_classified_test_image(pipeline, "cnn2-seed0")
    np.save(tmp_path / "item.npy", image)
    result = run([sys.executable, "-m", "fmnist.predict", "--model", "models/cnn2/seed0",
                  str(tmp_path / "item.npy")], pipeline)
    assert result.stdout.startswith(f"{tmp_path / 'item.npy'}: {class_names[label]} (")


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


def test_the_alias_is_served_over_http_and_answers_a_real_request(pipeline, tmp_path):
    """`make serve`'s command on a free port: a real test image in, its class out; a wrong shape
    is a 400 naming the shape; stopped, it leaves no process behind."""
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "fmnist.serve", "--port", str(port)], cwd=pipeline,
                              env=venv_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not answer /ping in 300 s"
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(1)

        image, label, probability = _a_correctly_classified_test_image(pipeline, "authors_cnn2_bn_skip-seed0")
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
    assert not _group_alive(server.pid), "a process of the server (uvicorn) was left running"
