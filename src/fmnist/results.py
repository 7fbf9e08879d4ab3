"""The terminal's view of a finished pipeline, from metrics/summary.json: the table `make run`
ends with, and metrics/accuracy.json, the one-number-per-variant file that keeps
`dvc exp show` narrow.

    python -m fmnist.results   # the table: variant, mean ± std test accuracy, the paper's
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fmnist import paths
from fmnist.records import Accuracy, BaselineMetrics, Summary

BASELINE = "svc"  # the SVC baseline's row and key
# The SVC of a fresh clone: its stage is up to date by the committed dvc.lock, so `dvc repro`
# never fits it and its numbers are the committed reference run's (metrics/baseline.json).
# The analyse stage logs them to MLflow as a run tagged so; the table marks the row.
SOURCE_TAG = "source"
COMMITTED_REFERENCE = "committed reference"
# a fit's accuracy and its time: one fit's (BaselineMetrics' fields, MLflow's result names)
_SAME_RUN = ("test_accuracy", "train_seconds")


def baseline_runs(experiment: str, baseline: BaselineMetrics) -> dict[str, bool]:
    """Which runs of the SVC with ``baseline``'s results (metrics/baseline.json) the MLflow
    store holds: {"fitted": one the baseline stage logged, "reference": one logged from the
    committed file}."""
    from fmnist import tracking

    same = [run for run in tracking.finished_runs(experiment, {"kind": "baseline"})
            if all(abs(run["metrics"].get(key, float("nan")) - getattr(baseline, key)) < 1e-9
                   for key in _SAME_RUN)]
    reference = [run["tags"].get(SOURCE_TAG) == COMMITTED_REFERENCE for run in same]
    return {"fitted": not all(reference), "reference": any(reference)}


def accuracy_by_variant(summary: Summary) -> Accuracy:
    """metrics/accuracy.json: each variant's mean test accuracy over seeds (%, 2 decimals)
    and the SVC's, keyed by the names the user gave them, so that `dvc exp show` has one
    short column per variant."""
    percent = {variant: round(100 * entry.test_accuracy_mean, 2)
               for variant, entry in summary.variants.items()}
    return Accuracy({**percent, BASELINE: round(100 * summary.baseline.test_accuracy, 2)})


def write_accuracy(summary_file: Path, accuracy_file: Path) -> Accuracy:
    accuracy = accuracy_by_variant(Summary.read(summary_file))
    accuracy.write(accuracy_file)
    return accuracy


def pct(value: float | None) -> str:
    """A 0-1 fraction as a percentage with two decimals; "-" for none."""
    return "-" if value is None else f"{100 * value:.2f}"


def table(summary: Summary, baseline_source: str = "") -> str:
    """Variant, seeds, mean ± std test accuracy (%) of the final models, the paper's number;
    ``baseline_source`` (e.g. COMMITTED_REFERENCE) is added to the SVC's row."""
    rows = [("Variant", "Seeds", "Test accuracy (%)", "Paper (%)")]
    for variant, entry in summary.variants.items():
        spread = pct(entry.test_accuracy_mean)
        if entry.test_accuracy_std is not None:
            spread += f" ± {100 * entry.test_accuracy_std:.2f}"
        rows.append((variant, str(entry.seeds), spread, pct(entry.paper_test_accuracy)))
    baseline = summary.baseline
    source = f"; {baseline_source}" if baseline_source else ""
    rows.append((f"{BASELINE} (baseline, {baseline.train_size} images{source})", "-",
                 pct(baseline.test_accuracy), pct(baseline.paper_test_accuracy)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                       for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    if not summary.canonical_split:
        lines.append("NOTE: not the canonical train/test split (see reports/report.md): the paper's "
                     "numbers are not directly comparable.")
    return "\n".join(lines)


def main() -> None:
    path = paths.SUMMARY
    if not path.is_file():
        sys.exit(f"ERROR: {path} not found; run `dvc repro` (or `make run`) first")
    print(table(Summary.read(path), _baseline_source()))
    print(f"Full report: {paths.REPORT}; every run: `make mlflow-ui`")


def _baseline_source() -> str:
    """COMMITTED_REFERENCE where this project's MLflow store holds no fit of the SVC with the
    results of metrics/baseline.json (a fresh clone's `make run` does not fit it), else ""."""
    from fmnist import tracking
    from fmnist.params import load_params

    if not paths.BASELINE_METRICS.is_file() or not (
            os.environ.get("MLFLOW_TRACKING_URI") or (paths.project_root() / paths.MLFLOW_DB).is_file()):
        return ""
    try:
        tracking.use_store(create=False)
        runs = baseline_runs(load_params(paths.PARAMS).tracking.experiment,
                             BaselineMetrics.read(paths.BASELINE_METRICS))
    except (tracking.TrackingError, ValueError) as error:  # the table matters more than the mark
        print(f"(could not read the MLflow store: {error})")
        return ""
    return "" if runs["fitted"] else f"{COMMITTED_REFERENCE}, not fitted here"


if __name__ == "__main__":
    main()
