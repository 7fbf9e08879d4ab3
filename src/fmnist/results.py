"""The terminal's view of a finished pipeline, from metrics/summary.json: the table `make run`
ends with, and metrics/accuracy.json, the one-number-per-variant file that keeps
`dvc exp show` narrow.

    python -m fmnist.results   # the table: variant, mean ± std test accuracy, the paper's
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from fmnist import paths
from fmnist.files import read_json, write_json

BASELINE = "svc"  # the SVC baseline's row and key


def accuracy_by_variant(summary: dict[str, Any]) -> dict[str, float]:
    """metrics/accuracy.json: each variant's mean test accuracy over seeds (%, 2 decimals)
    and the SVC's, keyed by the names the user gave them, so that `dvc exp show` has one
    short column per variant."""
    accuracy = {variant: round(100 * entry["test_accuracy_mean"], 2)
                for variant, entry in summary["variants"].items()}
    if "test_accuracy" in summary["baseline"]:
        accuracy[BASELINE] = round(100 * summary["baseline"]["test_accuracy"], 2)
    return accuracy


def write_accuracy(summary_file: Path, accuracy_file: Path) -> dict[str, float]:
    accuracy = accuracy_by_variant(read_json(summary_file, "written by the analyse stage"))
    write_json(accuracy_file, accuracy)
    return accuracy


def pct(value: float | None) -> str:
    """A 0-1 fraction as a percentage with two decimals; "-" for none."""
    return "-" if value is None else f"{100 * value:.2f}"


def table(summary: dict[str, Any]) -> str:
    """Variant, seeds, mean ± std test accuracy (%) of the final models, the paper's number."""
    rows = [("Variant", "Seeds", "Test accuracy (%)", "Paper (%)")]
    for variant, entry in summary["variants"].items():
        spread = pct(entry["test_accuracy_mean"])
        if entry["test_accuracy_std"] is not None:
            spread += f" ± {100 * entry['test_accuracy_std']:.2f}"
        rows.append((variant, str(entry["seeds"]), spread, pct(entry.get("paper_test_accuracy"))))
    baseline = summary["baseline"]
    if "test_accuracy" in baseline:
        rows.append((f"{BASELINE} (baseline, {baseline.get('train_size', '?')} images)", "-",
                     pct(baseline["test_accuracy"]), pct(baseline.get("paper_test_accuracy"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                       for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    if not summary.get("canonical_split", True):
        lines.append("NOTE: not the canonical train/test split (see reports/report.md): the paper's "
                     "numbers are not directly comparable.")
    return "\n".join(lines)


def main() -> None:
    path = paths.SUMMARY
    if not path.is_file():
        sys.exit(f"ERROR: {path} not found; run `dvc repro` (or `make run`) first")
    print(table(read_json(path, "written by the analyse stage")))
    print(f"Full report: {paths.REPORT}; every run: `make mlflow-ui`")


if __name__ == "__main__":
    main()
