"""DVC stage `register`: every trained model as a Model Registry version, the alias on the one
to use (see fmnist.registry)."""

from fmnist import paths, tracking
from fmnist.cli import debugging, stage_main
from fmnist.params import load_params
from fmnist.registry import champion_uri, register_models


def main() -> None:
    config = load_params(paths.PARAMS)
    with tracking.messages_off(shown=debugging()):  # the lines below say what was registered
        registered, alias = register_models(config)
    for run_name, entry in registered.items():
        print(f"{run_name}: {entry['model']} version {entry['version']}")
    print(alias)
    print(f"Use: {champion_uri(config)}")


if __name__ == "__main__":
    stage_main(main)
