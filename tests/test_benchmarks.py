"""The benchmark scripts: their pure parts, and the GPU check rehearsed on the CPU."""

import argparse
import json
import shutil
import tarfile

import pytest
import yaml

from benchmarks.speed import positive_int, thread_setting
from benchmarks.stage_cost import compare, fixed_cost, lines_start, stage_times
from benchmarks.timed_repro import cache_lost_outputs, skip_reason, stage_order
from tests.conftest import REPO, only_variants, run, venv_env


def test_timed_repro_runs_each_variants_train_before_its_evaluate():
    listed = ["check_params", "download", "prepare", "train@cnn2", "train@cnn2_bn", "evaluate@cnn2",
              "evaluate@cnn2_bn", "baseline", "analyse"]
    assert stage_order(listed, ["cnn2", "cnn2_bn"]) == [
        "check_params", "download", "prepare", "baseline",
        "train@cnn2", "evaluate@cnn2", "train@cnn2_bn", "evaluate@cnn2_bn", "analyse"]
    assert stage_order(listed, ["cnn2", "cnn2_bn"], only=["cnn2_bn"]) == [
        "check_params", "download", "prepare", "baseline", "train@cnn2_bn", "evaluate@cnn2_bn"]


def test_timed_repro_skips_only_stages_whose_sole_change_is_a_lost_cache():
    lost_model = [{"changed outs": {"models/a/seed0": "not in cache"}}]
    assert cache_lost_outputs(lost_model, set()) == ["models/a/seed0"]
    assert cache_lost_outputs([], set()) == []  # up to date
    evaluate = [{"changed deps": {"models/a/seed0": "deleted"}},
                {"changed outs": {"predictions/a-seed0.npz": "not in cache"}}]
    assert cache_lost_outputs(evaluate, {"models/a/seed0"}) == ["predictions/a-seed0.npz"]
    for changed in ([{"changed deps": {"src/fmnist/training.py": "modified"}}, *lost_model],
                    [{"changed deps": {"params.yaml": {"train.epochs": "modified"}}}, *lost_model],
                    [{"changed outs": {"metrics/runs/a-seed0.json": "deleted"}}],  # a record in git
                    ["changed command"], evaluate):  # evaluate: its model not lost, only missing
        assert cache_lost_outputs(changed, set()) is None


def test_timed_repro_skips_runs_that_ran_elsewhere_and_register_without_their_models():
    lost: set[str] = set()
    assert skip_reason("train@a-0", [{"changed outs": {"models/a/seed0": "not in cache"}}], lost)
    assert lost == {"models/a/seed0"}
    assert skip_reason("train@b-0", [], lost) is None  # up to date: DVC says so itself
    # the first stages run even with their outputs not in the cache: the rest need them
    assert skip_reason("prepare", [{"changed outs": {"data/prepared": "not in cache"}}], lost) is None
    assert "needs every model" in skip_reason("register", [{"changed deps": {"models": "modified"}}], lost)
    assert skip_reason("register", [], set()) is None
    assert skip_reason("analyse", [{"changed deps": {"reports/eval": "modified"}}], lost) is None


def test_speed_thread_settings_are_default_or_two_positive_counts():
    assert thread_setting("default") == "default"
    assert thread_setting("2,1") == "2,1"
    for wrong in ["2", "0,1", "2,1,1", "two,one", "2, 1", ""]:
        with pytest.raises(argparse.ArgumentTypeError, match="INTRA,INTER"):
            thread_setting(wrong)


def test_speed_counts_are_whole_numbers_of_at_least_one():
    assert positive_int("1") == 1 and positive_int("10000") == 10_000
    for wrong in ["0", "-1", "1.5", "", "ten"]:
        with pytest.raises(argparse.ArgumentTypeError, match="at least 1"):
            positive_int(wrong)


def test_the_gpu_check_refuses_a_reference_epoch_count_below_one(tmp_path):
    out = tmp_path / "gpu.json"
    check = run(["python", "-m", "benchmarks.gpu_check", "--reference-epochs", "0", "--out", str(out)],
                REPO, check=False)
    assert check.returncode == 2 and "'0': give a whole number of at least 1" in check.stderr
    assert not out.exists()


