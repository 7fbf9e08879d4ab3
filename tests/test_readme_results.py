"""The README's Results section says what the committed analysis says: each variant's row
(mean ± std, interval, seeds, best epoch) and the SVC's against reports/analysis/analysis.json
and metrics/baseline.json, each claim's difference and interval against the same analysis.
The README is written by hand; this keeps it from drifting when a stage is re-run."""

from __future__ import annotations

import re

import pytest

from fmnist import paths
from fmnist.files import read_json
from fmnist.results import pct
from tests.conftest import REPO


def _results_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Results (three seeds)")
    return text[start:text.index("\n## ", start + 1)]


def _variant_rows() -> dict[str, list[str]]:
    """The results table's rows (from its "| model |" header to its end; not the claims
    table's) that name one variant in backticks: variant -> its cells."""
    rows: dict[str, list[str]] = {}
    in_table = False
    for line in _results_section().splitlines():
        in_table = line.startswith("| model |") or (in_table and line.startswith("|"))
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if in_table and (name := re.search(r"`(\w+)`", cells[0])):
            assert name.group(1) not in rows, f"two README rows for {name.group(1)}"
            rows[name.group(1)] = cells
    return rows


def _points(value: float) -> str:
    return f"{100 * value:+.2f}"


ANALYSIS = REPO / paths.ANALYSIS / "analysis.json"


@pytest.fixture(scope="module")
def analysis() -> dict:
    return read_json(ANALYSIS, "written by the analyse stage")


def test_every_variant_of_the_analysis_has_its_row_and_its_numbers(analysis):
    rows = _variant_rows()
    assert set(rows) == set(analysis["variants"]), "README rows and the analysed variants differ"
    for variant, entry in analysis["variants"].items():
        accuracy = entry["test_accuracy"]
        cells = " | ".join(rows[variant][2:])
        expected = [f"{pct(accuracy['mean'])} ± {pct(accuracy['std'])}",
                    f"[{pct(accuracy['ci95'][0])}, {pct(accuracy['ci95'][1])}]",
                    " / ".join(pct(v) for v in accuracy["values"])]
        best = entry.get("best_epoch_test_accuracy_selected_on_test")
        if best:
            expected.append(f"{pct(best['mean'])} ± {pct(best['std'])}")
        for text in expected:
            assert text in cells, f"{variant}: README says {cells!r}, the analysis {text!r}"


def test_the_svc_row_is_the_committed_baseline():
    baseline = read_json(REPO / paths.BASELINE_METRICS, "written by the baseline stage")
    svc = next(line for line in _results_section().splitlines() if line.startswith("| SVC"))
    assert f"| {pct(baseline['test_accuracy'])} " in svc


def test_each_claims_difference_and_interval_is_the_analysis(analysis):
    section = _results_section()
    effects = {**analysis["comparisons"], **analysis.get("factors", {})}
    for name, effect in effects.items():
        low, high = effect["ci95"]
        text = f"{_points(effect['difference'])}, [{_points(low)}, {_points(high)}]"
        assert text in section, f"the README's claims table lacks {name}: {text}"
