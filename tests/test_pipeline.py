"""End to end: the real `dvc repro` on the shrunk pipeline in a temporary repository."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest
import yaml

from fmnist.files import file_digest
from tests.conftest import only_variants, run, venv_env

pytestmark = pytest.mark.slow


def _ran(output: str) -> set[str]:
    """Stage names DVC says it ran."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def _runs_in_store(repo) -> list[tuple[str, str]]:
    with sqlite3.connect(repo / "mlflow.db") as db:
        return db.execute("SELECT name, status FROM runs ORDER BY start_time").fetchall()


def test_dvc_repro_runs_the_tiny_pipeline_incrementally(dvc_repo, tiny_params):
    params = only_variants(tiny_params, ["cnn2", "cnn2_bn_skip"])
    (dvc_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "two tiny variants"], dvc_repo)

    first = run(["dvc", "repro"], dvc_repo)
    assert _ran(first.stdout) == {"check_params", "download", "prepare", "train@cnn2-0",
                                  "train@cnn2_bn_skip-0", "evaluate@cnn2-0", "evaluate@cnn2_bn_skip-0",
                                  "baseline", "analyse", "register"}
    for path in ["data/raw/source.json", "data/prepared/fashion_mnist.npz", "reports/figures/dataset.png",
                 "models/cnn2/seed0/model.keras", "models/cnn2_bn_skip/seed0/history.json",
                 "reports/eval/cnn2-seed0/confusion_matrix.png", "reports/analysis/top_errors.png",
                 "reports/analysis/training_loss.png", "reports/report.md", "metrics/summary.json"]:
        assert (dvc_repo / path).is_file(), path

    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], dvc_repo).stdout)
    (files,) = [revision["data"] for revision in metrics.values()]  # the workspace
    for name in ["metrics/runs/cnn2-seed0.json", "metrics/runs/cnn2_bn_skip-seed0.json",
                 "metrics/baseline.json", "metrics/summary.json"]:
        assert "test_accuracy" in json.dumps(files[name]["data"]), name
    assert "macro_f1" in files["metrics/runs/cnn2-seed0.json"]["data"]

    plots = run(["dvc", "plots", "show", "-o", "plots_html"], dvc_repo)
    html = (dvc_repo / "plots_html" / "index.html").read_text()
    assert "Training loss" in html and "Confusion matrix cnn2-seed0" in html, plots.stdout

    runs = _runs_in_store(dvc_repo)
    assert ("cnn2-seed0", "FINISHED") in runs and ("cnn2_bn_skip-seed0", "FINISHED") in runs
    assert ("svc-baseline", "FINISHED") in runs and ("analysis", "FINISHED") in runs

    # Nothing changed: nothing runs.
    assert _ran(run(["dvc", "repro"], dvc_repo).stdout) == set()

    # A corrupted raw file: prepare names it; `dvc repro` restores it by re-running download.
    raw = dvc_repo / "data" / "raw" / "train-images-idx3-ubyte.gz"
    raw.chmod(0o644)
    raw.write_bytes(raw.read_bytes()[:-50])
    broken = subprocess.run([sys.executable, "stages/prepare.py"], cwd=dvc_repo, env=venv_env(),
                            capture_output=True, text=True)
    assert broken.returncode == 1 and "checksum mismatch" in broken.stderr
    assert "Traceback" not in broken.stderr
    restored = run(["dvc", "repro"], dvc_repo)
    # DVC sees download's output changed and restores it: from its cache when it holds the
    # output (as here), else by re-running the stage.
    assert ("Stage 'download' is cached - skipping run, checking out outputs" in restored.stdout
            or "download" in _ran(restored.stdout))
    recorded = json.loads((dvc_repo / "data" / "raw" / "source.json").read_text())["md5"]
    assert file_digest(raw) == recorded[raw.name]
    assert _ran(restored.stdout) <= {"download"}  # the same data again: nothing downstream runs

    # A new variant is an edit of params.yaml: only it trains.
    params["variants"]["wide3"] = {"blocks": 3, "filters": 16, "padding": "same"}
    (dvc_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    added = _ran(run(["dvc", "repro"], dvc_repo).stdout)
    assert {s for s in added if s.startswith("train")} == {"train@wide3-0"}
    run(["git", "add", "-A"], dvc_repo)
    run(["git", "commit", "-qm", "wide3"], dvc_repo)

    # An experiment on one variant's key re-trains only that variant.
    # (a key the variant does not set yet takes a leading +, as in Hydra)
    experiment = run(["dvc", "exp", "run", "-S", "+variants.cnn2.dropout_rate=0.3"], dvc_repo)
    assert {s for s in _ran(experiment.stdout) if s.startswith("train")} == {"train@cnn2-0"}
    names = [name for name, _ in _runs_in_store(dvc_repo)]
    assert names.count("cnn2-seed0") == 2

    # A queued experiment runs in a temporary copy, yet lands in this repository's store.
    run(["git", "reset", "-q", "--hard"], dvc_repo)
    run(["dvc", "exp", "run", "--queue", "-S", "+variants.cnn2.dropout_rate=0.2"], dvc_repo)
    run(["dvc", "exp", "run", "--run-all"], dvc_repo)
    with sqlite3.connect(dvc_repo / "mlflow.db") as db:
        uris = [uri for (uri,) in db.execute(
            "SELECT artifact_uri FROM runs WHERE name = 'cnn2-seed0' ORDER BY start_time")]
    assert len(uris) == 3
    assert uris[-1].startswith((dvc_repo / "mlartifacts").as_uri())
