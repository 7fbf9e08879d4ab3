"""Training recipes from params.yaml: each key changes the built model or the training as stated
(augmentation, convs per block, global pooling, residual projection, schedules, AdamW, label
smoothing), under TensorFlow's model.fit and the JAX loop; bad values name the key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import keras
import numpy as np
import pytest

from fmnist import recipes, training
from fmnist.config import ConfigError, parse_params
from fmnist.data import Dataset
from fmnist.models import build_model
from fmnist.params import load_params
from tests.conftest import REPO, TINY_TRAIN_PER_CLASS, real_params, tiny_images, venv_env
from tests.test_config import _with

AUGMENTING = ("RandomTranslation", "RandomFlip")


@pytest.fixture(scope="module")
def config():
    return load_params(REPO / "params.yaml")


def _layer_types(model: keras.Model) -> list[str]:
    return [type(layer).__name__ for layer in model.layers]


def _images(n: int, seed: int = 0) -> np.ndarray:
    """(n, 28, 28, 1) float32 images in [0, 1] with no zero pixel (a shift's fill shows)."""
    return np.random.default_rng(seed).uniform(0.1, 1.0, (n, 28, 28, 1)).astype("float32")


# ---- augmentation ---------------------------------------------------------------------------

def test_augmentation_adds_layers_only_when_asked_and_no_parameters(config):
    for variant in config.variants:
        spec = config.variant(variant)
        if not (spec.augment_translate or spec.augment_flip):
            assert not set(AUGMENTING) & set(_layer_types(build_model(spec, variant)))
    spec = replace(config.variant("cnn2_bn"), augment_translate=0, augment_flip=False)
    augmented = build_model(replace(spec, augment_translate=2, augment_flip=True), "aug")
    assert _layer_types(augmented)[3:5] == list(AUGMENTING)  # after the input, scaling, channel axis
    assert augmented.count_params() == build_model(spec, "plain").count_params()


def test_augmentation_acts_in_training_only(config):
    # no dropout: in training, only the augmentation can make two calls differ
    spec = replace(config.variant("cnn2_bn"), dropout_rate=0.0, augment_translate=2, augment_flip=True)
    x = _images(16)
    model = build_model(spec, "aug")
    first, second = model(x, training=False), model(x, training=False)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(first), keras.ops.convert_to_numpy(second))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(first), model.predict(x, verbose=0))
    trained = [keras.ops.convert_to_numpy(model(x, training=True)) for _ in range(2)]
    assert not np.allclose(trained[0], trained[1])
    plain = build_model(replace(spec, augment_translate=0, augment_flip=False), "plain")
    np.testing.assert_array_equal(*[keras.ops.convert_to_numpy(plain(x, training=True)) for _ in range(2)])


