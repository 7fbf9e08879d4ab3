"""DVC stage `train@<variant>`: train one variant under every seed of train.seeds in this
process, together in one loop under JAX, one after the other under TensorFlow (see
fmnist.training.train_seeds)."""

import json

from fmnist import device, paths
from fmnist.cli import parse_variant_args, stage_main
from fmnist.data import load_prepared
from fmnist.files import tree_digest
from fmnist.params import load_params
from fmnist.records import DataInfo


def main() -> None:
    args = parse_variant_args(__doc__)
    config = load_params(paths.PARAMS)
    config.variant(args.variant)  # an unknown name fails before the data is loaded
    device.select_backend(config.train.backend)  # before Keras is first imported
    from fmnist.training import train_seeds  # noqa: PLC0415 (imports Keras: after the backend)

    data = load_prepared(paths.PREPARED_ARRAYS)
    # what DVC re-runs this stage for, params aside (each seed's settings are compared apart)
    inputs = tree_digest([dep for dep in paths.stage_deps("train") if dep != paths.PARAMS_CHECKED])
    for result in train_seeds(config, args.variant, data, DataInfo.read(paths.PREPARED_INFO), inputs):
        last = result.history[-1]
        print(f"{result.name}: {len(result.history)} epochs in {result.train_seconds:.0f} s on "
              f"{result.device} ({result.backend}, {result.precision}); last epoch "
              + ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k != "epoch"))
        # for benchmarks/stage_cost.py: the stage's time less the loops is its fixed cost
        print("[timing] " + json.dumps({"run": result.name, "loop": round(result.train_seconds, 2)}))


if __name__ == "__main__":
    stage_main(main)
