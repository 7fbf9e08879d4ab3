"""The train stage's library on tiny data: outputs, MLflow run, resume, backends, errors."""

from __future__ import annotations

import io
import json
import math
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fmnist import cli, device, download, paths, tracking, training
from fmnist.feature_maps import FeatureMaps
from fmnist.models import probe_feature_maps
from fmnist.prepare import prepare
from fmnist.tracking import TrackingError
from fmnist.training import EpochRecorder, TrainingError, train_variant
from tests.conftest import REPO, TINY_TRAIN_PER_CLASS, untimed, venv_env


@pytest.fixture
def tiny_data(tmp_path, tiny_config, tiny_idx_dir):
    download.download(tiny_config.data, tmp_path / "raw", local_dir=tiny_idx_dir)
    return prepare(tmp_path / "raw", tmp_path / "prepared" / "d.npz", tmp_path / "prepared" / "i.json",
                   validation_size=20, validation_seed=0)


def _train(config, data_and_info, root: Path, variant: str = "cnn2", seed: int = 0):
    data, info = data_and_info
    return train_variant(config, variant, seed, data, info, root / "models" / variant,
                         root / ".checkpoints" / variant)


@pytest.mark.slow
def test_tiny_training_writes_outputs_and_an_mlflow_run(tiny_config, tiny_data, mlflow_store, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "wider-dense")  # as under `dvc exp run -n wider-dense`
    result = _train(tiny_config, tiny_data, mlflow_store)
    out = mlflow_store / "models" / "cnn2"
    assert sorted(p.name for p in out.iterdir()) == [
        "feature_maps.npz", "history.csv", "history.json", "model.keras", "run.json", "summary.txt",
        "test_probabilities.npy"]
    # the saved model's probabilities of the test set, for the evaluate stage (which loads no model)
    probabilities = np.load(out / "test_probabilities.npy")
    x_test, y_test = tiny_data[0].x_test, tiny_data[0].y_test
    assert probabilities.dtype == np.float32 and probabilities.shape == (len(x_test), 10)
    saved = keras.models.load_model(out / "model.keras")
    np.testing.assert_allclose(probabilities, saved.predict(x_test, verbose=0), rtol=1e-5, atol=1e-6)
    # the saved model's feature maps of the first test image of every class, for the analyse
    # stage (which loads no model): a probe of the saved model, within float16's rounding
    maps = FeatureMaps.read(out / "feature_maps.npz", "REMEDY")
    assert maps.classes.tolist() == list(range(10))
    for label in range(10):
        index, image, layers = maps.of_class(label)
        assert index == np.flatnonzero(y_test == label)[0] and np.array_equal(image, x_test[index])
        probed = probe_feature_maps(saved, x_test[[index]])
        assert list(layers) == list(probed) == ["block1_relu", "block2_relu"]
        for name, stored in layers.items():
            assert stored.dtype == np.float16 and stored.shape == probed[name].shape[1:]
            np.testing.assert_allclose(stored, probed[name][0], rtol=2 ** -11, atol=2 ** -24)
        assert layers["block2_relu"].max() > 0
    history = json.loads((out / "history.json").read_text())
    assert [record["epoch"] for record in history] == [1, 2]
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy"} <= set(history[0])
    assert "113,386" in (out / "summary.txt").read_text()
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["mlflow_run_id"] == result.run_id and run_info["device"].startswith("cpu (")
    assert run_info["precision"] == device.resolve_precision("auto")  # float32 unless the CPU has AMX
    assert run_info["predict_seconds"] == round(result.predict_seconds, 2) and result.predict_seconds > 0
    # TensorFlow does not report its tracing apart from the steps: no compile time (JAX: test_start_up)
    assert result.compile_seconds is None and "compile_seconds" not in run_info
    assert not (mlflow_store / ".checkpoints" / "cnn2").exists()

    client = MlflowClient(f"sqlite:///{mlflow_store / 'mlflow.db'}")
    run = client.get_run(result.run_id)
    # the experiment in the run's name (the legends) and in a tag (Group by); files keep the plain name
    assert run.info.status == "FINISHED" and run.info.run_name == "cnn2-seed0 @ wider-dense"
    assert run.data.tags[tracking.EXECUTION_TAG] == "wider-dense"
    assert run.data.params["model.filters"] == "32" and run.data.params["train.epochs"] == "2"
    assert run.data.tags["variant"] == "cnn2" and run.data.tags["canonical_split"] == "False"
    assert run.data.tags["keras_backend"] == "tensorflow" and run.data.tags["device"].startswith("cpu")
    assert run.data.tags["precision"] == run_info["precision"]
    steps = [m.step for m in client.get_metric_history(result.run_id, "monitor_test_accuracy")]
    assert steps == [1, 2]
    assert run.data.metrics["predict_seconds"] == run_info["predict_seconds"]
    assert run.info.artifact_uri.startswith((mlflow_store / "mlartifacts").as_uri())
    mlflow.set_tracking_uri(f"sqlite:///{mlflow_store / 'mlflow.db'}")
    logged = tracking.load_logged_model(result.run_id, "cnn2-seed0")
    x = tiny_data[0].x_test[:4]
    np.testing.assert_allclose(logged.predict(x, verbose=0), result.model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_auto_precision_on_an_amx_cpu_trains_in_bfloat16_and_leaves_keras_at_float32(
        tiny_config, tiny_data, mlflow_store, monkeypatch):
    """What an Intel CPU with AMX does, on any CPU: ``precision: auto`` resolves to
    mixed_bfloat16 for the run, and the process is back at Keras' float32 policy afterwards,
    so that a model built next (another seed, the next test) is float32."""
    import keras

    from fmnist.models import build_model

    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx512f", "amx_bf16", "amx_tile"})
    assert device.resolve_precision("auto") == "mixed_bfloat16"
    result = _train(tiny_config, tiny_data, mlflow_store)
    assert result.precision == "mixed_bfloat16"
    assert "mixed_bfloat16" in {layer.dtype_policy.name for layer in result.model.layers}
    assert keras.mixed_precision.global_policy().name == "float32"
    after = build_model(tiny_config.variant("cnn2"), "cnn2")
    assert {layer.dtype_policy.name for layer in after.layers} == {"float32"}


def test_training_setup_restores_keras_globals_when_training_fails():
    import keras

    with pytest.raises(RuntimeError, match="inside"):
        with device.training_setup("mixed_bfloat16") as (policy, devices):
            assert (policy, devices) == ("mixed_bfloat16", 1)
            assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
            raise RuntimeError("inside")
    assert keras.mixed_precision.global_policy().name == "float32"


@pytest.mark.slow
def test_the_logged_model_is_complete_and_takes_only_pixels(tiny_config, tiny_data, mlflow_store):
    """Named after its run, uint8 (n, 28, 28) in, class names and an input example inside;
    uint8 and whole-number float pixels agree, and pixels scaled to 0-1 are refused."""
    result = _train(tiny_config, tiny_data, mlflow_store)
    mlflow.set_tracking_uri(f"sqlite:///{mlflow_store / 'mlflow.db'}")
    uri = f"runs:/{result.run_id}/cnn2-seed0"
    model = mlflow.pyfunc.load_model(uri)
    (logged,) = mlflow.search_logged_models(
        experiment_ids=[mlflow.get_run(result.run_id).info.experiment_id],
        filter_string=f"source_run_id = '{result.run_id}'", output_format="list")
    assert logged.name == "cnn2-seed0"
    spec = model.metadata.get_input_schema().inputs[0]
    assert (spec.type, spec.shape) == (np.dtype("uint8"), (-1, 28, 28))
    assert model.metadata.get_output_schema().inputs[0].name == "probabilities"
    assert model.metadata.metadata["class_names"] == list(tiny_config.evaluate.class_names)
    example = model.input_example
    np.testing.assert_array_equal(example, tiny_data[0].x_test[:2])  # stored in the logged model

    x_test, y_test = tiny_data[0].x_test, tiny_data[0].y_test
    from_pixels = np.asarray(model.predict(x_test))
    np.testing.assert_array_equal(from_pixels.argmax(1),
                                  result.model.predict(x_test, verbose=0).argmax(1))
    np.testing.assert_array_equal(np.asarray(result.model.predict(x_test.astype("float32"), verbose=0)),
                                  np.asarray(result.model.predict(x_test, verbose=0)))
    assert (from_pixels.argmax(1) == y_test).mean() > 0.5  # it learnt the tiny classes
    with pytest.raises(mlflow.exceptions.MlflowException, match="dtype of input float32 does not match"):
        model.predict((x_test / 255.0).astype("float32"))
    with pytest.raises(mlflow.exceptions.MlflowException, match="Shape of input"):
        model.predict(x_test.reshape(len(x_test), 784))


@pytest.mark.slow
def test_same_seed_gives_the_same_history(tiny_config, tiny_data, mlflow_store):
    first = _train(tiny_config, tiny_data, mlflow_store, seed=3)
    second = _train(tiny_config, tiny_data, mlflow_store, seed=3)
    losses = [[r["loss"] for r in run.history] for run in (first, second)]
    assert losses[0] == losses[1]
    other = _train(tiny_config, tiny_data, mlflow_store, seed=4)
    assert [r["loss"] for r in other.history] != losses[0]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["cnn2", "cnn4_bn_aug"])