def _shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``image`` (28, 28) moved down by dy and right by dx pixels, zero-filled."""
    out = np.zeros_like(image)
    h, w = image.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        image[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def test_translation_is_pad_and_crop_by_whole_pixels_each_equally_likely(config):
    pixels = 2
    model = build_model(replace(config.variant("cnn2"), augment_translate=pixels), "shift")
    x = _images(400)
    moved = keras.ops.convert_to_numpy(model.get_layer("augment_translate")(x, training=True))
    shifts = []
    for image, out in zip(x[..., 0], moved[..., 0], strict=True):
        found = [(dy, dx) for dy in range(-pixels, pixels + 1) for dx in range(-pixels, pixels + 1)
                 if np.array_equal(out, _shift(image, dy, dx))]
        assert len(found) == 1, "not a whole-pixel shift within the range, zero-filled"
        shifts.append(found[0])
    for axis in (0, 1):
        counts = np.bincount([s[axis] + pixels for s in shifts], minlength=2 * pixels + 1)
        # uniform over -2..2: 80 expected each; the edges as likely as the middle
        assert counts.min() > 40, counts


def test_flip_mirrors_left_right_or_keeps(config):
    model = build_model(replace(config.variant("cnn2"), augment_flip=True), "flip")
    x = _images(64)
    out = keras.ops.convert_to_numpy(model.get_layer("augment_flip")(x, training=True))
    mirrored = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, x, strict=True)]
    kept = [np.array_equal(o, i) for o, i in zip(out, x, strict=True)]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True))
    assert 10 < sum(mirrored) < 54


# ---- model options --------------------------------------------------------------------------

def test_convs_per_block_add_a_conv_per_block(config):
    spec = replace(config.variant("cnn2"), padding="same")
    one, two = build_model(spec, "one"), build_model(replace(spec, convs_per_block=2), "two")
    conv_names = [layer.name for layer in two.layers if isinstance(layer, keras.layers.Conv2D)]
    assert conv_names == ["block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2"]
    # each extra conv: 3 x 3 x 32 x 32 weights + 32 biases; the dense layer unchanged ('same')
    assert two.count_params() - one.count_params() == 2 * (3 * 3 * 32 * 32 + 32)
    # 'valid' convs shrink the image once per conv: 28 -> 26 -> 24 -> pool 12 -> 10 -> 8 -> pool 4
    valid = build_model(replace(config.variant("cnn2"), convs_per_block=2), "valid")
    assert valid.get_layer("flatten").output.shape[1:] == (4 * 4 * 32,)


def test_global_average_pooling_replaces_flatten(config):
    spec = config.variant("cnn2")  # 'valid': 5 x 5 x 32 flattened into the dense layer
    pooled = build_model(replace(spec, global_pool=True), "gap")
    names = [layer.name for layer in pooled.layers]
    assert "flatten" not in names and "global_average" in names
    assert build_model(spec, "flat").count_params() - pooled.count_params() == (5 * 5 * 32 - 32) * 128


def test_residual_block_spans_its_convs_with_a_projection(config):
    spec = replace(config.variant("cnn2_bn_skip"), convs_per_block=2, skip_projection="conv1x1")
    model = build_model(spec, "residual")
    for block in (1, 2):
        add = model.get_layer(f"block{block}_skip")
        inputs = {t._keras_history.operation.name for t in add._inbound_nodes[0].input_tensors}
        # block 1: 1 -> 32 channels, projected; block 2: 32 -> 32, the identity (block 1's pool)
        assert inputs == ({"block1_conv2", "block1_projection"} if block == 1
                          else {"block2_conv2", "block1_pool"})
    repeat = build_model(replace(spec, skip_projection="repeat"), "repeat")
    assert model.count_params() - repeat.count_params() == 1 * 32 + 32


# ---- schedules, optimizer, loss -------------------------------------------------------------

def _recipe(config, **keys):
    return replace(config.recipe("cnn2"), **keys)


def _rate(schedule, step: int) -> float:
    return float(keras.ops.convert_to_numpy(schedule(step))) if callable(schedule) else schedule


def test_steps_per_epoch_count_the_last_partial_batch():
    assert recipes.steps_per_epoch(60_000, 256) == 235
    assert recipes.steps_per_epoch(50_000, 250) == 200
    with pytest.raises(ValueError, match="train_size"):
        recipes.steps_per_epoch(0, 256)


@pytest.mark.parametrize("keys, expected", [
    # (recipe keys, learning rate at the start of epochs 0, 1, ..., 10 of 10 epochs) / 0.01
    ({"lr_schedule": "constant"}, [1.0] * 11),
    ({"lr_schedule": "step", "step_epochs": 4, "step_factor": 0.5}, [1.0] * 4 + [0.5] * 4 + [0.25] * 3),
    ({"lr_schedule": "cosine", "final_lr_fraction": 0.1},
     [0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * e / 10)) for e in range(11)]),
    ({"lr_schedule": "cosine", "warmup_fraction": 0.2},
     [0.0, 0.5] + [0.5 * (1 + np.cos(np.pi * (e - 2) / 8)) for e in range(2, 11)]),
    ({"lr_schedule": "one_cycle", "warmup_fraction": 0.2},
     [0.04, 0.52] + [0.5 * (1 + np.cos(np.pi * (e - 2) / 8)) for e in range(2, 11)]),
])
def test_schedules_give_the_stated_rate_at_epoch_boundaries(config, keys, expected):
    steps = recipes.steps_per_epoch(1000, 64)  # 16 steps, the last of 40 images
    schedule = recipes.learning_rate(_recipe(config, learning_rate=0.01, **keys), 10, steps)
    rates = [_rate(schedule, epoch * steps) for epoch in range(11)]
    np.testing.assert_allclose(rates, 0.01 * np.asarray(expected), rtol=1e-5, atol=1e-9)


def test_adamw_carries_the_weight_decay_and_adam_none(config):
    adamw = recipes.optimizer(_recipe(config, optimizer="adamw", weight_decay=5e-4), 10, 10)
    assert isinstance(adamw, keras.optimizers.AdamW) and adamw.weight_decay == pytest.approx(5e-4)
    adam = recipes.optimizer(config.recipe("cnn2"), 10, 10)
    assert type(adam) is keras.optimizers.Adam and not adam.weight_decay


def test_label_smoothing_is_in_the_loss(config):
    targets = keras.utils.to_categorical([3], 10)
    confident = np.full((1, 10), 1e-7, "float32")
    confident[0, 3] = 1.0
    plain = float(recipes.loss(config.recipe("cnn2"))(targets, confident))
    smoothed = recipes.loss(_recipe(config, label_smoothing=0.1))
    assert plain < 1e-5 and float(smoothed(targets, confident)) > 0.1
    model = recipes.compile_model(build_model(config.variant("cnn2"), "m"),
                                  _recipe(config, label_smoothing=0.1), 2, 100, 32)
    assert recipes.label_smoothing(model) == pytest.approx(0.1)


# ---- training under TensorFlow: the schedule per epoch, resumed from a saved model ----------

def _tiny_data(train: int = 100) -> Dataset:
    x, y = tiny_images(12, seed=1)  # 120 images
    return Dataset(x[:train], y[:train], x[:0], y[:0], x[train:], y[train:])


@pytest.mark.slow
def test_model_fit_follows_the_schedule_per_epoch_and_resumes_on_it(config, tmp_path):
    data = _tiny_data(100)  # batch 32: 4 steps an epoch, the last of 4 images
    train = replace(config.train, epochs=3, batch_size=32, learning_rate=0.01, lr_schedule="step",
                    step_epochs=1, step_factor=0.5)
    spec = replace(config.variant("cnn2"), augment_translate=1, augment_flip=True)
    keras.utils.set_random_seed(0)
    model = recipes.compile_model(build_model(spec, "m"), train.recipe(), train.epochs,
                                  len(data.y_train), train.batch_size)
    history = []
    recorder = training.EpochRecorder(history.append, None, train.batch_size)
    training.fit(model, data, replace(train, epochs=2), [recorder])
    assert int(model.optimizer.iterations) == 2 * 4
    model.save(tmp_path / "checkpoint.keras")  # as training.Checkpoint saves after every epoch
    resumed = keras.models.load_model(tmp_path / "checkpoint.keras")
    assert int(resumed.optimizer.iterations) == 8
    assert recipes.label_smoothing(resumed) == recipes.label_smoothing(model)
    recorder = training.EpochRecorder(history.append, None, train.batch_size)
    training.fit(resumed, data, train, [recorder], initial_epoch=2)
    # at the end of epoch e the next step's rate: 0.01 x 0.5^e
    np.testing.assert_allclose([r["learning_rate"] for r in history], [0.005, 0.0025, 0.00125], rtol=1e-6)


@pytest.mark.slow
def test_the_shipped_variant_trains_through_the_stage_with_its_own_recipe(tmp_path, tiny_config,
                                                                        tiny_idx_dir, mlflow_store):
    """cnn4_bn_aug through train_variant (2 epochs, tiny data): its recipe in MLflow and in the
    learning rate per epoch, and its saved model, reloaded, predicts as trained (no augmentation)."""
    from mlflow.tracking import MlflowClient

    from fmnist import download
    from fmnist.prepare import prepare

    download.download(tiny_config.data, tmp_path / "raw", local_dir=tiny_idx_dir)
    data, info = prepare(tmp_path / "raw", tmp_path / "d.npz", tmp_path / "i.json", 40, 0)
    config = replace(tiny_config, recipes={**tiny_config.recipes, "cnn4_bn_aug": replace(
        tiny_config.recipe("cnn4_bn_aug"), warmup_fraction=0.5)})  # 2 epochs: warm up over the first
    result = training.train_variant(config, "cnn4_bn_aug", 0, data, info, mlflow_store / "out",
                                    mlflow_store / "ckpt")
    peak = config.recipe("cnn4_bn_aug").learning_rate
    np.testing.assert_allclose([r["learning_rate"] for r in result.history], [peak, 0.0], atol=1e-9)
    params = MlflowClient(f"sqlite:///{mlflow_store / 'mlflow.db'}").get_run(result.run_id).data.params
    assert (params["train.optimizer"], params["train.lr_schedule"], params["train.label_smoothing"]) == \
        ("adamw", "cosine", "0.1")
    assert params["model.convs_per_block"] == "2" and params["model.augment_flip"] == "True"
    reloaded = keras.models.load_model(mlflow_store / "out" / "model.keras")
    x = data.x_test[:8]
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), result.model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)
    assert isinstance(reloaded.optimizer, keras.optimizers.AdamW)


# ---- the JAX loop: the same schedule, fresh randomness every step ---------------------------

JAX_SCRIPT = textwrap.dedent("""
    import json, sys
    from dataclasses import replace
    import keras, numpy as np
    from fmnist import jax_loop, recipes, training
    from fmnist.params import load_params
    from fmnist.models import build_model
    from tests.conftest import tiny_images

    config = load_params(sys.argv[1])
    x, y = tiny_images(10, seed=1)  # 100 training images; batch 32: 4 steps, the last of 4
    recipe = replace(config.recipe("cnn2"), learning_rate=0.01, lr_schedule="cosine", warmup_fraction=1 / 3,
                     label_smoothing=0.1)
    spec = replace(config.variant("cnn2"), augment_translate=2, augment_flip=True)
    keras.utils.set_random_seed(0)
    model = recipes.compile_model(build_model(spec, "m"), recipe, 3, len(y), 32)
    # each random layer's only state: its seed generator's (seed, counter), a non-trainable variable
    layers = ["augment_translate", "augment_flip", "dropout"]
    generators = [model.get_layer(name).non_trainable_variables[0] for name in layers]
    assert all(any(v is g for v in model.non_trainable_variables) for g in generators)
    counters = lambda: [int(np.asarray(v.value)[1]) for v in generators]
    before = counters()
    model(x[:4, ..., None].astype("float32") / 255, training=True)  # one step's draws
    draws = [b - a for a, b in zip(before, counters())]
    seen = []

    class Watch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append({"iterations": int(model.optimizer.iterations), "counters": counters(),
                         "learning_rate": float(np.asarray(model.optimizer.learning_rate))})

    start = counters()
    jax_loop.fit(model, x, y, batch_size=32, epochs=3, callbacks=[Watch()], verbose=False)
    print(json.dumps({"draws": draws, "start": start, "seen": seen}))
