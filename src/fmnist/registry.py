"""The MLflow Model Registry: every trained variant x seed as a version, and the alias
(``registry.alias``, ``champion``) on the one a user should take.

Registered model ``<registry.model_prefix>-<variant>`` (``fashion-mnist-cnn2_bn_skip``), one
version per trained model (its MLflow run), tagged with what a user needs to trust it and to
tell it from the others: the seed, the data source, whether the split is the canonical one,
and where it came from (tracking.PROVENANCE_TAGS: the commit, the DVC experiment, the params
that differ from the committed params.yaml, whether the pipeline's files were committed).
Re-running finds the versions already registered by their run id and adds none.

The alias moves only on purpose, and only to a version that passes the gate (below):
- the register stage of the committed pipeline (not `dvc exp run`, and params.yaml, dvc.yaml,
  src/ and stages/ committed) points it at the model params.yaml names (``champion_variant``,
  ``champion_seed``), unless it was promoted by hand since params.yaml last changed that choice;
  an experiment registers its versions and leaves the alias where it was;
- ``python -m fmnist.registry promote <variant> [--seed N | --version V]`` moves it by hand.
The gate: the version's final-epoch validation accuracy, or its final-epoch training accuracy
where the run held out no validation split (data.validation_size: 0), must reach
``registry.min_accuracy``. Never a test-set number: choosing by the test set would flatter it.
"""

from __future__ import annotations

import argparse
import os

from fmnist import paths, tracking
from fmnist.config import Config
from fmnist.params import load_params

DESCRIPTION = ("A Fashion-MNIST classifier ({variant}; one version per training seed). Input: uint8 "
               "pixels 0-255, shape (n, 28, 28), white item on a black background, as the data set; "
               "output: (n, 10) class probabilities in the order of the model's metadata "
               "`class_names`.")
# Per-epoch series the gate reads, the first one a run logged (tracking.log_epoch's names).
GATE_METRICS = ("val_accuracy", "accuracy")
GATE_LABELS = {"val_accuracy": "final-epoch validation accuracy",
               "accuracy": "final-epoch training accuracy (no validation split)"}
# Set on a version promoted by hand: params.yaml's choice (run name) at that moment. While
# params.yaml names the same model, the register stage leaves the hand-promoted one in place.
PROMOTED_OVER_TAG = "promoted_over_params_choice"


class PromotionError(RuntimeError):
    """The alias cannot be moved to that version (the gate, an unknown version, an experiment)."""


def champion_uri(config: Config) -> str:
    """models:/<name>@<alias>: what `fmnist-predict --model` and `mlflow models serve -m` take.
    The registered model that carries the alias in the store (a promotion by hand may have put
    it on another variant than params.yaml's), else params.yaml's champion_variant."""
    registry = config.registry
    tracking.use_store()
    holder = tracking.alias_version(registry.alias, f"{registry.model_prefix}-")
    name = holder["model"] if holder else registry.model_name(registry.champion_variant)
    return f"models:/{name}@{registry.alias}"


def describe(entry: dict | None) -> str:
    if entry is None:
        return "nothing"
    return f"{entry['model']} version {entry['version']}"


def check_gate(config: Config, entry: dict) -> str:
    """Raise PromotionError unless ``entry``'s run passes the gate; return what it reached."""
    found = tracking.final_epoch_metric(entry["run_id"], GATE_METRICS)
    if found is None:
        raise PromotionError(f"{describe(entry)}: its run logged none of {', '.join(GATE_METRICS)} per "
                             "epoch, so the gate cannot judge it")
    key, value = found
    minimum = config.registry.min_accuracy
    if value < minimum:
        raise PromotionError(f"{describe(entry)} fails the gate: {GATE_LABELS[key]} {value:.4f} < "
                             f"registry.min_accuracy {minimum}")
    return f"{GATE_LABELS[key]} {value:.4f} >= registry.min_accuracy {minimum}"


def move_alias(config: Config, entry: dict, promoted_over: str = "") -> str:
    """Point the alias at ``entry`` if it passes the gate; return "@<alias>: <from> -> <to> (...)".
    PromotionError, and nothing moved, when it does not. ``promoted_over``: params.yaml's
    choice that a move by hand overrides ("" for the pipeline's own move)."""
    registry = config.registry
    current = tracking.alias_version(registry.alias, f"{registry.model_prefix}-")
    passed = check_gate(config, entry)
    tracking.tag_version(entry["model"], entry["version"], {PROMOTED_OVER_TAG: promoted_over})
    tracking.set_alias(entry["model"], entry["version"], registry.alias, f"{registry.model_prefix}-")
    return f"@{registry.alias}: {describe(current)} -> {describe(entry)} ({passed})"


