"""DVC stage `analyse`: every table and figure of the paper, summary and report (see fmnist.analyse)."""

from fmnist import paths
from fmnist.analyse import analyse
from fmnist.cli import stage_main
from fmnist.data import load_prepared
from fmnist.params import load_params
from fmnist.records import BaselineMetrics, DataInfo
from fmnist.results import write_accuracy


def main() -> None:
    config = load_params(paths.PARAMS)
    for note in config.notes:  # analyse entries that name a removed variant
        print(f"NOTE: params.yaml {note}")
    summary = analyse(config, load_prepared(paths.PREPARED_ARRAYS), DataInfo.read(paths.PREPARED_INFO),
                      BaselineMetrics.read(paths.BASELINE_METRICS),
                      paths.ANALYSIS, paths.REPORT, paths.SUMMARY)
    write_accuracy(paths.SUMMARY, paths.ACCURACY)
    for variant, entry in summary.variants.items():
        print(f"{variant}: test accuracy {100 * entry.test_accuracy.mean:.2f}% over "
              f"{entry.test_accuracy.n} seed(s)")
    print(f"Report: {paths.REPORT}")


if __name__ == "__main__":
    stage_main(main)