def test_seeds_trained_in_one_process_match_each_seed_trained_alone(variant, tiny_config, tiny_data,
                                                                     mlflow_store, monkeypatch):
    """The train stage's shape under TensorFlow: every seed one after the other in one process,
    each after the first in the model object the seed before it finished (its traced functions
    reused: fmnist.training._take_over). The second seed's run is the one it gets alone to the
    last bit: every epoch's record, its test-set probabilities, its weights and optimizer
    state (cnn2: dropout; cnn4_bn_aug: batch norm, augmentation, AdamW, a schedule, label
    smoothing). A seed already made is kept, not retrained."""
    from dataclasses import replace

    monkeypatch.chdir(mlflow_store)  # train_seeds writes where paths puts it, under the cwd
    config = replace(tiny_config, train=replace(tiny_config.train, seeds=(3, 4)))
    together = training.train_seeds(config, variant, *tiny_data, inputs="code+data")
    assert [result.name for result in together] == [f"{variant}-seed3", f"{variant}-seed4"]
    assert together[1].model is together[0].model  # seed 4 trained in seed 3's model
    alone = _train(tiny_config, tiny_data, mlflow_store / "alone", variant, seed=4)
    assert [untimed(r) for r in together[1].history] == [untimed(r) for r in alone.history]
    assert [untimed(r) for r in together[0].history] != [untimed(r) for r in alone.history]
    shared = paths.RunFiles(paths.model_dir(variant, 4))
    lone = paths.RunFiles(mlflow_store / "alone" / "models" / variant)
    np.testing.assert_array_equal(np.load(shared.test_probabilities), np.load(lone.test_probabilities))
    got, want = keras.models.load_model(shared.model), keras.models.load_model(lone.model)
    # the optimizers' names differ (Keras numbers them in the order they are made), not their state
    for a, b in zip([*got.weights, *got.optimizer.variables], [*want.weights, *want.optimizer.variables],
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=b.path)
    assert training.train_seeds(config, variant, *tiny_data, inputs="code+data") == []  # both kept
    again = training.train_seeds(config, variant, *tiny_data, inputs="other code")
    assert [result.name for result in again] == [f"{variant}-seed3", f"{variant}-seed4"]


