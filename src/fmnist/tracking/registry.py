"""The MLflow Model Registry: a run's logged model as a version of a registered model, with
the run's provenance as the version's tags; aliases, and reading versions back. (Which
version deserves the alias is fmnist.registry's decision; this module only writes it.)
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from fmnist.tracking.provenance import PROVENANCE_TAGS
from fmnist.tracking.runs import run_tags
from fmnist.tracking.store import guarded, not_found


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while a write of several steps runs (a version with its tags and
    description; an alias moved from one model to another), then act on them as they would
    have: a Ctrl-C or a SIGTERM (``stage_main``: exit 130) never leaves the registry half-written,
    e.g. with no model holding the alias. Each write takes a second or less."""
    if threading.current_thread() is not threading.main_thread():  # only it handles signals
        yield
        return
    received: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.getsignal(signum) for signum in held}
    for signum in held:
        signal.signal(signum, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            signal.raise_signal(received[0])  # its own handler acts now


@guarded("registering a model version")
def register_version(model_name: str, run_id: str, logged_name: str, tags: dict[str, str],
                     description: str) -> str:
    """The version of registered model ``model_name`` that holds run ``run_id``'s logged model
    ``logged_name``: the existing one when that run is registered already (re-running adds no
    duplicate), else a new one; ``tags`` and the run's PROVENANCE_TAGS are set on it either
    way. Returns the version."""
    client = MlflowClient()
    logged = run_tags(run_id)
    tags = {**tags, **{key: logged.get(key, "unknown") for key in PROVENANCE_TAGS}}
    with _uninterrupted():
        found = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
        if found:
            version = str(min(int(v.version) for v in found))
        else:
            version = mlflow.register_model(f"runs:/{run_id}/{logged_name}", model_name, tags=tags).version
        client.update_registered_model(model_name, description=description)
        for key, value in tags.items():
            client.set_model_version_tag(model_name, version, key, value)
    return str(version)


@guarded("setting a registry alias")
def set_alias(model_name: str, version: str, alias: str, prefix: str) -> None:
    """Point ``alias`` at ``version`` of ``model_name``, and remove it from the other registered
    models named ``prefix``... (the alias marks one model a user should take, not one per
    variant)."""
    client = MlflowClient()
    with _uninterrupted():
        for other in client.search_registered_models(filter_string=f"name LIKE '{prefix}%'"):
            if other.name != model_name and alias in (other.aliases or {}):
                client.delete_registered_model_alias(other.name, alias)
        client.set_registered_model_alias(model_name, alias, version)


def _version_entry(version: Any) -> dict[str, Any]:
    return {"model": version.name, "version": str(version.version), "run_id": version.run_id,
            "tags": dict(version.tags or {})}


@guarded("reading a model version")
def model_version(model_name: str, version: str) -> dict[str, Any] | None:
    """{"model", "version", "run_id", "tags"} of a registered version; None where there is none."""
    try:
        return _version_entry(MlflowClient().get_model_version(model_name, version))
    except mlflow.exceptions.MlflowException as error:
        if not_found(error):
            return None
        raise


@guarded("looking up a model version")
def version_of_run(model_name: str, run_id: str) -> dict[str, Any] | None:
    """The (first) version of ``model_name`` that holds run ``run_id``'s model, or None."""
    found = MlflowClient().search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    return _version_entry(min(found, key=lambda v: int(v.version))) if found else None


@guarded("reading a registry alias")
def alias_version(alias: str, prefix: str) -> dict[str, Any] | None:
    """The version ``alias`` points at among the registered models named ``prefix``...
    (``model_version``'s fields), or None where no model carries it."""
    client = MlflowClient()
    for model in client.search_registered_models(filter_string=f"name LIKE '{prefix}%'"):
        if alias in (model.aliases or {}):
            return _version_entry(client.get_model_version_by_alias(model.name, alias))
    return None


@guarded("tagging a model version")
def tag_version(model_name: str, version: str, tags: dict[str, str]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)


@contextlib.contextmanager
def messages_off(shown: bool = False) -> Iterator[None]:
    """Within: MLflow's event messages ("Successfully registered model ...", "Created version 1
    of model ...") are not printed (unless ``shown``), where the caller prints its own line for
    the same step; MLflow's errors still raise."""
    from mlflow.utils.logging_utils import MLFLOW_LOGGING_STREAM

    enabled = MLFLOW_LOGGING_STREAM.enabled
    MLFLOW_LOGGING_STREAM.enabled = enabled and shown
    try:
        yield
    finally:
        MLFLOW_LOGGING_STREAM.enabled = enabled
