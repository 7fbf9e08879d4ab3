"""The benchmark scripts' pure parts."""

from benchmarks.timed_repro import stage_order


def test_timed_repro_runs_seed_major_with_train_before_evaluate():
    listed = ["check_params", "download", "prepare", "train@cnn2-0", "train@cnn2-1", "train@cnn2_bn-0",
              "train@cnn2_bn-1", "evaluate@cnn2-0", "evaluate@cnn2-1", "evaluate@cnn2_bn-0",
              "evaluate@cnn2_bn-1", "baseline", "analyse"]
    assert stage_order(listed, ["cnn2", "cnn2_bn"]) == [
        "check_params", "download", "prepare", "baseline",
        "train@cnn2-0", "evaluate@cnn2-0", "train@cnn2_bn-0", "evaluate@cnn2_bn-0",
        "train@cnn2-1", "evaluate@cnn2-1", "train@cnn2_bn-1", "evaluate@cnn2_bn-1",
        "analyse"]
