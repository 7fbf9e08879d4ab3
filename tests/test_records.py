"""The records one stage hands the next (fmnist.records) read the committed files and write
them back unchanged, and a file that is not its record is a one-line error."""

from __future__ import annotations

import json

import pytest

from fmnist import paths
from fmnist.files import CorruptFileError
from fmnist.records import (
    Accuracy,
    Analysis,
    BaselineMetrics,
    Misclassified,
    RunInfo,
    RunMetrics,
    Summary,
)
from tests.conftest import REPO

RUN_METRICS = sorted((REPO / paths.METRICS / "runs").glob("*/seed*.json"))
COMMITTED = [(Analysis, paths.ANALYSIS_FILE), (Summary, paths.SUMMARY), (Accuracy, paths.ACCURACY),
             (BaselineMetrics, paths.BASELINE_METRICS),
             *((RunMetrics, path.relative_to(REPO)) for path in RUN_METRICS)]


@pytest.mark.parametrize(("record", "path"), COMMITTED, ids=[str(path) for _, path in COMMITTED])
def test_a_committed_record_is_written_back_byte_for_byte(record, path, tmp_path):
    record.read(REPO / path).write(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == (REPO / path).read_text()


def test_committed_run_records_and_errors_read_back_unchanged(tmp_path):
    for folder in sorted((REPO / paths.EVAL_REPORTS).glob("*/seed*")):
        record = paths.RunRecord(folder)
        # a model trained before fingerprints were recorded reads as fingerprint ""
        assert RunInfo.read(record.run_info).as_json() == {"fingerprint": "",
                                                           **json.loads(record.run_info.read_text())}
    errors = paths.run_record("cnn2", 0).errors
    Misclassified.write_csv(tmp_path / "errors.csv", Misclassified.read_csv(REPO / errors))
    assert (tmp_path / "errors.csv").read_text() == (REPO / errors).read_text()


def test_a_file_that_is_not_its_record_names_itself_and_its_stage(tmp_path):
    path = tmp_path / "seed0.json"
    metrics = json.loads((REPO / paths.metrics_file("cnn2", 0)).read_text())
    path.write_text(json.dumps({key: value for key, value in metrics.items() if key != "test_loss"}))
    with pytest.raises(CorruptFileError, match=r"seed0.json is not what the evaluate stage writes "
                                               r"\(RunMetrics lacks \['test_loss'\]\); run `dvc repro`"):
        RunMetrics.read(path)
    summary = json.loads((REPO / paths.SUMMARY).read_text())
    path.write_text(json.dumps({**summary, "comparisons": [1]}))
    with pytest.raises(CorruptFileError, match=r"\(\[1\] where an object belongs\)"):
        Summary.read(path)
