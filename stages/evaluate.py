"""DVC stage `evaluate@<variant>`: each seed's final model on the test set (see
fmnist.evaluation.evaluate_variant)."""

from fmnist import paths
from fmnist.cli import parse_variant_args, stage_main
from fmnist.data import load_prepared
from fmnist.evaluation import evaluate_variant
from fmnist.params import load_params


def main() -> None:
    args = parse_variant_args(__doc__)
    config = load_params(paths.PARAMS)
    config.variant(args.variant)
    data = load_prepared(paths.PREPARED_ARRAYS)
    for seed, metrics in evaluate_variant(config, args.variant, data.y_test).items():
        print(f"{paths.run_name(args.variant, seed)}: test accuracy {metrics.test_accuracy:.4f}, "
              f"macro F1 {metrics.test_macro_f1:.4f}")


if __name__ == "__main__":
    stage_main(main)
