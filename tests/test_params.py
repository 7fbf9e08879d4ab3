"""Reading params.yaml: the file, its YAML 1.2 numbers, and its keys dotted."""

from __future__ import annotations

import math

import pytest
import yaml

from fmnist.config import ConfigError
from fmnist.params import flatten, load_params, read_yaml
from tests.conftest import REPO


def test_exponents_are_numbers_as_dvc_reads_them():
    """PyYAML (YAML 1.1) reads 1e-4 as a string; DVC (YAML 1.2) as a number."""
    values = read_yaml("a: 1e-4\nb: 1E5\nc: 0.5\nd: -.inf\ne: '1e-4'\n")
    assert values["a"] == 1e-4 and values["b"] == 1e5 and values["c"] == 0.5
    assert values["d"] == -math.inf and values["e"] == "1e-4"


def test_invalid_yaml_and_missing_file_are_clear(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_flatten_gives_dotted_keys():
    config = load_params(REPO / "params.yaml")
    flat = flatten({"model": config.variant("cnn2"), "train": config.train})
    assert flat["model.filters"] == 32 and flat["train.epochs"] == config.train.epochs
    assert yaml.safe_load(yaml.safe_dump(flat))  # plain values only
