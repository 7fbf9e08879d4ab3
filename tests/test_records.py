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
                                               r"\(RunMetrics lacks \['test_loss'\]\); delete it and run "
                                               r"`dvc repro` to make it again$"):
        RunMetrics.read(path)
    summary = json.loads((REPO / paths.SUMMARY).read_text())
    path.write_text(json.dumps({**summary, "comparisons": [1]}))
    with pytest.raises(CorruptFileError, match=r"\(\[1\] where an object belongs\)"):
        Summary.read(path)


def test_a_damaged_file_is_a_one_line_error_naming_it_what_is_wrong_and_what_to_do(tmp_path):
    """A truncated JSON record or errors CSV: CorruptFileError (a user error, not an
    "unexpected JSONDecodeError"); one under models/ says how to restore or re-train its seed."""
    path = tmp_path / "seed0.json"
    path.write_text((REPO / paths.metrics_file("cnn2", 0)).read_text()[:40])
    with pytest.raises(CorruptFileError) as error:
        RunMetrics.read(path)
    assert str(error.value).startswith(f"{path} cannot be read as JSON (JSONDecodeError: ")
    assert str(error.value).endswith("): it is damaged or was replaced; delete it and run `dvc repro` "
                                     "to make it again")
    assert "\n" not in str(error.value)

    folder = tmp_path / "models" / "cnn2" / "seed0"
    folder.mkdir(parents=True)
    run_info = paths.RunFiles(folder).run_info
    run_info.write_bytes(b"\xff\xfe not text")
    with pytest.raises(CorruptFileError, match="cannot be read as JSON \\(UnicodeDecodeError: ") as error:
        RunInfo.read(run_info, remedy=paths.model_remedy(folder))
    assert str(error.value).endswith(
        f"restore it with `dvc checkout {folder.parent}` (from DVC's cache), or delete {folder} and run "
        "`dvc repro` to train it again")

    errors = tmp_path / "errors.csv"
    lines = (REPO / paths.run_record("cnn2", 0).errors).read_text().splitlines()
    errors.write_text("\n".join(lines[:3])[:-12])  # the third line cut short
    with pytest.raises(CorruptFileError, match=f"^{errors} cannot be read as the evaluate stage's errors "
                                               r"\(TypeError: .*\): it is damaged or was "
                                               "replaced; delete it and run `dvc repro` to make it again$"):
        Misclassified.read_csv(errors)
