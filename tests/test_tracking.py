"""fmnist.tracking, the project's one door to MLflow: its package, the names of runs and
metrics. (Its store faults are in tests/test_faults.py, section 4; runs and models in a
real store in the training, registry and pipeline tests.)"""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from fmnist import tracking
from tests.conftest import REPO, run, venv_env


def test_importing_the_package_sets_nothing():
    """MLflow is configured by use_store and connect, never by an import: no store, no
    environment variable, no log filter."""
    code = ("import logging, os, mlflow\n"
            "before = dict(os.environ)\n"  # after mlflow's own import, which sets its telemetry id
            "import fmnist.tracking\n"
            "print(dict(os.environ) == before, mlflow.tracking.is_tracking_uri_set(),\n"
            "      logging.getLogger('mlflow.store.db.utils').filters)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**venv_env(), "PYTHONPATH": str(REPO / "src")}, check=True)
    assert result.stdout.split() == ["True", "False", "[]"]


def test_a_new_store_is_created_without_a_line_from_mlflow(tmp_path):
    """A first stage on a fresh clone creates the SQLite store: MLflow's "Creating initial
    MLflow database tables..." and "Updating database tables" are not the user's business."""
    code = ("import sys\nfrom pathlib import Path\nfrom fmnist import tracking\n"
            "tracking.connect('fashion-mnist-cnn', Path(sys.argv[1]))\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=300,
                            env={**venv_env(), "PYTHONPATH": str(REPO / "src")})
    assert result.returncode == 0 and (tmp_path / "mlflow.db").is_file(), result.stdout
    assert result.stdout == ""


def test_the_package_re_exports_its_names_without_hiding_its_modules():
    for name in tracking.__all__:
        assert getattr(tracking, name) is not None, name
    for file in (REPO / "src" / "fmnist" / "tracking").glob("*.py"):
        if file.stem != "__init__":  # `tracking.runs` is the module, `tracking.run` a function
            assert isinstance(getattr(tracking, file.stem), types.ModuleType), file.stem


def test_results_are_named_from_one_vocabulary():
    with pytest.raises(ValueError, match="final_test_accuracy"):
        tracking.log_results({"final_test_accuracy": 0.9})
    assert tracking.epoch_metric_name("test_accuracy") == "monitor_test_accuracy"
    assert tracking.epoch_metric_name("loss") == "loss"


def test_runs_are_named_after_their_pipeline_execution(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert tracking.execution(tmp_path) == "workspace"  # outside git
    run(["git", "init", "-q"], tmp_path)
    (tmp_path / "params.yaml").write_text("train: {epochs: 2}\n")
    run(["git", "add", "params.yaml"], tmp_path)
    run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "params"], tmp_path)
    commit = run(["git", "rev-parse", "--short", "HEAD"], tmp_path).stdout.strip()
    # `dvc repro` in the workspace: its commit, and whether the pipeline's inputs differ from it
    assert tracking.execution(tmp_path) == f"workspace-{commit}"
    (tmp_path / "params.yaml").write_text("train: {epochs: 3}\n")
    assert tracking.execution(tmp_path) == f"workspace-{commit}-dirty"
    monkeypatch.setenv("DVC_EXP_NAME", "lower-lr")  # `dvc exp run` sets it
    assert tracking.execution(tmp_path) == "lower-lr"
    assert tracking.run_title("cnn2-seed0", "lower-lr") == "cnn2-seed0 @ lower-lr"


def test_a_run_missing_from_the_store_says_to_train_its_seed_again(mlflow_store, capsys):
    """There is no per-seed stage, and `dvc repro -f train@<variant>` keeps a seed whose files
    match: the way to a new run is to delete the seed's folder and run `dvc repro`."""
    missing = "0" * 32
    with tracking.resume(missing) as found:
        assert not found
    warning = capsys.readouterr().out.strip()
    assert warning.startswith(f"WARNING: MLflow run {missing} is not in sqlite:///")
    assert warning.endswith("nothing logged to it. To record it again, delete models/<variant>/seed<k> "
                            "and run `dvc repro` to train it again."), warning
    with pytest.raises(tracking.TrackingError, match=f"^MLflow run {missing} is not in .*; to log it again, "
                       r"delete models/<variant>/seed<k> and run `dvc repro` to train it again$"):
        tracking.run_tags(missing)
