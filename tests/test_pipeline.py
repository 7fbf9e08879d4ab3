"""End to end: the real `dvc repro` on the shrunk pipeline in a temporary repository.

The pipeline runs once (a module-scoped fixture); each scenario after it is its own test,
in the order below, so that one failing does not hide the others.
"""

from __future__ import annotations

import csv
import json
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from benchmarks.timed_repro import cache_lost_outputs
from fmnist import paths, repro
from fmnist.files import file_digest
from tests.conftest import (
    BUILT_VARIANTS,
    TINY_TEST_PER_CLASS,
    TINY_TRAIN_PER_CLASS,
    built_copy,
    run,
    venv_env,
)

VARIANTS = BUILT_VARIANTS  # ours and the authors' exact model


def _ran(output: str) -> set[str]:
    """Stage names DVC says it ran."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def _runs_in_store(repo) -> list[tuple[str, str]]:
    """(name, status) of every run, the name without its pipeline execution (`cnn2-seed0 @ ...`)."""
    with sqlite3.connect(repo / "mlflow.db") as db:
        return [(name.split(" @ ")[0], status)
                for name, status in db.execute("SELECT name, status FROM runs ORDER BY start_time")]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, built_pipeline):
    """A repository with two tiny variants, after its first `dvc repro`, run as `make run` runs
    it (fmnist.repro): (repo, params, output)."""
    repo = built_copy(built_pipeline, tmp_path_factory.mktemp("pipeline") / "repo")
    return repo, built_pipeline.params, built_pipeline.output


@pytest.mark.slow
def test_the_first_repro_runs_every_stage_once(pipeline):
    _, _, output = pipeline
    assert _ran(output) == {"check_params", "download", "prepare", "train@cnn2",
                            "train@authors_cnn2_bn_skip", "evaluate@cnn2", "evaluate@authors_cnn2_bn_skip",
                            "baseline", "analyse", "register"}


@pytest.mark.slow
def test_make_run_shows_the_whole_pipelines_progress_and_times_each_stage(pipeline):
    repo, _, output = pipeline
    lines = output.splitlines()
    ran = [line.split("'")[1] for line in lines if line.startswith("Running stage")]
    shown = [line for line in lines if line.startswith("[pipeline ")]
    # one line before each stage DVC runs: its place among all the stages this run runs
    assert [lines[lines.index(line) + 1] for line in shown] == [f"Running stage '{s}':" for s in ran]
    assert [line.split(" - ")[0] for line in shown] == [
        f"[pipeline {k}/{len(ran)}] {stage}" for k, stage in enumerate(ran, start=1)]
    assert shown[0].endswith("0 done, no ETA yet (not timed on this machine yet)")  # the first run
    timed = json.loads((repo / repro.STAGE_SECONDS).read_text())
    assert sorted(timed) == sorted(ran) and all(seconds >= 0 for seconds in timed.values())
    run(["git", "check-ignore", "-q", repro.STAGE_SECONDS.as_posix()], repo)  # not for git
    # its exit code is dvc's
    wrong = ["--no-such-option"]
    assert (run([sys.executable, "-m", "fmnist.repro", *wrong], repo, check=False).returncode
            == run(["dvc", "repro", *wrong], repo, check=False).returncode != 0)


@pytest.mark.slow
def test_each_stage_hands_the_next_what_it_needs(pipeline):
    repo, params, _ = pipeline
    info = json.loads((repo / paths.PREPARED_INFO).read_text())
    assert info["sizes"] == {"train": 10 * TINY_TRAIN_PER_CLASS, "validation": 0,
                             "test": 10 * TINY_TEST_PER_CLASS}
    summary = json.loads((repo / paths.SUMMARY).read_text())
    report = (repo / paths.REPORT).read_text()
    with (repo / paths.CURVES).open() as f:
        curves = list(csv.DictReader(f))
    for variant in VARIANTS:
        files = paths.RunFiles(repo / paths.model_dir(variant, 0))
        history = json.loads(files.history.read_text())
        assert [record["epoch"] for record in history] == list(range(1, params["train"]["epochs"] + 1))
        metrics = json.loads((repo / paths.metrics_file(variant, 0)).read_text())
        assert metrics["epochs"] == len(history)
        assert metrics["final_train_loss"] == round(history[-1]["loss"], 6)
        # one seed: the analyse stage's mean is that run's accuracy, and the report shows it
        assert summary["variants"][variant]["test_accuracy_mean"] == metrics["test_accuracy"]
        assert f"| {paths.run_name(variant, 0)} | {100 * metrics['test_accuracy']:.2f} |" in report
        epochs = [record["epoch"] for record in history]
        assert [int(row["epoch"]) for row in curves if row["variant"] == variant] == epochs
        architecture = files.architecture.read_text()
        assert f'<details><summary>{variant}</summary>\n\n```\n{architecture.rstrip()}\n```' in report
        # evaluate scored the train stage's probabilities: predictions/ holds them as they were
        with np.load(repo / paths.predictions_file(variant, 0)) as predictions:
            np.testing.assert_array_equal(predictions["probabilities"], np.load(files.test_probabilities))
        # the feature maps (Figs. 5-7): drawn by analyse from those the train stage wrote beside
        # the first seed's model
        figure = paths.feature_maps_figure(paths.ANALYSIS, variant, 0, "Bag")
        assert (repo / figure).read_bytes().startswith(b"\x89PNG")
        assert f"![{variant}, Bag]({figure.relative_to(paths.REPORT.parent).as_posix()})" in report
        assert not list((repo / paths.run_record(variant, 0).folder).glob("*feature*"))
    baseline = json.loads((repo / paths.BASELINE_METRICS).read_text())
    assert baseline["train_size"] == params["baseline"]["train_size"]
    assert summary["baseline"]["test_accuracy"] == baseline["test_accuracy"]


@pytest.mark.slow
def test_dvc_shows_the_metrics_and_plots(pipeline):
    repo, _, _ = pipeline
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    (files,) = [revision["data"] for revision in metrics.values()]  # the workspace
    for variant in VARIANTS:
        shown = files[paths.metrics_file(variant, 0).as_posix()]["data"]
        assert shown == json.loads((repo / paths.metrics_file(variant, 0)).read_text())
    assert files[paths.BASELINE_METRICS.as_posix()]["data"]["test_accuracy"] == json.loads(
        (repo / paths.BASELINE_METRICS).read_text())["test_accuracy"]

    plots = run(["dvc", "plots", "show", "-o", "plots_html"], repo)
    html = (repo / "plots_html" / "index.html").read_text()
    assert "Training loss" in html and paths.confusion_csv("cnn2", 0).as_posix() in html, plots.stdout


@pytest.mark.slow
def test_every_stage_that_tracks_left_a_finished_mlflow_run(pipeline):
    repo, _, _ = pipeline
    runs = _runs_in_store(repo)
    for name in [paths.run_name(v, 0) for v in VARIANTS] + ["svc-baseline", "analysis"]:
        assert (name, "FINISHED") in runs, name


@pytest.mark.slow
def test_the_analysis_tags_each_model_run_with_the_papers_model_it_stands_for(pipeline):
    repo, _, _ = pipeline
    with sqlite3.connect(repo / "mlflow.db") as db:
        analysed = db.execute("SELECT start_time FROM runs WHERE name LIKE 'analysis @ %'").fetchone()[0]
        tagged = {name.split(" @ ")[0]: value for name, value in db.execute(
            "SELECT runs.name, tags.value FROM runs JOIN tags ON tags.run_uuid = runs.run_uuid "
            "WHERE tags.key = 'paper_model'").fetchall()}
        ends = {name.split(" @ ")[0]: end for name, end in db.execute(
            "SELECT name, end_time FROM runs WHERE status = 'FINISHED'").fetchall()}
    # cnn2 is ours; authors_cnn2_bn_skip is the paper's CNN2+BN+Skip (analyse.paper_models)
    assert tagged == {paths.run_name("cnn2", 0): "none: ours",
                      paths.run_name("authors_cnn2_bn_skip", 0): "CNN2+BN+Skip"}
    # tagged after they ended, without reopening them: still FINISHED, ended before the analysis
    assert all(ends[name] < analysed for name in tagged)


@pytest.mark.slow
def test_the_feature_maps_are_logged_to_the_first_seeds_run_beside_its_evaluation(pipeline):
    repo, _, _ = pipeline
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    for variant in VARIANTS:
        run_id = json.loads((repo / paths.run_record(variant, 0).run_info).read_text())["mlflow_run_id"]
        logged = {artifact.path for artifact in client.list_artifacts(run_id, "evaluation")}
        figure = paths.feature_maps_figure(paths.ANALYSIS, variant, 0, "Bag")
        assert {f"evaluation/{figure.name}", "evaluation/errors.csv"} <= logged, logged


@pytest.mark.slow
def test_nothing_changed_nothing_runs(pipeline):
    repo, _, _ = pipeline
    assert _ran(run(["dvc", "repro"], repo).stdout) == set()


@pytest.mark.slow
def test_a_clone_without_the_dvc_cache_makes_the_same_report(pipeline, tmp_path):
    """The analyse stage reads what git holds of each run (paths.RunRecord) and, for the
    feature maps, the train stage's file beside the first seed's models: a clone whose DVC
    cache of models is gone (another machine, a lost cache) makes the report again, keeping
    the feature maps git holds."""
    repo, _, _ = pipeline
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "first repro"], repo)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    run(["dvc", "repro", "prepare"], clone)  # the data again, from data/local
    # benchmarks/timed_repro.py --skip-cache-lost: these ran elsewhere, not to be run again
    status = json.loads(run(["dvc", "status", "--json"], clone).stdout)
    assert cache_lost_outputs(status["train@cnn2"], set()) == ["models/cnn2"]
    assert cache_lost_outputs(status["evaluate@cnn2"], {"models/cnn2"}) == ["predictions/cnn2"]
    assert cache_lost_outputs(status["evaluate@cnn2"], set()) is None  # its model is not lost
    remade = run(["dvc", "repro", "--single-item", "--force", "analyse"], clone)
    assert _ran(remade.stdout) == {"analyse"}
    assert not (clone / paths.MODELS).exists() and not (clone / paths.PREDICTIONS).exists()
    for made in (paths.REPORT, paths.SUMMARY, paths.CURVES):
        assert (clone / made).read_text() == (repo / made).read_text(), made
    report = (clone / paths.REPORT).read_text()
    for variant in VARIANTS:  # the first seed's feature maps, drawn by analyse, kept as git holds them
        figure = paths.feature_maps_figure(paths.ANALYSIS, variant, 0, "Bag")
        assert (clone / figure).read_bytes() == (repo / figure).read_bytes()
        assert f"]({figure.relative_to(paths.REPORT.parent).as_posix()})" in report
        maps = paths.run_files(variant, 0).feature_maps
        assert f"{maps} is not here (DVC's cache of models): its feature maps are kept" in remade.stdout


@pytest.mark.slow
def test_a_corrupted_raw_file_is_named_and_restored(pipeline):
    """prepare names the file; `dvc repro` restores it by re-running download (or from its cache)."""
    repo, _, _ = pipeline
    raw = repo / "data" / "raw" / "train-images-idx3-ubyte.gz"
    raw.chmod(0o644)
    raw.write_bytes(raw.read_bytes()[:-50])
    broken = subprocess.run([sys.executable, "stages/prepare.py"], cwd=repo, env=venv_env(),
                            capture_output=True, text=True)
    assert broken.returncode == 1 and "checksum mismatch" in broken.stderr
    assert "Traceback" not in broken.stderr
    restored = run(["dvc", "repro"], repo)
    # DVC sees download's output changed and restores it: from its cache when it holds the
    # output (as here), else by re-running the stage.
    assert ("Stage 'download' is cached - skipping run, checking out outputs" in restored.stdout
            or "download" in _ran(restored.stdout))
    recorded = json.loads((repo / paths.SOURCE_INFO).read_text())["md5"]
    assert file_digest(raw) == recorded[raw.name]
    assert _ran(restored.stdout) <= {"download"}  # the same data again: nothing downstream runs


@pytest.mark.slow
def test_a_new_variant_is_an_edit_of_params_and_only_it_trains(pipeline):
    repo, params, _ = pipeline
    params = {**params, "variants": {**params["variants"],
                                     "wide3": {"blocks": 3, "filters": 16, "padding": "same"}}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    added = _ran(run(["dvc", "repro"], repo).stdout)
    assert {s for s in added if s.startswith("train")} == {"train@wide3"}
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "wide3"], repo)
    # the report lists it, but not among the paper's claims
    report = (repo / paths.REPORT).read_text()
    claims = report.split("## The paper's claims, checked")[1].split("\n## ")[0]
    assert "| wide3 (" in report and "wide3" not in claims


@pytest.mark.slow
def test_a_removed_variant_leaves_every_output_of_the_analysis(pipeline):
    """Issue 34.1: its records stay in reports/eval and metrics/runs (ignored: the analysis
    reads params.yaml's variants x seeds), and the analysis runs again without it."""
    repo, params, _ = pipeline
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))  # wide3 gone
    removed = run(["dvc", "repro"], repo)
    assert _ran(removed.stdout) == {"check_params", "analyse"}
    assert (repo / paths.run_record("wide3", 0).folder).is_dir()
    for output in (paths.REPORT, paths.SUMMARY, paths.ACCURACY, paths.CURVES, paths.ANALYSIS_FILE):
        assert "wide3" not in (repo / output).read_text(), output
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "wide3 removed"], repo)


