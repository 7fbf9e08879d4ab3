"""params.yaml as a file: read (YAML 1.2 numbers, as DVC reads them) and handed to
fmnist.config for validation (``load_params``), and its keys dotted (``flatten``).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from fmnist.config import Config, ConfigError, parse_params


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: ``1e-4`` and ``1E5`` are numbers, as
    DVC (ruamel.yaml, YAML 1.2) reads them; YAML 1.1 makes them strings."""


_FLOAT_TAG = "tag:yaml.org,2002:float"
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver(_FLOAT_TAG, re.compile(r"""^(?:
     [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def read_yaml(text: str) -> Any:
    """Parse YAML text as params.yaml is parsed (YAML 1.2 numbers)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 (a SafeLoader subclass)


def load_params(path: str | Path = "params.yaml") -> Config:
    """Read and validate params.yaml (the one place the pipeline reads its knobs)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: run from the repository root, where params.yaml lives")
    try:
        raw = read_yaml(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    return parse_params(raw)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dataclasses/dicts -> {"train.epochs": 50, ...}: params as ``dvc exp run -S``
    and MLflow's params name them."""
    if dataclasses.is_dataclass(value):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}{key}."))
        return flat
    if isinstance(value, tuple):
        value = list(value)
    return {prefix.rstrip("."): value}