@pytest.mark.slow
def test_the_gpu_check_rehearses_on_the_cpu(dvc_repo, tiny_params, tmp_path):
    """benchmarks/gpu_check.sh as the GPU machine runs it, on tiny data and the CPU: the real
    train stage per paper variant under JAX, the references, the rest of the pipeline, gpu.json
    and the archives that bring the results back."""
    paper = ["authors_cnn2"]  # analyse.paper_models, shrunk to one of the authors' three
    params = only_variants(tiny_params, [*paper, "cnn2"])  # cnn2: trained by the pipeline step only
    params["train"]["backend"] = "jax"  # on a GPU, auto gives jax; here it must be asked for
    (dvc_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(REPO / "benchmarks", dvc_repo / "benchmarks",
                    ignore=shutil.ignore_patterns("__pycache__", "results"))
    run(["git", "add", "-A"], dvc_repo)
    run(["git", "commit", "-qm", "jax, benchmarks"], dvc_repo)
    run(["dvc", "repro", "download"], dvc_repo)  # what travels: data/raw
    shutil.rmtree(dvc_repo / ".dvc" / "cache")  # and what does not: the GPU machine has no cache
    out = tmp_path / "out"
    out.mkdir()
    check = run(["bash", "benchmarks/gpu_check.sh", "--reference-epochs", "1"], dvc_repo,
                env={**venv_env(), "OUT": str(out)})
    report = json.loads((out / "gpu.json").read_text())
    assert report["finished"], check.stdout[-3000:]
    assert [(s["stage"], s["ran"]) for s in report["data_stages"]][1:] == [("download", False),
                                                                           ("prepare", True)]
    assert report["gpu"].startswith("none") and report["backend"] == "jax"
    assert [r["variant"] for r in report["stage_runs"]] == paper
    for entry in report["stage_runs"]:
        assert entry["epochs"] == 2 and entry["images_per_second"] > 0
        assert 0.0 <= entry["final_test_accuracy"] <= 1.0 and entry["precision"] == "float32"
    assert set(report["reference"]["authors_cnn2"]) == {"scan_loop_float32", "scan_loop_mixed_bfloat16",
                                                "plain_fit_float32"}
    assert set(report["stage_vs_best_reference"]) == set(paper)
    assert {s["stage"] for s in report["pipeline"]["stages"]} >= {"train@cnn2", "evaluate@cnn2",
                                                                  "analyse"}
    with tarfile.open(out / "results.tar.gz") as archive:
        names = archive.getnames()
    assert "dvc.lock" in names and "reports/report.md" in names and "metrics/summary.json" in names
    assert "train@authors_cnn2" in (dvc_repo / "dvc.lock").read_text()
    for variant in [*paper, "cnn2"]:  # the train stage under JAX, as params.yaml asked
        run_info = json.loads((dvc_repo / f"models/{variant}/seed0/run.json").read_text())
        assert (run_info["keras_backend"], run_info["precision"]) == ("jax", "float32")
    assert "(jax, float32)" in (dvc_repo / "reports/report.md").read_text()  # the "Every run" table


STAGE_COST_LOG = [  # (seconds, line) as benchmarks.stage_cost records `dvc repro`'s output
    (1.9, "Running stage 'check_params':"), (2.0, "> python stages/check_params.py"),
    (2.4, "params.yaml: valid"), (2.6, "Updating lock file 'dvc.lock'"),
    (2.7, "Running stage 'train@cnn2':"), (2.7, "> python stages/train.py --variant cnn2"),
    (20.0, '[timing] {"startup": 6.0, "compile": 2.0, "loop": 8.0, "logging": 1.5}'),
    (31.0, '[timing] {"startup": 0.0, "compile": 1.0, "loop": 7.0, "logging": 1.0}'),
    (31.5, "[timing] not json"), (32.0, "Updating lock file 'dvc.lock'"),
    (32.2, "Running stage 'evaluate@cnn2-0':"), (40.0, "evaluate: test accuracy 0.1"),
    (41.0, "Use `dvc push` to send your updates to remote storage.")]


def test_stage_cost_times_each_stage_from_its_start_to_the_next_and_keeps_timing_lines():
    stages = stage_times(STAGE_COST_LOG, end=42.0)
    assert [(s["stage"], s["seconds"]) for s in stages] == [
        ("check_params", 0.8), ("train@cnn2", 29.5), ("evaluate@cnn2-0", 9.8)]
    assert stages[0]["timing"] == [] and [t["loop"] for t in stages[1]["timing"]] == [8.0, 7.0]
    assert [fixed_cost(s) for s in stages] == pytest.approx([0.8, 14.5, 9.8])  # less the loops
    assert lines_start(STAGE_COST_LOG, 42.0) == 1.9 and lines_start([], 42.0) == 42.0


def test_stage_cost_compares_totals_fixed_costs_and_stage_kinds():
    def report(commit, stages, total, fixed):
        return {"commit": commit, "cpu": "AMD EPYC", "date": "d", "settings": {"seeds": [0]},
                "stages": [{"stage": n, "seconds": s} for n, s in stages],
                "total_seconds": total, "mean_fixed_cost_seconds": fixed}
    before = report("a" * 40, [("prepare", 4.0), ("train@v-0", 30.0), ("train@v-1", 30.0)], 70.0, 20.0)
    after = report("b" * 40, [("prepare", 4.0), ("train@v", 45.0)], 52.5, 10.0)
    lines = compare(before, after)
    assert not any("WARNING" in line for line in lines)
    assert lines[-4].split() == ["prepare", "1", "x,", "4.0", "s", "1", "x,", "4.0", "s", "1.00"]
    assert lines[-3].split() == ["train", "2", "x,", "60.0", "s", "1", "x,", "45.0", "s", "0.75"]
    assert lines[-2].split()[-1] == "0.75" and lines[-1].split()[-1] == "0.50"
    after["cpu"] = "Intel"
    assert "WARNING" in compare(before, after)[2]
