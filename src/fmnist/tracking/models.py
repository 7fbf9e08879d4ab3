"""A trained Keras model in MLflow: logged with its signature and metadata, loaded back (as
Keras, or as a pyfunc that predicts class probabilities), served by MLflow's scoring server,
and traced from its URI to the registered version and run that made it (ModelOrigin).
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Callable
from typing import Any

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from fmnist.data import IMAGE_SIZE
from fmnist.tracking.runs import run_is_usable
from fmnist.tracking.store import TrackingError, guarded, not_found


# MLflow 3.17.2's Keras flavour writes the input example into the model folder before it
# creates that folder, so ``mlflow.keras.log_model(..., input_example=...)`` raises
# FileNotFoundError (mlflow issue #16183; its fix, PR #16300, was closed unmerged).
# ``Model.log`` takes any flavour module with a ``save_model``: this one is mlflow.keras with
# the folder made first, so the example lands inside the logged model, as MLflow means it.
# Model.log also passes its own options to ``save_model`` (validate_serving_input); they are
# not mlflow.keras's.
def _save_keras_model(path: str, validate_serving_input: bool = True, **kwargs: Any) -> None:
    os.makedirs(path, exist_ok=True)
    mlflow.keras.save_model(path=path, **kwargs)


# Model.log records the flavour under the module's __name__
_KERAS_FLAVOR = types.SimpleNamespace(__name__="mlflow.keras", save_model=_save_keras_model)


def model_signature(class_names: list[str] | tuple[str, ...]) -> Any:
    """(n, 28, 28) uint8 pixels in, (n, classes) float32 probabilities out.

    uint8, not float: pyfunc refuses other dtypes, so pixels scaled to [0, 1] cannot pass
    for pixels (the model scales 0-255 itself, fmnist.models)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, IMAGE_SIZE, IMAGE_SIZE))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(class_names)), "probabilities")]))


def model_metadata(class_names: list[str] | tuple[str, ...]) -> dict[str, Any]:
    return {"class_names": list(class_names),
            "input": "uint8 pixels 0-255, shape (n, 28, 28), white item on a black background "
                     "(as Fashion-MNIST)",
            "output": "probabilities, shape (n, classes), column i is class_names[i]"}


@guarded("logging the model")
def log_keras_model(model: Any, name: str, example: np.ndarray, class_names: list[str] | tuple[str, ...],
                    pip_requirements: list[str]) -> str:
    """Log the model through MLflow's Keras flavour as ``name`` (the run's name); return its URI.

    The logged model holds its signature (``model_signature``), the class names and the
    input contract in its metadata, ``example`` as its input example and the given pip
    requirements (MLflow would otherwise infer them in a subprocess). MLflow's check that the
    example is served (loading the model back and predicting; 0.27 s a model on a 2-core CPU)
    is skipped: it only logs a warning where it fails, and tests/test_use.py serves a logged
    model through MLflow's scoring server.
    """
    example = np.asarray(example)
    if example.dtype != np.uint8 or example.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"input example must be (n, {IMAGE_SIZE}, {IMAGE_SIZE}) uint8 pixels, got "
                         f"{example.shape} {example.dtype}")
    info = mlflow.models.Model.log(
        artifact_path=None, name=name, flavor=_KERAS_FLAVOR, model=model,
        signature=model_signature(class_names), input_example=example,
        metadata=model_metadata(class_names), pip_requirements=pip_requirements,
        validate_serving_input=False)
    return info.model_uri


@guarded("loading the model")
def load_pyfunc(uri: str) -> tuple[Callable[[np.ndarray], np.ndarray], list[str]]:
    """A logged or registered model (models:/<name>@<alias>, runs:/..., a local MLflow model
    folder) as (predict function, class names from its metadata)."""
    model = mlflow.pyfunc.load_model(uri)
    names = (model.metadata.metadata or {}).get("class_names")
    if not names:
        raise TrackingError(f"the model {uri} names no classes in its metadata (logged before they "
                            "were recorded); train it again")
    return (lambda pixels: np.asarray(model.predict(pixels))), list(names)