@pytest.mark.slow
def test_an_experiment_on_one_variant_retrains_only_it(pipeline):
    # (a key the variant does not set yet takes a leading +, as in Hydra)
    repo, _, _ = pipeline
    experiment = run(["dvc", "exp", "run", "-n", "dropout-03", "-S", "+variants.cnn2.dropout_rate=0.3"], repo)
    assert {s for s in _ran(experiment.stdout) if s.startswith("train")} == {"train@cnn2"}
    names = [name for name, _ in _runs_in_store(repo)]
    assert names.count("cnn2-seed0") == 2
    with sqlite3.connect(repo / "mlflow.db") as db:  # the experiment's run says which it is
        named = db.execute("SELECT count(*) FROM runs WHERE name = 'cnn2-seed0 @ dropout-03'").fetchone()
        # its model registered as a version tagged with the experiment and the param it added
        tags = db.execute("SELECT t.key, t.value FROM model_version_tags t JOIN model_version_tags e "
                          "ON t.name = e.name AND t.version = e.version WHERE t.name = "
                          "'fashion-mnist-cnn2' AND e.key = 'dvc_exp_name' AND e.value = 'dropout-03'"
                          ).fetchall()
    assert named == (1,)
    assert {("dvc_exp_name", "dropout-03"), ("params_changed", "variants.cnn2.dropout_rate=0.3")} <= set(tags)


