"""DVC stage `evaluate@<variant>-<seed>`: the final model on the test set (see fmnist.evaluation)."""

from fmnist import paths
from fmnist.cli import parse_run_args, stage_main
from fmnist.config import load_params
from fmnist.data import load_prepared
from fmnist.evaluation import evaluate_model
from fmnist.progress import stage_label


def main() -> None:
    args = parse_run_args(__doc__)
    config = load_params(paths.PARAMS)
    config.variant(args.variant)
    print(stage_label("evaluate", config.variants, config.train.seeds, args.variant, args.seed),
          flush=True)
    data = load_prepared(paths.PREPARED_ARRAYS)
    # the paper shows one model per variant: the feature maps of the first seed's
    first_seed = args.seed == config.train.seeds[0]
    metrics = evaluate_model(args.variant, args.seed, data.x_test, data.y_test,
                             config.evaluate.class_names,
                             config.analyse.feature_map_classes if first_seed else ())
    print(f"{paths.run_name(args.variant, args.seed)}: test accuracy {metrics['test_accuracy']:.4f}, "
          f"macro F1 {metrics['test_macro_f1']:.4f}")


if __name__ == "__main__":
    stage_main(main)
