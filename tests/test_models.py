"""The variant builder: every spec in params.yaml, pinned sizes, bad specs named."""

from __future__ import annotations

from dataclasses import replace

import keras
import numpy as np
import pytest

from fmnist.config import ConfigError
from fmnist.models import build_model, feature_layer_names, probe_feature_maps
from fmnist.params import load_params
from tests.conftest import REPO

# CNN2 matches the authors' public code (113,386); BN adds 2 x (4 + 64) BN weights;
# the skip variant needs padding 'same', so its dense layer sees 7x7x32 instead of 5x5x32.
PAPER_PARAMETERS = {"cnn2": 113_386, "cnn2_bn": 113_518, "cnn2_bn_skip": 211_822}
# The authors' public code (convolutional_models.py), counted by Keras 2; and the ablation.
AUTHORS_PARAMETERS = {"authors_cnn2": 113_386, "authors_cnn2_bn": 158_574, "authors_cnn2_bn_skip": 211_950,
                      "ablation_cnn2_same": 158_442, "ablation_cnn2_bn_valid": 113_518}
# Their layers with weights, in order, as (type, parameters, output shape) from the authors' code.
AUTHORS_LAYERS = {
    "authors_cnn2": [("Conv2D", 320, (26, 26, 32)), ("Conv2D", 9_248, (11, 11, 32)),
                     ("Dense", 102_528, (128,)), ("Dense", 1_290, (10,))],
    "authors_cnn2_bn": [("BatchNormalization", 4, (28, 28, 1)), ("Conv2D", 320, (28, 28, 32)),
                        ("BatchNormalization", 128, (14, 14, 32)), ("Conv2D", 9_248, (12, 12, 32)),
                        ("Dense", 147_584, (128,)), ("Dense", 1_290, (10,))],
    "authors_cnn2_bn_skip": [("BatchNormalization", 4, (28, 28, 1)), ("Conv2D", 320, (28, 28, 32)),
                             ("BatchNormalization", 128, (14, 14, 32)), ("Conv2D", 9_248, (14, 14, 32)),
                             ("BatchNormalization", 128, (7, 7, 32)), ("Dense", 200_832, (128,)),
                             ("Dense", 1_290, (10,))],
}


@pytest.fixture(scope="module")
def config():
    return load_params(REPO / "params.yaml")