def model_state(model) -> dict[str, Any]:
    """A model's weights and its optimizer's state (step count, Adam's moments) as arrays."""
    optimizer = {v.path: np.array(v) for v in model.optimizer.variables}
    return {"weights": [np.array(w) for w in model.get_weights()], "optimizer": optimizer,
            "iterations": int(model.optimizer.iterations)}


def assert_same_state(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert len(actual["weights"]) == len(expected["weights"])
    for got, want in zip(actual["weights"], expected["weights"], strict=True):
        np.testing.assert_array_equal(got, want)
    assert actual["optimizer"].keys() == expected["optimizer"].keys()
    assert any("momentum" in key or "velocit" in key for key in expected["optimizer"])
    for key, want in expected["optimizer"].items():
        np.testing.assert_array_equal(actual["optimizer"][key], want, err_msg=key)


class StartingState(training.keras.callbacks.Callback):
    """Records the model's state when fit starts (the weights and optimizer it resumes from)."""

    def on_train_begin(self, logs=None):
        self.state = model_state(self.model)


@pytest.mark.slow
def test_interrupted_training_resumes_from_the_last_completed_epoch(
        tiny_config, tiny_data, mlflow_store, monkeypatch):
    from dataclasses import replace

    config = replace(tiny_config, train=replace(tiny_config.train, epochs=3))
    real_fit = training.fit

    class Interrupt(training.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise KeyboardInterrupt("simulated Ctrl-C")

    monkeypatch.setattr(training, "fit", lambda model, data, train, callbacks, initial_epoch=0, **kw:
                        real_fit(model, data, train, callbacks + [Interrupt()], initial_epoch, **kw))
    monkeypatch.setenv("DVC_EXP_NAME", "first-try")
    with pytest.raises(KeyboardInterrupt):
        _train(config, tiny_data, mlflow_store)
    state = json.loads((mlflow_store / ".checkpoints" / "cnn2" / "state.json").read_text())
    assert [r["epoch"] for r in state["history"]] == [1, 2]
    client = MlflowClient(f"sqlite:///{mlflow_store / 'mlflow.db'}")
    assert client.get_run(state["run_id"]).info.status == "KILLED"

    # what the resumed fit starts from must be the checkpoint: its weights and Adam's state
    checkpoint = training.keras.models.load_model(mlflow_store / ".checkpoints" / "cnn2" / "model.keras")
    started_from = StartingState()
    monkeypatch.setattr(training, "fit", lambda model, data, train, callbacks, initial_epoch=0, **kw:
                        real_fit(model, data, train, [started_from, *callbacks], initial_epoch, **kw))
    monkeypatch.setenv("DVC_EXP_NAME", "second-try")  # another experiment, the same settings: it resumes
    resumed = _train(config, tiny_data, mlflow_store)
    assert_same_state(started_from.state, model_state(checkpoint))
    steps_per_epoch = math.ceil(len(tiny_data[0].y_train) / config.train.batch_size)
    assert started_from.state["iterations"] == 2 * steps_per_epoch  # Adam's step count, not 0
    assert resumed.run_id == state["run_id"]
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert resumed.history[:2] == state["history"]
    finished = client.get_run(resumed.run_id)
    assert finished.info.status == "FINISHED"
    # the experiment that finished the run names it
    assert finished.info.run_name == "cnn2-seed0 @ second-try"
    assert finished.data.tags[tracking.EXECUTION_TAG] == "second-try"


KILL_SCRIPT = textwrap.dedent("""
    import gc, os, signal, sys
    from pathlib import Path
    from fmnist import cli, training
    from fmnist.config import parse_params
    from fmnist.data import load_prepared
    from fmnist.records import DataInfo
    import yaml

    import numpy as np

    def state(model):
        return ([np.array(w) for w in model.get_weights()],
                {v.path: np.array(v) for v in model.optimizer.variables})

    # resuming: the state fit starts from, set against the checkpoint the kill left
    resuming = sys.argv[1] == "resume"
    expected = state(training.keras.models.load_model("ckpt/model.keras")) if resuming else None

    class Kill(training.keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            if expected is not None:
                weights, optimizer = state(self.model)
                same = (len(weights) == len(expected[0])
                        and all(np.array_equal(a, b) for a, b in zip(weights, expected[0]))
                        and optimizer.keys() == expected[1].keys()
                        and all(np.array_equal(optimizer[k], expected[1][k]) for k in optimizer))
                print("RESTORED", "same" if same else "different", int(self.model.optimizer.iterations))

        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1 and sys.argv[1] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if epoch == 1 and sys.argv[1] == "term":
                os.kill(os.getpid(), signal.SIGTERM)
            if epoch == 1 and sys.argv[1] == "term-in-gc":  # lands in a gc callback, as in JAX's
                def term(phase, info):
                    if phase == "start" and term in gc.callbacks:
                        gc.callbacks.remove(term)
                        os.kill(os.getpid(), signal.SIGTERM)
                gc.callbacks.append(term)
                gc.collect()

    real_fit = training.fit
    training.fit = lambda m, d, t, callbacks, initial_epoch=0, **kw: real_fit(
        m, d, t, callbacks + [Kill()], initial_epoch, **kw)

    def main():
        config = parse_params(yaml.safe_load(Path("params.yaml").read_text()))
        result = training.train_variant(config, "cnn2", 0, load_prepared(Path("d.npz")),
                                        DataInfo.read(Path("i.json")), Path("out"), Path("ckpt"))
        print("EPOCHS", len(result.history), result.run_id)

    cli.stage_main(main)
""")


def _script_dir(folder: Path, params: dict, config, idx_dir: Path, script: str) -> dict[str, str]:
    """``folder`` as KILL_SCRIPT expects it: the tiny data prepared, params.yaml and the script
    written; the environment to run it in."""
    import yaml

    download.download(config.data, folder / "raw", local_dir=idx_dir)
    prepare(folder / "raw", folder / "d.npz", folder / "i.json", 0, 0)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    (folder / script).write_text(KILL_SCRIPT)
    return {**venv_env(), "DVC_ROOT": str(folder)}


@pytest.mark.slow
def test_a_killed_run_is_resumed_not_left_running(tmp_path, tiny_params, tiny_config, tiny_idx_dir):
    env = _script_dir(tmp_path, tiny_params, tiny_config, tiny_idx_dir, "kill.py")
    killed = subprocess.run([sys.executable, "kill.py", "kill"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(state["run_id"]).info.status == "RUNNING"  # what a kill leaves

    resumed = subprocess.run([sys.executable, "kill.py", "resume"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"EPOCHS 2 {state['run_id']}" in resumed.stdout
    # the weights and Adam's state (its moments, and one epoch's steps) are the checkpoint's
    steps_per_epoch = math.ceil(10 * TINY_TRAIN_PER_CLASS / tiny_params["train"]["batch_size"])
    assert f"RESTORED same {steps_per_epoch}" in resumed.stdout
    assert "Resuming cnn2-seed0 after epoch 1" in resumed.stdout
    assert client.get_run(state["run_id"]).info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.parametrize("how, backend", [("term", "tensorflow"), ("term-in-gc", "tensorflow"),
                                          ("term-in-gc", "jax")])
def test_sigterm_during_training_exits_130_with_the_run_killed_and_the_checkpoint_kept(
        tmp_path, tiny_params, tiny_config, tiny_idx_dir, how, backend):
    # term-in-gc: the signal lands while a gc callback runs, where an exception raised by the
    # handler is dropped ("Exception ignored in"); training then went on to the end. Under
    # JAX (fmnist.jax_loop, stepwise on the CPU) the stop is raised before epoch 2's first step.
    env = {**_script_dir(tmp_path, tiny_params, tiny_config, tiny_idx_dir, "term.py"),
           "KERAS_BACKEND": backend}
    stopped = subprocess.run([sys.executable, "term.py", how], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 130, (stopped.stdout[-2000:], stopped.stderr[-3000:])
    assert stopped.stderr.strip().splitlines()[-1].startswith(
        "ERROR: interrupted after epoch 1; run `dvc repro` again to resume (the checkpoint ckpt is kept)")
    assert "Traceback" not in stopped.stderr and "Exception ignored" not in stopped.stderr
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    assert [record["epoch"] for record in state["history"]] == [1]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(state["run_id"]).info.status == "KILLED"
    assert not (tmp_path / "out").exists()


def test_a_stop_signal_during_training_is_raised_at_the_next_batch_not_in_the_handler():
    class SignalAfterBatch(training.keras.callbacks.Callback):
        batches = 0

        def on_train_batch_end(self, batch, logs=None):
            self.batches += 1
            if batch == 1:
                cli._on_stop_signal(signal.SIGTERM, None)  # returns: the stop is only recorded

    keras = training.keras
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    x, y = np.zeros((64, 4), np.float32), keras.utils.to_categorical(np.arange(64) % 2, 2)
    signal_after = SignalAfterBatch()
    with pytest.raises(KeyboardInterrupt, match="signal 15"), cli.stop_at_safe_points():
        model.fit(x, y, batch_size=8, epochs=2, verbose=0,
                  callbacks=[training.StopWhenAsked(), signal_after])
    assert signal_after.batches == 2  # stopped before the third batch, not within the second
    with pytest.raises(KeyboardInterrupt):  # outside training: at once
        cli._on_stop_signal(signal.SIGTERM, None)


@pytest.mark.slow
def test_training_under_the_jax_backend(tmp_path, tiny_params, tiny_config, tiny_idx_dir):
    env = {**_script_dir(tmp_path, tiny_params, tiny_config, tiny_idx_dir, "train.py"),
           "KERAS_BACKEND": "jax"}
    result = subprocess.run([sys.executable, "train.py", "run"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run_info["keras_backend"] == "jax" and run_info["epochs"] == 2
    maps = FeatureMaps.read(tmp_path / "out" / "feature_maps.npz", "REMEDY")  # probed under JAX too
    assert maps.classes.tolist() == list(range(10)) and np.isfinite(maps.layers["block1_relu"]).all()
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert all(math.isfinite(r["loss"]) for r in history)


def test_non_finite_loss_stops_training_with_a_clear_error():
    recorder = EpochRecorder(on_epoch=lambda record: None, test=None, batch_size=8)
    recorder.on_epoch_begin(0)
    with pytest.raises(TrainingError, match="loss became nan at epoch 1"):
        recorder.on_epoch_end(0, {"loss": float("nan"), "accuracy": 0.1})


def test_unreachable_tracking_server_fails_before_training(tiny_config, tiny_data, tmp_path,
                                                          monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(TrackingError, match=r"http://127\.0\.0\.1:9.*does not answer"):
        _train(tiny_config, tiny_data, tmp_path)
    assert not (tmp_path / "models").exists()


def test_the_train_stage_script_reports_bad_input_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "stages" / "train.py"), "--variant", "cnn9"],
                            cwd=REPO, env=venv_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    assert "ERROR: unknown variant 'cnn9'; params.yaml defines: cnn2, cnn2_bn," in result.stderr
    assert "Traceback" not in result.stderr


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_at_a_terminal_the_epoch_line_has_a_line_of_its_own(tiny_config, tiny_data, monkeypatch):
    """Keras' bar (shown at a terminal only) ends its line before the epoch line is printed."""
    from dataclasses import replace

    from fmnist import recipes
    from fmnist.models import build_model

    data, _ = tiny_data
    train = replace(tiny_config.train, epochs=2)
    model = recipes.compile_model(build_model(tiny_config.variant("cnn2"), "cnn2"),
                                  tiny_config.recipe("cnn2"), train.epochs, len(data.y_train),
                                  train.batch_size)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    recorder = EpochRecorder(lambda record: print(f"[train 1/1] cnn2 seed 0 | epoch {record['epoch']}/2"),
                             None, train.batch_size)
    training.fit(model, data, train, [recorder])
    monkeypatch.undo()
    lines = terminal.getvalue().split("\n")
    assert "━" in terminal.getvalue()  # Keras' bar was shown
    epoch_lines = [line for line in lines if "| epoch " in line]
    assert epoch_lines == [f"[train 1/1] cnn2 seed 0 | epoch {epoch}/2" for epoch in (1, 2)], lines
