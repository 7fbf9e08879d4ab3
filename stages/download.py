"""DVC stage `download`: Fashion-MNIST into data/raw/ (see fmnist.download)."""

from fmnist import paths
from fmnist.cli import stage_main
from fmnist.download import download
from fmnist.params import load_params


def main() -> None:
    config = load_params(paths.PARAMS)
    info = download(config.data, paths.DATA_RAW)
    print(f"data/raw/ from {info.origin} (canonical split: {info.canonical_split})")


if __name__ == "__main__":
    stage_main(main)
