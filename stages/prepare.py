"""DVC stage `prepare`: verify and split data/raw/ into data/prepared/, draw Fig. 1."""

from fmnist import paths, plots
from fmnist.cli import stage_main
from fmnist.params import load_params
from fmnist.prepare import prepare


def main() -> None:
    config = load_params(paths.PARAMS)
    data, info = prepare(paths.DATA_RAW, paths.PREPARED_ARRAYS, paths.PREPARED_INFO,
                         config.data.validation_size, config.data.validation_seed)
    plots.dataset_grid(data.x_train, data.y_train, config.evaluate.class_names,
                       paths.DATASET_FIGURE)
    print(f"data/prepared/: {info.sizes} (canonical split: {info.canonical_split})")
    if not info.canonical_split:
        print(f"NOTE: {info.note}")


if __name__ == "__main__":
    stage_main(main)