def register_models(config: Config) -> tuple[dict[str, dict[str, str]], str]:
    """Register every variant x seed of ``config`` (their run ids from models/<variant>/seed<k>/)
    and move the alias where the committed pipeline asks it to (see the module's docstring).

    Returns ({run name: {"model": registered name, "version": version}}, a line saying where
    the alias is and why). PromotionError when params.yaml's champion fails the gate, or when it
    would move the alias from a workspace whose pipeline files are not committed.
    """
    tracking.use_store()
    registry = config.registry
    registered = {}
    for variant in config.variants:
        for seed in config.train.seeds:
            files = paths.run_files(variant, seed)
            run_info = files.read_run_info()
            run_id = run_info.mlflow_run_id
            tags = {"variant": variant, "seed": str(seed), "data_source": run_info.data_source,
                    "canonical_split": str(run_info.canonical_split),
                    "keras_backend": run_info.keras_backend, "precision": run_info.precision}
            name = registry.model_name(variant)
            version = tracking.register_version(name, run_id, paths.run_name(variant, seed), tags,
                                                DESCRIPTION.format(variant=variant))
            registered[paths.run_name(variant, seed)] = {"model": name, "version": version}
    choice = paths.run_name(registry.champion_variant, registry.champion_seed)
    wanted = tracking.model_version(registered[choice]["model"], registered[choice]["version"])
    current = tracking.alias_version(registry.alias, f"{registry.model_prefix}-")
    if current is not None and (current["model"], current["version"]) == (wanted["model"], wanted["version"]):
        return registered, f"@{registry.alias} stays at {describe(current)} (params.yaml's {choice})"
    experiment = os.environ.get("DVC_EXP_NAME", "")
    if experiment:
        return registered, (f"@{registry.alias} stays at {describe(current)}: experiment {experiment} "
                            f"registers its versions but moves no alias (to use {describe(wanted)}: "
                            f"python -m fmnist.registry promote {registry.champion_variant} "
                            f"--version {wanted['version']})")
    if current is not None and current["tags"].get(PROMOTED_OVER_TAG) == choice:
        return registered, (f"@{registry.alias} stays at {describe(current)}, promoted by hand over "
                            f"params.yaml's {choice} (change registry.champion_* to move it)")
    if tracking.workspace_committed() == "false":
        raise PromotionError(
            f"@{registry.alias} would move from {describe(current)} to {describe(wanted)} "
            f"(params.yaml's {choice}), but params.yaml, dvc.yaml, src/ or stages/ have uncommitted "
            "changes: commit them and run `dvc repro` again (or promote it by hand: python -m "
            f"fmnist.registry promote {registry.champion_variant} --version {wanted['version']})")
    return registered, move_alias(config, wanted)


def promote(config: Config, variant: str, seed: int | None = None, version: str | None = None) -> str:
    """Move the alias by hand to a version of ``variant``: ``version``, or else the one of the
    model trained in this workspace for ``seed`` (default ``registry.champion_seed``); the gate
    applies. Returns the line saying what moved from and to."""
    config.variant(variant)  # an unknown name: ConfigError listing the variants
    tracking.use_store()
    registry = config.registry
    name = registry.model_name(variant)
    if version is None:
        seed = registry.champion_seed if seed is None else seed
        files = paths.run_files(variant, seed)
        run_info = files.read_run_info("written by the train stage; or name a registered --version")
        entry = tracking.version_of_run(name, run_info.mlflow_run_id)
        if entry is None:
            raise PromotionError(f"the model in models/{variant}/seed{seed} is not registered as a version "
                                 f"of {name}: run `dvc repro` (its register stage) first")
    else:
        entry = tracking.model_version(name, version)
        if entry is None:
            raise PromotionError(f"{name} has no version {version}")
    choice = paths.run_name(registry.champion_variant, registry.champion_seed)
    return move_alias(config, entry, promoted_over=choice)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fmnist.registry", description=(
        "Move the registry's alias (params.yaml registry.alias) by hand, through the quality gate "
        "(registry.min_accuracy)."))
    commands = parser.add_subparsers(dest="command", required=True)
    promote_parser = commands.add_parser("promote", help="point the alias at a version of a variant")
    promote_parser.add_argument("variant", help="a key of `variants` in params.yaml")
    which = promote_parser.add_mutually_exclusive_group()
    which.add_argument("--seed", type=int, help="the model trained in this workspace for this seed "
                       "(default: registry.champion_seed)")
    which.add_argument("--version", help="a registered version (e.g. one an experiment registered)")
    args = parser.parse_args(argv)
    config = load_params(paths.PARAMS)
    print(promote(config, args.variant, seed=args.seed, version=args.version))


if __name__ == "__main__":
    # through the imported module, whose PromotionError fmnist.cli knows (not this __main__'s)
    from fmnist import registry
    from fmnist.cli import stage_main

    stage_main(registry.main)
