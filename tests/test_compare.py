"""Comparing variants: one vocabulary of MLflow metrics across every model run, true run
durations, the data set and the report in MLflow, the terminal table, and the docs'
`dvc exp show` (docs/usage.md) readable in 160 columns after two experiments; on the real tiny pipeline."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fmnist import analyse, paths, report, results, tracking
from fmnist.progress import EpochLine, stage_label
from fmnist.records import BaselineMetrics, BaselineSummary, Summary, VariantSummary
from tests.conftest import BUILT_VARIANTS, REPO, built_copy, only_variants, run, venv_env

VARIANTS = BUILT_VARIANTS
SHOWN = ["authors_cnn2_bn_skip"]  # the paper's rows: the docs' `dvc exp show` keeps them, drops ours
EPOCH_KEYS = {"loss", "accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy",
              "epoch_seconds", "images_per_second", "learning_rate"}


def _store(repo: Path) -> sqlite3.Connection:
    return sqlite3.connect(repo / "mlflow.db")


def _model_runs(db: sqlite3.Connection, experiment: str) -> dict[str, dict]:
    runs = {}
    for run_id, name, start, end in db.execute(
            "SELECT r.run_uuid, r.name, r.start_time, r.end_time FROM runs r JOIN experiments e "
            "ON r.experiment_id = e.experiment_id WHERE e.name = ?", (experiment,)):
        metrics: dict[str, list[tuple[int, float, int]]] = {}
        for key, step, value, timestamp in db.execute(
                "SELECT key, step, value, timestamp FROM metrics WHERE run_uuid = ?", (run_id,)):
            metrics.setdefault(key, []).append((step, value, timestamp))
        tags = dict(db.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (run_id,)))
        params = dict(db.execute("SELECT key, value FROM params WHERE run_uuid = ?", (run_id,)))
        datasets = db.execute(
            "SELECT d.name, d.digest, t.value FROM inputs i JOIN datasets d ON i.source_id = "
            "d.dataset_uuid JOIN input_tags t ON t.input_uuid = i.input_uuid WHERE "
            "i.destination_id = ? AND t.name = 'canonical_split'", (run_id,)).fetchall()
        runs[name] = {"start": start, "end": end, "metrics": metrics, "tags": tags,
                      "params": params, "datasets": sorted(datasets)}
    return runs


def _docs_exp_show() -> list[str]:
    """The `dvc exp show` command of docs/usage.md (the line of its code block that starts with it)."""
    text = (REPO / "docs" / "usage.md").read_text()
    (line,) = [line for line in text.splitlines() if line.startswith("dvc exp show ")]
    return shlex.split(line.split("#")[0])


def _docs_commands() -> list[list[str]]:
    """The `dvc exp show` and `dvc metrics diff` commands of docs/usage.md's code blocks,
    its placeholder <exp> as the experiment `dropped`."""
    text = (REPO / "docs" / "usage.md").read_text()
    lines = [line.split("  #")[0].replace("<exp>", "dropped") for line in text.splitlines()
             if line.startswith(("dvc exp show ", "dvc metrics diff "))]
    assert len(lines) >= 2, lines
    return [shlex.split(line) for line in lines]


def test_stage_label_counts_the_matrix_and_the_epoch_line_estimates_the_rest():
    assert stage_label("train", ["a", "b", "c"], [0, 1], "b", 1) == "[train 4/6] b seed 1"
    line = EpochLine("[train 4/6] b seed 1", epochs=10, first_epoch=2)
    text = line.text({"epoch": 4, "loss": 0.5, "accuracy": 0.8, "test_accuracy": 0.75},
                     now=line.started + 20.0)  # 2 epochs of this attempt in 20 s
    assert "epoch 4/10" in text and "monitored test_accuracy 0.7500" in text
    assert "10s/epoch" in text and "ETA 1m00s" in text  # 6 epochs left
    # two more seeds of the stage to train: 6 + 2 x 10 epochs at 10 s
    stage = EpochLine("[train 4/6] b seed 1", epochs=10, first_epoch=2, seeds_after=2)
    assert stage.text({"epoch": 4, "loss": 0.5}, now=stage.started + 20.0).endswith(
        "ETA 1m00s; the stage's 2 seeds after it: ETA 4m20s")


def test_report_html_inlines_every_figure_and_keeps_details(tmp_path):
    figure = tmp_path / "analysis" / "curve.png"
    figure.parent.mkdir()
    figure.write_bytes(b"\x89PNG not really")
    text = ("# Report\n\n![Fig. 2](analysis/curve.png)\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
            "<details><summary>cnn2</summary>\n\n```\nsummary\n```\n\n</details>\n")
    html = report.report_html(text, tmp_path)
    assert f'src="data:image/png;base64,{base64.b64encode(figure.read_bytes()).decode()}"' in html
    assert "<table>" in html and "<details><summary>cnn2</summary>" in html and "![" not in html


def test_the_terminal_table_and_the_accuracy_file_come_from_the_summary():
    def variant(seeds: int, mean: float, std: float | None, paper: float | None) -> VariantSummary:
        return VariantSummary(seeds=seeds, test_accuracy_mean=mean, test_accuracy_std=std,
                              test_accuracy_ci95_low=None, test_accuracy_ci95_high=None,
                              test_macro_f1_mean=mean, paper_test_accuracy=paper)

    summary = Summary(canonical_split=False, comparisons={},
                      baseline=BaselineSummary(test_accuracy=0.8512, test_macro_f1=0.85, train_size=500,
                                               paper_test_accuracy=0.897),
                      variants={"cnn2": variant(3, 0.91234, 0.0021, 0.9117),
                                "wide3": variant(1, 0.9, None, None)})
    lines = results.table(summary).splitlines()
    assert lines[2].split() == ["cnn2", "3", "91.23", "±", "0.21", "91.17"]
    assert lines[3].split() == ["wide3", "1", "90.00", "-"]  # one seed: no spread; no paper model
    assert lines[4].startswith("svc (baseline, 500 images)") and lines[4].split()[-2:] == ["85.12", "89.70"]
    assert lines[-1].startswith("NOTE: not the canonical")
    assert results.accuracy_by_variant(summary).percent == {"cnn2": 91.23, "wide3": 90.0, "svc": 85.12}


@pytest.mark.slow
def test_tiny_pipeline_compares_in_mlflow_and_in_dvc_exp_show(tmp_path, built_pipeline):
    params = built_pipeline.params
    repo = built_copy(built_pipeline, tmp_path / "repo")
    assert "[train 1/2] cnn2 seed 0 | epoch 2/2 |" in built_pipeline.output
    assert "[evaluate 2/2] authors_cnn2_bn_skip seed 0" in built_pipeline.output

    experiment = params["tracking"]["experiment"]
    with _store(repo) as db:
        runs = _model_runs(db, experiment)
        analysis = _model_runs(db, tracking.analysis_experiment(experiment))
        kinds = dict(db.execute("SELECT e.name, t.value FROM experiments e JOIN experiment_tags t "
                                "ON e.experiment_id = t.experiment_id WHERE t.key = ?",
                                (tracking.EXPERIMENT_KIND_TAG,)))
    # no analysis among them; each run named after the execution: `dvc repro` at the repo's commit
    execution = f"workspace-{run(['git', 'rev-parse', '--short', 'HEAD'], repo).stdout.strip()}"
    assert set(runs) == {f"{name} @ {execution}" for name in ("cnn2-seed0", "authors_cnn2_bn_skip-seed0",
                                                               "svc-baseline")}
    assert set(analysis) == {f"analysis @ {execution}"}
    assert {found["tags"][tracking.EXECUTION_TAG] for found in runs.values()} == {execution}
    runs = {name.split(" @ ")[0]: found for name, found in runs.items()}
    assert kinds[experiment] == tracking.EXPERIMENT_KIND  # the UI opens in its model-training mode

    series_names = {tracking.epoch_metric_name(key) for key in EPOCH_KEYS}
    assert not series_names & set(tracking.RESULT_METRICS)
    baseline = json.loads((repo / "metrics" / "baseline.json").read_text())
    digests = set()
    for name, found in runs.items():
        metrics = found["metrics"]
        # every model run ranks in the one test_accuracy column, logged once, with no step
        assert [step for step, _, _ in metrics["test_accuracy"]] == [0]
        # MLflow's own system/* series (CPU, memory, ...) aside
        for key in {key for key in metrics if not key.startswith("system/")} - series_names:
            assert key in tracking.RESULT_METRICS, (name, key)
            assert len(metrics[key]) == 1, (name, key)  # a result is one value, not a series
        assert "train_seconds" in metrics and "predict_seconds" in metrics, name
        assert not [key for key in metrics if key.startswith("final_") or "epochs" in key], name
        datasets = found["datasets"]
        assert [d[0] for d in datasets] == ["fashion-mnist-test", "fashion-mnist-train"], name
        assert {d[2] for d in datasets} == {"False"}  # the tiny files are not the canonical split
        digests.add(datasets[0][1])
        if name == "svc-baseline":
            assert metrics["test_accuracy"][0][1] == pytest.approx(baseline["test_accuracy"])
            # the run covers the fit: its Duration is at least the fit's time
            assert found["end"] - found["start"] >= 1000 * (metrics["train_seconds"][0][1] - 0.05)
            continue
        variant = found["tags"]["variant"]
        evaluated = json.loads((repo / paths.metrics_file(variant, int(found["tags"]["seed"]))).read_text())
        assert metrics["test_accuracy"][0][1] == pytest.approx(evaluated["test_accuracy"])
        assert metrics["test_macro_f1"][0][1] == pytest.approx(evaluated["test_macro_f1"])
        assert sorted(step for step, _, _ in metrics["monitor_test_accuracy"]) == [1, 2]
        assert found["params"]["train.epochs"] == "2" and variant in VARIANTS
        # the evaluate stage logged later without stretching the run's Duration
        assert found["end"] < metrics["test_accuracy"][0][2]
    assert len(digests) == 1  # the same test set, the same digest, in every run

    with _store(repo) as db:
        (artifact_uri,) = db.execute(
            "SELECT artifact_uri FROM runs WHERE name LIKE 'analysis @ %'").fetchone()
    html = (Path(artifact_uri.removeprefix("file://")) / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3  # Fig. 1, the curves, the confusion matrix...
    assert "<details>" in html and "![" not in html and 'src="analysis/' not in html

    summary = json.loads((repo / "metrics" / "summary.json").read_text())
    table = subprocess.run([sys.executable, "-m", "fmnist.results"], cwd=repo, env=venv_env(),
                           capture_output=True, text=True, check=True).stdout
    for variant in VARIANTS:
        mean = 100 * summary["variants"][variant]["test_accuracy_mean"]
        assert re.search(rf"^{variant} +1 +{mean:.2f}", table, re.MULTILINE), table

    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "results"], repo)
    # two experiments that move the tiny models' accuracy: a lower learning rate; then, after
    # edits, one that drops a variant (its params, the analyse entries naming it), changes a
    # list param and trains fewer epochs
    champion_variant = params["registry"]["champion_variant"]  # kept: the registry's checks below
    assert champion_variant in SHOWN and champion_variant in VARIANTS
    lower = run(["dvc", "exp", "run", "-n", "lower-lr", "-S", "train.learning_rate=0.0002"], repo)
    assert (f"@champion stays at fashion-mnist-{champion_variant} version 1: experiment lower-lr "
            "registers its versions but moves no alias") in lower.stdout, lower.stdout[-3000:]
    run(["dvc", "exp", "apply", "lower-lr"], repo)  # the workspace as a user leaves it
    kept = [champion_variant]
    dropped = [v for v in VARIANTS if v not in kept]
    (repo / "params.yaml").write_text(yaml.safe_dump(only_variants(params, kept), sort_keys=False))
    run(["dvc", "exp", "run", "-n", "dropped", "-S", "analyse.loss_levels=[0.5,0.4]",
         "-S", "train.epochs=1"], repo)
    with _store(repo) as db:  # each experiment's runs named after it: apart in every legend
        names = {name for (name,) in db.execute("SELECT name FROM runs")}
    for name, trained in (("lower-lr", VARIANTS), ("dropped", kept)):
        assert {f"{v}-seed0 @ {name}" for v in trained} | {f"analysis @ {name}"} <= names
    assert not {f"{v}-seed0 @ dropped" for v in dropped} & names
    # both registered their models, tagged with their names, and left @champion where it was
    champion = f"fashion-mnist-{champion_variant}"
    with _store(repo) as db:
        aliases = db.execute("SELECT name, alias, version FROM registered_model_aliases").fetchall()
        experiments = dict(db.execute("SELECT version, value FROM model_version_tags WHERE name = ? "
                                      "AND key = 'dvc_exp_name'", (champion,)).fetchall())
    assert aliases == [(champion, "champion", 1)]
    assert {experiments.get(2), experiments.get(3)} == {"lower-lr", "dropped"}, experiments
    with _store(repo) as db:  # and with the params the experiment changed
        changed = db.execute("SELECT t.value FROM model_version_tags t JOIN model_version_tags e ON "
                             "t.name = e.name AND t.version = e.version WHERE t.name = ? AND t.key = "
                             "'params_changed' AND e.key = 'dvc_exp_name' AND e.value = 'lower-lr'",
                             (champion,)).fetchall()
    assert changed == [("train.learning_rate=0.0002",)], changed
    command = _docs_exp_show()
    shown = run(command, repo, env={**venv_env(), "COLUMNS": "160"}).stdout
    assert max(len(line) for line in shown.splitlines()) <= 160, shown
    assert "…" not in shown, shown  # no cell or header cut
    header = next(line for line in shown.splitlines() if "Experiment" in line).split()
    assert set(header) == {"Experiment", "train.epochs", "train.learning_rate", *SHOWN}, shown
    # the same columns as CSV: every experiment's mean accuracy per variant is in the table
    table = run([c if c != "--no-pager" else "--csv" for c in command], repo).stdout
    rows = [row for row in csv.DictReader(io.StringIO(table)) if row["typ"].startswith("branch_")]
    assert len(rows) == 2, table
    for row in rows:
        line = next(line for line in shown.splitlines() if f"[{row['Experiment']}]" in line)
        cells = {float(cell) for cell in line.split() if re.fullmatch(r"[0-9.]+", cell)}
        for variant in SHOWN:
            assert float(row[variant]) > 0 and float(row[variant]) in cells, (row, line)

    # every documented command stays within 160 columns
    for command in _docs_commands():
        shown = run(command, repo, env={**venv_env(), "COLUMNS": "160"}).stdout
        assert shown.strip() and max(len(line) for line in shown.splitlines()) <= 160, (command, shown)
        assert "…" not in shown, (command, shown)
        if command[:3] == ["dvc", "exp", "show"]:
            assert "[dropped]" in shown and "[lower-lr]" in shown, shown
            assert len(shown.splitlines()) < 25, shown  # a screen
    diff = run(["dvc", "metrics", "diff", "HEAD", "dropped", "--all", "--no-path", "--targets",
                "metrics/accuracy.json"], repo).stdout
    rows = {line.split()[0]: line.split()[1:] for line in diff.splitlines()[1:]}
    assert [rows[v][1] for v in dropped] == ["-"] and float(rows[champion_variant][1]) > 0, diff

    # `dvc plots diff` of two experiments: one line per run and experiment, not one per run
    plots = json.loads(run(["dvc", "plots", "diff", "HEAD", "lower-lr", "--json"], repo).stdout)
    (loss,) = plots["data"]["Training loss"]
    spec = loss["content"]
    assert spec["encoding"]["color"]["field"] == "series"
    assert spec["transform"] == [{"calculate": "datum.run + ' @ ' + datum.rev", "as": "series"}]
    points = spec["data"]["values"]
    series = {}
    for point in points:
        series.setdefault(f"{point['run']} @ {point['rev']}", []).append(int(point["epoch"]))
    expected = {f"{v}-seed0 @ {rev}" for v in VARIANTS for rev in ("HEAD", "lower-lr")}
    assert set(series) == expected, set(series)
    assert all(sorted(epochs) == list(range(1, len(epochs) + 1)) for epochs in series.values()), series


def test_the_committed_svc_is_logged_and_marked_where_it_was_not_fitted(
        mlflow_store, tiny_params, tiny_config, monkeypatch):
    """A fresh clone's `make run` never fits the SVC (its stage is up to date by the committed
    dvc.lock): its committed results become a run tagged as such, and the table says so."""
    monkeypatch.chdir(mlflow_store)
    (mlflow_store / "params.yaml").write_text(yaml.safe_dump(tiny_params))
    baseline = BaselineMetrics(test_accuracy=0.9058, test_macro_f1=0.905, test_weighted_f1=0.905,
                               test_macro_precision=0.905, test_macro_recall=0.9058, train_seconds=355.2,
                               predict_seconds=96.1, train_size=60000)
    (mlflow_store / "metrics").mkdir()
    baseline.write(mlflow_store / "metrics" / "baseline.json")
    experiment = tiny_config.tracking.experiment
    tracking.use_store(mlflow_store)
    assert results._baseline_source() == "committed reference, not fitted here"

    assert analyse.log_committed_baseline(tiny_config, baseline)
    assert not analyse.log_committed_baseline(tiny_config, baseline)  # once, not at every analyse
    (logged,) = tracking.finished_runs(experiment, {"kind": "baseline"})
    assert logged["tags"][results.SOURCE_TAG] == results.COMMITTED_REFERENCE
    assert logged["metrics"]["test_accuracy"] == pytest.approx(0.9058)
    assert results.baseline_runs(experiment, baseline) == {"fitted": False, "reference": True}
    assert results._baseline_source() == "committed reference, not fitted here"
    summary = Summary(canonical_split=True, variants={}, comparisons={},
                      baseline=BaselineSummary(test_accuracy=0.9058, test_macro_f1=0.905, train_size=60000,
                                               paper_test_accuracy=0.897))
    assert "svc (baseline, 60000 images; committed reference, not fitted here)" in results.table(
        summary, results._baseline_source())

    # the baseline stage's own fit, with the same results: the row is the user's
    with tracking.run(tracking.connect(experiment), "svc-baseline", {"kind": "baseline"}):
        tracking.log_results({"test_accuracy": 0.9058, "train_seconds": 355.2})
    assert results.baseline_runs(experiment, baseline) == {"fitted": True, "reference": True}
    assert results._baseline_source() == ""