@dataclasses.dataclass(frozen=True)
class ModelOrigin:
    """Which model a URI names: its registry entry and the run (and DVC experiment) that
    trained it; empty strings where the URI or the store does not say."""

    uri: str
    name: str = ""
    version: str = ""
    run_id: str = ""
    run_name: str = ""
    dvc_experiment: str = ""
    dvc_stage: str = ""
    git_commit: str = ""

    def describe(self) -> str:
        """One line, e.g. ``fashion-mnist-cnn2 version 1 (models:/fashion-mnist-cnn2@champion),
        trained by MLflow run cnn2-seed0 @ workspace-1a2b3c4 (<id>) in the workspace (no DVC
        experiment), stage train@cnn2, git commit 1a2b3c4``."""
        text = f"{self.name} version {self.version} ({self.uri})" if self.name else self.uri
        if self.run_id:
            text += f", trained by MLflow run {self.run_name or '?'} ({self.run_id})"
            text += (f" in DVC experiment {self.dvc_experiment}" if self.dvc_experiment
                     else " in the workspace (no DVC experiment)")
            if self.dvc_stage:
                text += f", stage {self.dvc_stage}"
            if self.git_commit:
                text += f", git commit {self.git_commit[:7]}"
        return text


def _registered_version(client: MlflowClient, uri: str) -> Any:
    """The model version ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` names;
    a name, alias or version the registry lacks is a TrackingError listing what it has.
    None for the other forms (``models:/<name>/<stage>``, ``models:/m-<id>``)."""
    path = uri.removeprefix("models:/")
    name, alias = path.split("@", 1) if "@" in path else (path.rsplit("/", 1)[0], None)
    version = None if alias is not None or "/" not in path else path.rsplit("/", 1)[1]
    if alias is None and not (version or "").isdigit():
        return None
    try:
        registered = client.get_registered_model(name)
    except mlflow.exceptions.MlflowException as error:
        if not not_found(error):
            raise
        names = sorted(m.name for m in client.search_registered_models())
        raise TrackingError(f"no registered model {name!r} in {mlflow.get_tracking_uri()} (it holds "
                            f"{', '.join(names) if names else 'none'}); the register stage "
                            "registers the trained models (`dvc repro`)") from error
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException as error:
        if not not_found(error):
            raise
        if alias is not None:
            have = f"its aliases: {', '.join(sorted(registered.aliases)) or 'none'}"
            what = f"alias {alias!r}"
        else:
            versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
            have = f"its versions: {', '.join(map(str, versions)) or 'none'}"
            what = f"version {version}"
        raise TrackingError(f"registered model {name!r} in {mlflow.get_tracking_uri()} has no {what} "
                            f"({have})") from error


@guarded("looking up the model")
def model_origin(uri: str) -> ModelOrigin:
    """Which registered model version and run ``uri`` (``models:/...``, ``runs:/<id>/...``)
    names, read from the store (``use_store`` first); a model the store lacks is a
    TrackingError naming what it holds. Other URIs and local folders: the URI alone."""
    client = MlflowClient()
    name = version = run_id = ""
    if uri.startswith("models:/"):
        found = _registered_version(client, uri)
        if found is not None:
            name, version, run_id = found.name, str(found.version), found.run_id or ""
    elif uri.startswith("runs:/"):
        run_id = uri.removeprefix("runs:/").split("/")[0]
    if not run_id or not run_is_usable(run_id):
        return ModelOrigin(uri, name, version)
    trained = client.get_run(run_id)
    tags = trained.data.tags
    return ModelOrigin(uri, name, version, run_id, trained.info.run_name or "",
                       tags.get("dvc_exp_name", ""), tags.get("dvc_stage", ""), tags.get("git_commit", ""))


@guarded("loading the model")
def scoring_app(uri: str) -> Any:
    """MLflow's scoring server (the ASGI app of ``mlflow models serve``: /ping, /invocations)
    for the model ``uri``, loaded in this process."""
    from mlflow.pyfunc import scoring_server

    return scoring_server.init(mlflow.pyfunc.load_model(uri))


def load_logged_model(run_id: str, name: str) -> Any:
    """The Keras model logged as ``name`` in run ``run_id``."""
    return mlflow.keras.load_model(f"runs:/{run_id}/{name}")

