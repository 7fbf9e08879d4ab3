"""`make run`'s progress line over the whole pipeline (fmnist.repro): the ETA from the stage
times measured on this machine, and the count as it follows DVC's output. The real
`dvc repro` through it: tests/test_pipeline.py."""

from __future__ import annotations

import json

from fmnist import repro


def test_the_time_left_adds_each_stages_measured_time_or_its_kinds_mean():
    seconds = {"check_params": 1.0, "train@cnn2": 600.0, "train@cnn2_bn": 1200.0, "evaluate@cnn2": 60.0}
    # train@cnn4 was never timed: the mean of the train stages, 900 s; 1200 + 900 + 60 s = 36 min
    line = repro.progress_line("train@cnn2_bn", 3, ["train@cnn4", "evaluate@cnn2"], seconds)
    assert line == "[pipeline 4/6] train@cnn2_bn - 3 done, about 36 min left"
    assert [repro.rough(s) for s in (20, 89, 3569, 3599, 8700)] == [
        "under a minute", "about 1 min", "about 59 min", "about 1 h 00 min", "about 2 h 25 min"]


def test_a_kind_never_timed_is_named_not_guessed():
    seconds = {"train@cnn2": 3 * 3600 + 300.0}
    assert repro.progress_line("train@cnn2", 0, ["evaluate@cnn2", "analyse"], seconds) == (
        "[pipeline 1/3] train@cnn2 - 0 done, about 3 h 05 min left + analyse, evaluate (not timed on "
        "this machine yet)")
    assert repro.progress_line("analyse", 9, [], seconds) == (
        "[pipeline 10/10] analyse - 9 done, no ETA yet (not timed on this machine yet)")
    assert repro.progress_line("check_params", 0, ["train@cnn2"], {}).endswith(", no ETA yet (not timed "
                                                                              "on this machine yet)")


def test_the_count_follows_what_dvc_runs_and_skips_and_each_stage_is_timed(tmp_path):
    times = tmp_path / "seconds.json"
    times.write_text(json.dumps({"check_params": 1.0, "evaluate@cnn2": 60.0}))
    progress = repro.Progress(["check_params", "train@cnn2", "evaluate@cnn2"], times)
    assert progress.line("Running stage 'check_params':", 0.0) == (
        "[pipeline 1/3] check_params - 0 done, about 1 min left + train (not timed on this machine yet)")
    assert progress.line("> python stages/check_params.py", 1.0) is None
    assert progress.line("Stage 'train@cnn2' didn't change, skipping", 2.0) is None  # out of the count
    assert progress.line("Running stage 'evaluate@cnn2':", 2.5) == (
        "[pipeline 2/2] evaluate@cnn2 - 1 done, about 1 min left")
    # a stage the plan did not foresee joins the count
    assert progress.line("Running stage 'register':", 32.5).startswith("[pipeline 3/3] register - 2 done,")
    progress.finished(40.0)
    assert json.loads(times.read_text()) == {"check_params": 2.5, "evaluate@cnn2": 30.0, "register": 7.5}
