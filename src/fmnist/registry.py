"""The register stage: every trained variant x seed as a version in the MLflow Model Registry.

Registered model ``<registry.model_prefix>-<variant>`` (``fashion-mnist-cnn2_bn_skip``), one
version per trained model (its MLflow run), tagged with what a user needs to trust it: the
seed, the data source, whether the split is the canonical one, the git commit it was trained
at. ``registry.alias`` (``champion``) marks the version a user should take: the one the
params name (the paper's best model by default), never one picked by its test accuracy.
Re-running finds the versions already registered by their run id and adds none.
"""

from __future__ import annotations

from fmnist import paths, tracking
from fmnist.config import Config
from fmnist.files import read_json

DESCRIPTION = ("A Fashion-MNIST classifier ({variant}; one version per training seed). Input: uint8 "
               "pixels 0-255, shape (n, 28, 28), white item on a black background, as the data set; "
               "output: (n, 10) class probabilities in the order of the model's metadata "
               "`class_names`.")


def champion_uri(config: Config) -> str:
    """models:/<name>@<alias>: what `fmnist-predict --model` and `mlflow models serve -m` take."""
    registry = config.registry
    return f"models:/{registry.model_name(registry.champion_variant)}@{registry.alias}"


def register_models(config: Config) -> dict[str, dict[str, str]]:
    """Register every variant x seed of ``config`` (their run ids from models/<variant>/seed<k>/),
    set the alias; return {run name: {"model": registered name, "version": version}}."""
    tracking.use_store()
    registry = config.registry
    registered = {}
    for variant in config.variants:
        for seed in config.train.seeds:
            run_info = read_json(paths.run_files(variant, seed).run_info, "written by the train stage")
            run_id = run_info["mlflow_run_id"]
            tags = {"variant": variant, "seed": str(seed), "data_source": str(run_info["data_source"]),
                    "canonical_split": str(run_info["canonical_split"]),
                    "keras_backend": str(run_info["keras_backend"]), "precision": str(run_info["precision"])}
            name = registry.model_name(variant)
            version = tracking.register_version(name, run_id, paths.run_name(variant, seed), tags,
                                                DESCRIPTION.format(variant=variant))
            registered[paths.run_name(variant, seed)] = {"model": name, "version": version}
    champion = registered[paths.run_name(registry.champion_variant, registry.champion_seed)]
    tracking.set_alias(champion["model"], champion["version"], registry.alias, f"{registry.model_prefix}-")
    return registered