@pytest.mark.slow
def test_a_seed_added_trains_alone_and_a_seed_removed_leaves_the_others(pipeline):
    """train@<variant> trains every seed in one process, but keeps a seed made by the same
    settings, code and data: adding a seed trains only it; removing one deletes its outputs
    (model, records, metrics) and keeps the rest untouched. One variant's stages suffice."""
    repo, params, _ = pipeline
    run(["git", "reset", "-q", "--hard"], repo)
    run(["git", "clean", "-qfd", "models", "reports", "metrics", "predictions"], repo)
    run(["dvc", "checkout", "-q"], repo)
    seed0 = repo / paths.run_files("cnn2", 0).model
    before = file_digest(seed0)
    runs_before = _runs_in_store(repo)
    two_seeds = {**params, "train": {**params["train"], "seeds": [0, 1]}}
    (repo / "params.yaml").write_text(yaml.safe_dump(two_seeds, sort_keys=False))
    added = run(["dvc", "repro", "evaluate@cnn2"], repo).stdout
    assert _ran(added) == {"check_params", "train@cnn2", "evaluate@cnn2"}
    assert "cnn2-seed0: kept" in added
    assert file_digest(seed0) == before
    new_runs = [name for name, _ in _runs_in_store(repo)[len(runs_before):]]
    assert new_runs == ["cnn2-seed1"]
    assert (repo / paths.metrics_file("cnn2", 1)).is_file()
    assert (repo / paths.run_record("cnn2", 1).history).is_file()

    only_seed1 = {**params, "train": {**params["train"], "seeds": [1]},
                  "registry": {**params["registry"], "champion_seed": 1}}
    (repo / "params.yaml").write_text(yaml.safe_dump(only_seed1, sort_keys=False))
    removed = run(["dvc", "repro", "evaluate@cnn2"], repo).stdout
    assert "cnn2-seed1: kept" in removed
    assert [name for name, _ in _runs_in_store(repo)] == [name for name, _ in runs_before] + new_runs
    for path in (paths.model_dir("cnn2", 0), paths.metrics_file("cnn2", 0),
                 paths.run_record("cnn2", 0).folder, paths.confusion_csv("cnn2", 0)):
        assert not (repo / path).exists(), path
    assert (repo / paths.run_files("cnn2", 1).model).is_file()
    assert (repo / paths.metrics_file("cnn2", 1)).is_file()
