"""DVC stage `baseline`: the paper's Table I SVC on scaled pixels (see fmnist.baseline)."""

from fmnist import cli, paths
from fmnist.baseline import run_baseline
from fmnist.data import load_prepared
from fmnist.params import load_params
from fmnist.records import DataInfo


def main() -> None:
    config = load_params(paths.PARAMS)
    metrics = run_baseline(config.baseline, load_prepared(paths.PREPARED_ARRAYS),
                           config.evaluate.class_names, config.tracking.experiment,
                           DataInfo.read(paths.PREPARED_INFO))
    metrics.write(paths.BASELINE_METRICS)
    print(f"SVC on {metrics.train_size} images: test accuracy {metrics.test_accuracy:.4f} "
          f"(fit {metrics.train_seconds} s, predict {metrics.predict_seconds} s)")


if __name__ == "__main__":
    cli.stage_main(main)
