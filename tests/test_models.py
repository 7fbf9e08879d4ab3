"""The variant builder: every spec in params.yaml, pinned sizes, bad specs named."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fmnist.config import ConfigError, load_params
from fmnist.models import build_model, feature_layer_names
from tests.conftest import REPO

# CNN2 matches the authors' public code (113,386); BN adds 2 x (4 + 64) BN weights;
# the skip variant needs padding 'same', so its dense layer sees 7x7x32 instead of 5x5x32.
PAPER_PARAMETERS = {"cnn2": 113_386, "cnn2_bn": 113_518, "cnn2_bn_skip": 211_822}


@pytest.fixture(scope="module")
def config():
    return load_params(REPO / "params.yaml")


@pytest.mark.parametrize("variant", list(PAPER_PARAMETERS))
def test_every_variant_maps_images_to_class_probabilities(config, variant):
    model = build_model(config.variant(variant), variant)
    probabilities = np.asarray(model.predict(np.zeros((3, 28, 28, 1), "float32"), verbose=0))
    assert probabilities.shape == (3, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert model.count_params() == PAPER_PARAMETERS[variant]
    assert feature_layer_names(model) == ["block1_relu", "block2_relu"]


def test_skip_blocks_add_the_input_and_can_project_it(config):
    spec = config.variant("cnn2_bn_skip")
    model = build_model(spec, "skip")
    assert [layer.name for layer in model.layers if "skip" in layer.name] == ["block1_skip", "block2_skip"]
    projected = build_model(replace(spec, skip_projection="conv1x1"), "projected")
    assert projected.count_params() == PAPER_PARAMETERS["cnn2_bn_skip"] + (1 * 32 + 32)


def test_a_three_block_wide_variant_builds(config):
    spec = replace(config.variant("cnn2"), blocks=3, filters=(32, 64, 64), padding="same")
    model = build_model(spec, "wide3")
    assert model.output_shape == (None, 10)
    assert model.get_layer("block3_conv").filters == 64


def test_bad_specs_fail_naming_the_key(config):
    with pytest.raises(ConfigError, match=r"variants\.bad\.padding"):
        build_model(replace(config.variant("cnn2"), skip=True), "bad")
    with pytest.raises(ConfigError, match=r"variants\.bad\.blocks"):
        build_model(replace(config.variant("cnn2"), blocks=5), "bad")
    with pytest.raises(ValueError, match="multiple of the input channels"):
        build_model(replace(config.variant("cnn2_bn_skip"), filters=(32, 48)), "bad")
