"""The results the README and docs/results.md state are what the committed analysis says.

README's "Results" table: each variant's mean ± std and interval, and the SVC's accuracy;
docs/results.md's table: the same plus each seed and the best-epoch number; docs/results.md's
claims table: each comparison's and each factor's difference and interval; and every
difference with an interval that the README's summary quotes. Both are written by hand;
this keeps them from drifting from reports/analysis/analysis.json and metrics/baseline.json
when a stage is re-run."""

from __future__ import annotations

import re

import pytest

from fmnist import paths
from fmnist.records import Analysis, BaselineMetrics, Comparison, Contrast, VariantResult
from fmnist.results import pct
from tests.conftest import REPO

README = REPO / "README.md"
RESULTS_PAGE = REPO / "docs" / "results.md"


def _readme_results() -> str:
    text = README.read_text()
    start = text.index("## Results (three seeds)")
    return text[start:text.index("\n## ", start + 1)]


def _variant_rows(text: str) -> dict[str, list[str]]:
    """The results table's rows (from its "| model |" header to its end; not the claims
    table's) that name one variant in backticks: variant -> its cells."""
    rows: dict[str, list[str]] = {}
    in_table = False
    for line in text.splitlines():
        in_table = line.startswith("| model |") or (in_table and line.startswith("|"))
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if in_table and (name := re.search(r"`(\w+)`", cells[0])):
            assert name.group(1) not in rows, f"two rows for {name.group(1)}"
            rows[name.group(1)] = cells
    return rows


def _points(value: float) -> str:
    return f"{100 * value:+.2f}"


def _effect_text(effect: Contrast | Comparison) -> str:
    low, high = effect.ci95
    return f"{_points(effect.difference)}, [{_points(low)}, {_points(high)}]"


@pytest.fixture(scope="module")
def analysis() -> Analysis:
    return Analysis.read(REPO / paths.ANALYSIS_FILE)


def _mean_and_interval(entry: VariantResult) -> list[str]:
    accuracy = entry.test_accuracy
    return [f"{pct(accuracy.mean)} ± {pct(accuracy.std)}",
            f"[{pct(accuracy.ci95[0])}, {pct(accuracy.ci95[1])}]"]


def test_the_readme_has_every_variants_mean_and_interval(analysis):
    rows = _variant_rows(_readme_results())
    assert set(rows) == set(analysis.variants), "README rows and the analysed variants differ"
    for variant, entry in analysis.variants.items():
        cells = " | ".join(rows[variant][2:])
        for text in _mean_and_interval(entry):
            assert text in cells, f"{variant}: README says {cells!r}, the analysis {text!r}"


def test_the_results_page_has_every_variants_numbers(analysis):
    rows = _variant_rows(RESULTS_PAGE.read_text())
    assert set(rows) == set(analysis.variants), "docs/results.md rows and the analysed variants differ"
    for variant, entry in analysis.variants.items():
        cells = " | ".join(rows[variant][2:])
        expected = [*_mean_and_interval(entry), " / ".join(pct(v) for v in entry.test_accuracy.values)]
        best = entry.best_epoch_test_accuracy_selected_on_test
        if best:
            expected.append(f"{pct(best.mean)} ± {pct(best.std)}")
        for text in expected:
            assert text in cells, f"{variant}: docs/results.md says {cells!r}, the analysis {text!r}"


@pytest.mark.parametrize("text", [_readme_results(), RESULTS_PAGE.read_text()],
                         ids=["README", "docs/results.md"])
def test_the_svc_row_is_the_committed_baseline(text):
    baseline = BaselineMetrics.read(REPO / paths.BASELINE_METRICS)
    svc = next(line for line in text.splitlines() if line.startswith("| SVC"))
    assert f"| {pct(baseline.test_accuracy)} " in svc


def test_each_claims_difference_and_interval_is_on_the_results_page(analysis):
    page = RESULTS_PAGE.read_text()
    for name, effect in {**analysis.comparisons, **analysis.factors}.items():
        text = _effect_text(effect)
        assert text in page, f"docs/results.md's claims table lacks {name}: {text}"


def test_every_difference_the_readme_quotes_is_one_of_the_analysis(analysis):
    known = {_effect_text(e) for e in {**analysis.comparisons, **analysis.factors}.values()}
    quoted = re.findall(r"[+-]\d+\.\d\d, \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\]", _readme_results())
    assert quoted, "the README's summary quotes no difference"
    for text in quoted:
        assert text in known, f"the README quotes {text}, which no comparison of the analysis gives"