@pytest.mark.parametrize("variant", list(PAPER_PARAMETERS))
def test_every_variant_maps_images_to_class_probabilities(config, variant):
    model = build_model(config.variant(variant), variant)
    probabilities = np.asarray(model.predict(np.zeros((3, 28, 28), "uint8"), verbose=0))
    assert probabilities.shape == (3, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert model.count_params() == PAPER_PARAMETERS[variant]
    assert feature_layer_names(model) == ["block1_relu", "block2_relu"]


def test_the_feature_map_probe_gives_each_images_maps_of_each_block_in_one_call(config):
    images = np.random.default_rng(0).integers(0, 255, (3, 28, 28)).astype(np.uint8)
    model = build_model(config.variant("cnn2"), "cnn2")
    batched = probe_feature_maps(model, images[[0, 2]])  # one call for both images
    assert {name: m.shape for name, m in batched.items()} == {"block1_relu": (2, 32, 26, 26),
                                                             "block2_relu": (2, 32, 11, 11)}
    assert all(m.dtype == np.float32 for m in batched.values())
    assert (batched["block1_relu"] >= 0).all()  # after ReLU
    # each image's maps are its own: the batch gives what the image alone gives
    alone = probe_feature_maps(model, images[[2]])
    for name in batched:
        np.testing.assert_allclose(batched[name][1], alone[name][0], rtol=1e-5, atol=1e-5)
        assert not np.allclose(batched[name][0], batched[name][1])
    skip_maps = probe_feature_maps(build_model(config.variant("cnn2_bn_skip"), "s"), images[[0]])
    # ReLU after the skip sum (ours): the activated sum is what each block pools
    assert {name: m.shape for name, m in skip_maps.items()} == {"block1_relu": (1, 32, 28, 28),
                                                               "block2_relu": (1, 32, 14, 14)}


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


@pytest.mark.parametrize("variant", list(AUTHORS_PARAMETERS))
def test_the_authors_variants_and_the_ablation_have_their_parameter_counts(config, variant):
    assert build_model(config.variant(variant), variant).count_params() == AUTHORS_PARAMETERS[variant]


@pytest.mark.parametrize("variant", list(AUTHORS_LAYERS))
def test_the_authors_variants_have_their_layers_in_order(config, variant):
    model = build_model(config.variant(variant), variant)
    weighted = [(type(layer).__name__, layer.count_params(), tuple(layer.output.shape[1:]))
                for layer in model.layers if layer.count_params()]
    assert weighted == AUTHORS_LAYERS[variant]


def test_the_authors_initialisers_and_skip_block(config):
    model = build_model(config.variant("authors_cnn2_bn_skip"), "skip")
    conv = model.get_layer("block1_conv")
    assert type(conv.kernel_initializer).__name__ == "RandomUniform"
    assert type(conv.bias_initializer).__name__ == "RandomNormal"
    first = build_model(config.variant("authors_cnn2"), "cnn2")
    assert type(first.get_layer("block2_conv").kernel_initializer).__name__ == "GlorotUniform"
    # ReLU(conv(BN(x))) + BN(x): the sum takes the activated conv and the normalized input
    add_inputs = {t._keras_history.operation.name for t in model.get_layer("block2_skip").input}
    assert add_inputs == {"block2_relu", "block2_bn"}
    assert feature_layer_names(model) == ["block1_skip", "block2_skip"]  # what each block pools
    probabilities = np.asarray(model.predict(np.zeros((2, 28, 28), "uint8"), verbose=0))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def _pixels(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, 28, 28)).astype(np.uint8)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_the_model_scales_raw_pixels_itself(config, policy):
    """uint8 pixels and the same pixels as floats 0-255 give identical answers; what the
    first weighted layer sees is the pixels / 255 with a channel axis, also under bfloat16."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = build_model(config.variant("cnn2_bn_skip"), "cnn2_bn_skip")
    finally:
        keras.mixed_precision.set_global_policy(previous)
    pixels = _pixels(4)
    as_uint8 = np.asarray(model.predict(pixels, verbose=0))
    as_float = np.asarray(model.predict(pixels.astype("float32"), verbose=0))
    np.testing.assert_array_equal(as_uint8, as_float)
    assert [layer.count_params() for layer in model.layers[1:3]] == [0, 0]
    probe = keras.Model(model.inputs[0], model.get_layer("add_channel").output)
    scaled = keras.ops.convert_to_numpy(probe(pixels, training=False))
    assert scaled.shape == (4, 28, 28, 1)
    np.testing.assert_allclose(scaled[..., 0], pixels / 255.0, rtol=1e-6)
    if policy == "mixed_bfloat16":
        assert model.get_layer("block1_conv").compute_dtype == "bfloat16"


@pytest.mark.parametrize("shape", [(2, 784), (2, 28, 27), (2, 14, 56)])
def test_a_wrong_input_shape_is_an_error_not_an_answer(config, shape):
    model = build_model(config.variant("cnn2"), "cnn2")
    with pytest.raises(ValueError):
        model.predict(np.zeros(shape, "uint8"), verbose=0)


def test_per_block_values_must_match_the_blocks(config):
    with pytest.raises(ConfigError, match=r"variants\.bad\.padding"):
        build_model(replace(config.variant("cnn2"), padding=("same",)), "bad")
    with pytest.raises(ConfigError, match=r"variants\.bad\.kernel_initializer"):
        build_model(replace(config.variant("cnn2"), kernel_initializer="uniformish"), "bad")
    with pytest.raises(ConfigError, match=r"variants\.bad\.padding"):  # skip needs 'same' everywhere
        build_model(replace(config.variant("cnn2_bn_skip"), padding=("same", "valid")), "bad")