""")


@pytest.mark.slow
def test_jax_loop_drives_the_schedule_and_advances_the_augmentation_seed_every_step(tmp_path):
    (tmp_path / "check.py").write_text(JAX_SCRIPT)
    # this checkout's package and its tests (tiny_images) importable
    env = {**venv_env(), "KERAS_BACKEND": "jax", "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    result = subprocess.run([sys.executable, str(tmp_path / "check.py"), str(REPO / "params.yaml")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert all(d >= 1 for d in report["draws"])  # the shift, the flip, the dropout draw in a step
    for epoch, seen in enumerate(report["seen"], start=1):
        assert seen["iterations"] == 4 * epoch
        # every step drew new numbers: the seed counters advanced by one step's draws per step
        assert seen["counters"] == [s + 4 * epoch * d for s, d in zip(report["start"], report["draws"],
                                                                         strict=True)]
    # cosine, 1 warmup epoch of 4 steps then 8 steps down: the peak after epoch 1, half-way after 2
    np.testing.assert_allclose([s["learning_rate"] for s in report["seen"]], [0.01, 0.005, 0.0],
                               atol=1e-7)


@pytest.mark.slow
def test_a_candidate_recipe_is_tuned_on_the_validation_split_without_touching_the_test_set(
        tmp_path, tiny_params, tiny_idx_dir):
    """docs/recipes.md "Choosing a recipe honestly", step 1, on the tiny pipeline: only the candidate's
    training runs, on the training set less the validation split; no test number is made."""
    import sqlite3

    import yaml

    from tests.conftest import make_dvc_repo, only_variants, run

    params = only_variants(tiny_params, ["cnn2", "cnn4_bn_aug"])
    repo = make_dvc_repo(tmp_path / "repo", params, local_data=tiny_idx_dir)
    result = run(["dvc", "exp", "run", "-S", "data.validation_size=40", "-S", "train.monitor_test=false",
                  "-S", "variants.cnn4_bn_aug.weight_decay=0.1", "train@cnn4_bn_aug"], repo)
    ran = {line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"check_params", "download", "prepare", "train@cnn4_bn_aug"}
    history = json.loads((repo / "models" / "cnn4_bn_aug" / "seed0" / "history.json").read_text())
    assert all("val_accuracy" in r and not any(k.startswith("test_") for k in r) for r in history)
    assert not (repo / "metrics" / "runs").exists() and not (repo / "predictions").exists()
    with sqlite3.connect(repo / "mlflow.db") as db:
        logged = dict(db.execute("SELECT key, value FROM params WHERE key IN "
                                 "('data.validation', 'data.train', 'train.weight_decay')").fetchall())
    assert logged == {"data.validation": "40", "data.train": str(10 * TINY_TRAIN_PER_CLASS - 40),
                      "train.weight_decay": "0.1"}
    assert yaml.safe_load((repo / "params.yaml").read_text())["data"]["validation_size"] == 40


# ---- params: per variant or in train, bad values named --------------------------------------

def test_a_variant_overrides_train_recipe_keys_and_model_defaults():
    raw = _with("variants.mine", {"optimizer": "adamw", "weight_decay": 0.01, "convs_per_block": 2,
                                  "padding": "same"})
    config = parse_params(raw)
    assert config.recipe("mine").optimizer == "adamw" and config.recipe("mine").weight_decay == 0.01
    assert config.variant("mine").convs_per_block == 2
    assert config.recipe("cnn2") == config.train.recipe() and config.recipe("cnn2").optimizer == "adam"
    with pytest.raises(ConfigError, match="unknown variant 'nope'"):
        config.recipe("nope")


@pytest.mark.parametrize("path, value, named", [
    ("train.lr_schedule", "linear", "train.lr_schedule"),
    ("train.optimizer", "sgd", "train.optimizer"),
    ("train.weight_decay", 0.01, "train.weight_decay"),  # with adam
    ("train.warmup_fraction", 0.1, "train.warmup_fraction"),  # with a constant rate
    ("variants.cnn4_bn_aug.warmup_fraction", 1.0, "variants.cnn4_bn_aug.warmup_fraction"),
    ("train.label_smoothing", 1.0, "train.label_smoothing"),
    ("train.step_factor", 1.5, "train.step_factor"),
    ("train.final_lr_fraction", -0.1, "train.final_lr_fraction"),
    ("variants.cnn2.lr_schedule", "one_cycle", "variants.cnn2.warmup_fraction"),  # needs a warmup
    ("variants.cnn2.optimizer", "rmsprop", "variants.cnn2.optimizer"),
    ("variants.cnn2.label_smoothing", "lots", "variants.cnn2.label_smoothing"),
    ("model_defaults.convs_per_block", 0, "variants.cnn2.convs_per_block"),
    ("model_defaults.augment_translate", 20, "variants.cnn2.augment_translate"),
    ("model_defaults.augment_flip", "yes", "variants.cnn2.augment_flip"),
    ("model_defaults.global_pool", 1, "variants.cnn2.global_pool"),
    ("variants.cnn2.convs_per_block", 5, "variants.cnn2.blocks"),  # 'valid' x 6 convs: too small
])
def test_bad_recipe_values_name_the_key_and_the_allowed_values(path, value, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.") + ".*allowed"):
        parse_params(_with(path, value))


@pytest.mark.parametrize("beyond, named", [
    ({"authors_cnn2": "ours?"}, "not in analyse.paper_models"),  # a paper model
    ({"ablation_cnn2_same": "ours?"}, "nor analyse.comparisons"),  # in the paper's claims
])
def test_beyond_paper_variants_are_ours_not_the_papers(beyond, named):
    with pytest.raises(ConfigError, match=r"analyse\.beyond_paper.*" + named):
        parse_params(_with("analyse.beyond_paper", beyond))
    shipped = parse_params(real_params()).analyse
    assert shipped.beyond_paper and not set(shipped.beyond_paper) & set(shipped.paper_models)
    # one that names no variant (a variant removed from params.yaml) is skipped with a note
    absent = parse_params(_with("analyse.beyond_paper", {"cnn9": "ours?"}))
    assert "cnn9" not in absent.analyse.beyond_paper
    assert any(note.startswith("analyse.beyond_paper.cnn9 skipped") for note in absent.notes), absent.notes


def test_an_unknown_variant_key_lists_the_model_and_the_recipe_keys():
    with pytest.raises(ConfigError, match=r"variants\.cnn2\.lr_shedule.*convs_per_block.*lr_schedule"):
        parse_params(_with("variants.cnn2.lr_shedule", "cosine"))


def test_the_paper_variants_train_with_the_papers_recipe():
    config = parse_params(real_params())
    for variant in config.analyse.paper_models:
        recipe, spec = config.recipe(variant), config.variant(variant)
        assert (recipe.optimizer, recipe.lr_schedule, recipe.label_smoothing) == ("adam", "constant", 0.0)
        assert (spec.convs_per_block, spec.global_pool, spec.augment_translate, spec.augment_flip) == \
            (1, False, 0, False)
