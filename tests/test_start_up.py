"""How a JAX training process starts and what its run records: the shared compilation cache,
the loop's compile time, the memory setting that lets processes share one GPU, no TensorFlow
import, system metrics and images/s per epoch. Each training runs in a process of its own (JAX
reads its settings when it is imported)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fmnist import device, paths
from tests.conftest import REPO, venv_env

# Trains cnn2 for 2 epochs on tiny data through the project's code, in the working directory
# (the project root: JAX's cache and MLflow's store go there), then prints what it saw.
TRAIN_UNDER_JAX = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    started = time.perf_counter()
    from fmnist import device
    device.select_backend("jax")
    import jax
    from fmnist import download, training
    from fmnist.params import load_params
    from fmnist.prepare import prepare
    from tests.conftest import write_tiny_idx

    config = load_params("params.yaml")
    download.download(config.data, Path("raw"), local_dir=write_tiny_idx(Path("idx")))
    data, info = prepare(Path("raw"), Path("prepared/d.npz"), Path("prepared/i.json"),
                         validation_size=0, validation_seed=0)
    imported = time.perf_counter()
    result = training.train_variant(config, "cnn2", 0, data, info, Path("models/cnn2"),
                                    Path(".checkpoints/cnn2"))
    print(json.dumps({
        "tensorflow_imported": "tensorflow" in sys.modules,
        "jax_cache_dir": jax.config.jax_compilation_cache_dir,
        "jax_environment": {k: v for k, v in os.environ.items() if k.startswith(("JAX_", "XLA_"))},
        "run_id": result.run_id, "epoch_seconds": [r["epoch_seconds"] for r in result.history],
        "train_seconds": result.train_seconds, "compile_seconds": result.compile_seconds,
        "start_up_seconds": imported - started,
        "train_variant_seconds": time.perf_counter() - imported}))
""")


def _project(folder: Path) -> Path:
    """A project root with the real params.yaml made tiny (cnn2, 2 epochs, seed 0)."""
    import yaml

    from tests.conftest import only_variants, real_params, shrink

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(only_variants(shrink(real_params()), ["cnn2"])))
    (folder / "train.py").write_text(TRAIN_UNDER_JAX)
    return folder


def _start(folder: Path, environment: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**venv_env(), "PYTHONPATH": f"{REPO / 'src'}:{REPO}", **(environment or {})}
    env.pop("KERAS_BACKEND", None)
    for key in [k for k in env if k.startswith(("JAX_", "XLA_PYTHON_CLIENT_"))]:
        del env[key]  # what the project sets, not what this shell had
    return subprocess.Popen([sys.executable, "train.py"], cwd=folder, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def test_jax_environment_keeps_what_the_user_set(monkeypatch, tmp_path):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_ALLOCATOR", raising=False)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    environment = device.jax_environment(tmp_path)
    assert environment["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / paths.JAX_CACHE)
    assert environment["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    # a fraction the user chose sizes the memory: no preallocation setting is added beside it
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.3")
    assert "XLA_PYTHON_CLIENT_PREALLOCATE" not in device.jax_environment(tmp_path)


@pytest.mark.slow
def test_two_jax_trainings_at_once_share_the_device_and_the_cache(tmp_path):
    """Two processes started together, as two queue workers on one GPU: both train and
    finish, their JAX sees the memory setting and the project's cache, TensorFlow (installed
    here) is never imported, and the run records system metrics and images/s per epoch."""
    from mlflow.tracking import MlflowClient

    folders = [_project(tmp_path / name) for name in ("a", "b")]
    outcomes = [_finish(p) for p in [_start(folder) for folder in folders]]
    for folder, outcome in zip(folders, outcomes, strict=True):
        assert outcome["jax_environment"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
        assert outcome["jax_cache_dir"] == str((folder / paths.JAX_CACHE).resolve())
        assert list((folder / paths.JAX_CACHE).glob("*-cache")), "nothing was written to the cache"
        assert not outcome["tensorflow_imported"]

        client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
        metrics = client.get_run(outcome["run_id"]).data.metrics
        assert "system/cpu_utilization_percentage" in metrics, sorted(metrics)
        assert "system/system_memory_usage_megabytes" in metrics
        rates = client.get_metric_history(outcome["run_id"], "images_per_second")
        assert sorted(m.step for m in rates) == [1, 2]
        # the loop's compile time, logged beside its time (which includes it) and in run.json
        assert 0 < outcome["compile_seconds"] < outcome["train_seconds"], outcome
        assert metrics["compile_seconds"] == pytest.approx(outcome["compile_seconds"], abs=0.01)
        run_info = json.loads((folder / "models" / "cnn2" / "run.json").read_text())
        assert run_info["compile_seconds"] == pytest.approx(outcome["compile_seconds"], abs=0.01)
        # training images over the epoch's seconds (240 tiny images)
        for metric in rates:
            seconds = outcome["epoch_seconds"][metric.step - 1]
            assert metric.value == pytest.approx(240 / seconds, rel=1e-6)
