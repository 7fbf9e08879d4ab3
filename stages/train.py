"""DVC stage `train@<variant>-<seed>`: train one variant under one seed (see fmnist.training)."""

from fmnist import device, paths
from fmnist.cli import parse_run_args, stage_main
from fmnist.config import load_params
from fmnist.data import data_info, load_prepared
from fmnist.progress import stage_label


def main() -> None:
    args = parse_run_args(__doc__)
    config = load_params(paths.PARAMS)
    config.variant(args.variant)  # an unknown name fails before the data is loaded
    print(stage_label("train", config.variants, config.train.seeds, args.variant, args.seed),
          flush=True)
    device.select_backend(config.train.backend)  # before Keras is first imported
    from fmnist.training import train_variant  # noqa: PLC0415 (imports Keras: after the backend)

    result = train_variant(config, args.variant, args.seed, load_prepared(paths.PREPARED_ARRAYS),
                           data_info(paths.PREPARED_INFO), paths.model_dir(args.variant, args.seed),
                           paths.checkpoint_dir(args.variant, args.seed))
    last = result.history[-1]
    print(f"{args.variant} seed {args.seed}: {len(result.history)} epochs in "
          f"{result.train_seconds:.0f} s on {result.device} ({result.backend}, {result.precision}); "
          "last epoch " + ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k != "epoch"))


if __name__ == "__main__":
    stage_main(main)
