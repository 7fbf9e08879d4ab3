"""The train stage: fit one variant under one seed, resumably, tracked in MLflow.

Test loss and accuracy are computed after every epoch because the paper plots them
(Fig. 3); they are only monitored: nothing here selects an epoch or stops on them, and the
model kept is the one after the last epoch.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from fmnist import cli, device, paths, progress, recipes, tracking
from fmnist.cli import Interrupted
from fmnist.config import Config, ModelSpec, TrainConfig
from fmnist.data import NUM_CLASSES, Dataset
from fmnist.files import atomic_path, error_reason, write_json, write_text
from fmnist.models import build_model, summary_text
from fmnist.params import flatten
from fmnist.records import MONITORED_TEST_ACCURACY, MONITORED_TEST_LOSS, DataInfo, RunInfo


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN or infinite)."""


def to_targets(labels: np.ndarray) -> np.ndarray:
    """(n,) ints -> (n, 10) one-hot float32 (categorical cross-entropy, as in the paper)."""
    return keras.utils.to_categorical(labels, NUM_CLASSES).astype("float32")


class EpochRecorder(keras.callbacks.Callback):
    """Completes each epoch's record: monitored test metrics, timing, a finite-loss check,
    then hands it to ``on_epoch`` (which checkpoints and logs it)."""

    def __init__(self, on_epoch: Callable[[dict[str, float]], None],
                 test: tuple[np.ndarray, np.ndarray] | None, batch_size: int):
        super().__init__()
        self.on_epoch = on_epoch
        self.test = test
        self.batch_size = batch_size
        self._started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        record = {"epoch": epoch + 1}
        record.update({key: float(value) for key, value in (logs or {}).items()})
        if not math.isfinite(record.get("loss", 0.0)):
            raise TrainingError(f"training loss became {record['loss']} at epoch {epoch + 1}; "
                                "lower train.learning_rate or check the data")
        # the rate the schedule gives the next step, i.e. at this epoch's end
        record["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        if self.test is not None and MONITORED_TEST_ACCURACY not in record:  # the JAX loop computes it
            scores = self.model.evaluate(*self.test, batch_size=self.batch_size, verbose=0,
                                         return_dict=True)
            record[MONITORED_TEST_LOSS] = float(scores["loss"])
            record[MONITORED_TEST_ACCURACY] = float(scores["accuracy"])
        record["epoch_seconds"] = time.perf_counter() - self._started
        self.on_epoch(record)


class StopWhenAsked(keras.callbacks.Callback):
    """Raises a recorded stop signal (Ctrl-C, SIGTERM) between batches and epochs, from
    ordinary code (see fmnist.cli.stop_at_safe_points): the checkpoint and the MLflow run
    are then never stopped half-way through an epoch's bookkeeping."""

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        cli.check_stop()

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        cli.check_stop()

    def on_test_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        cli.check_stop()


class Checkpoint:
    """Resumable training state outside DVC's outputs (DVC deletes those before a run).

    Holds the model after the last completed epoch (with its optimizer state), the history
    so far, the training time so far and the MLflow run id; a fingerprint of everything
    that shapes training makes a checkpoint of other settings be discarded rather than
    resumed, and one that cannot be read is discarded with a warning.
    """

    def __init__(self, folder: Path, fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        files = paths.CheckpointFiles(self.folder)
        self.state_file = files.state
        self.model_file = files.model

    def load(self) -> tuple[dict[str, Any], keras.Model | None] | None:
        """(state, model after its last epoch) to resume from, or None to start afresh. A
        checkpoint of other settings, or one that cannot be read, is removed and its MLflow
        run marked FAILED. The model is None when no epoch had finished."""
        if not self.folder.exists():
            return None
        try:
            state = json.loads(self.state_file.read_text())
            if not isinstance(state, dict) or not isinstance(state.get("history", []), list):
                raise ValueError("not a checkpoint state")
        except (OSError, ValueError) as error:
            self._discard(None, f"{self.state_file.name} cannot be read ({error_reason(error)})")
            return None
        if state.get("fingerprint") != self.fingerprint:
            print(f"Discarding checkpoint {self.folder}: it was made with other settings.")
            self._discard(state.get("run_id"), None)
            return None
        if not state.get("history"):
            return state, None
        try:
            model = keras.models.load_model(self.model_file)
        except Exception as error:  # noqa: BLE001 (Keras raises many kinds for a damaged file)
            self._discard(state.get("run_id"), f"{self.model_file.name} cannot be read "
                                               f"({error_reason(error)})")
            return None
        return state, model

    def _discard(self, run_id: str | None, problem: str | None) -> None:
        if problem is not None:
            run = f"; its MLflow run {run_id} is marked FAILED" if run_id else ""
            print(f"WARNING: discarding checkpoint {self.folder}: {problem}{run}; training starts "
                  "afresh.")
        if run_id:
            tracking.mark_failed(run_id)
        self.clear()

    def save(self, run_id: str, history: list[dict[str, float]], model: keras.Model | None,
             train_seconds: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if model is not None:
            with atomic_path(self.model_file) as tmp:  # tmp keeps the .keras suffix
                model.save(tmp)
        write_json(self.state_file, {"fingerprint": self.fingerprint, "run_id": run_id,
                                     "history": history, "train_seconds": train_seconds})

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass(frozen=True)
class TrainedModel:
    model: keras.Model
    history: list[dict[str, float]]
    run_id: str
    backend: str
    precision: str
    device: str
    train_seconds: float
    name: str  # the run's name (paths.run_name)
    # the final model's class probabilities on the test set, (n, 10) float32: the evaluate
    # stage scores these instead of loading the model; and how long predicting them took
    test_probabilities: np.ndarray
    predict_seconds: float


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fit(model: keras.Model, data: Dataset, train: TrainConfig, callbacks: list,
        initial_epoch: int = 0, seed: int = 0) -> None:
    """Train ``model`` from ``initial_epoch`` to ``train.epochs``.

    Under JAX on one device: the compiled epoch loop (fmnist.jax_loop: data on the device, one
    call per epoch, the monitored test set evaluated in the same call). Under TensorFlow and
    torch: ``model.fit`` on whole arrays in memory (on the CPUs measured each step is
    compute-bound, so there is no per-step overhead to remove; see docs/timing.md). Under JAX
    on several devices (``device.training_setup``): ``model.fit``, whose trainer splits each
    batch across them.
    """
    if device.backend() == "jax" and device.data_parallel_devices() == 1:
        from fmnist import jax_loop

        jax_loop.fit(model, data.x_train, data.y_train, batch_size=train.batch_size,
                     epochs=train.epochs, initial_epoch=initial_epoch, seed=seed,
                     callbacks=callbacks, validation=(data.x_val, data.y_val),
                     test=(data.x_test, data.y_test) if train.monitor_test else None,
                     verbose=False)  # the epoch line is fmnist.progress's
        return
    validation = None
    if len(data.y_val):
        validation = (data.x_val, to_targets(data.y_val))
    verbose = progress.keras_verbosity()
    if verbose:
        # Keras appends its bar after the given callbacks, so it would end its line after the
        # epoch line was printed onto it; first in the list, it ends the line first.
        callbacks = [keras.callbacks.ProgbarLogger(), *callbacks]
    model.fit(data.x_train, to_targets(data.y_train), batch_size=train.batch_size,
              epochs=train.epochs, initial_epoch=initial_epoch, validation_data=validation,
              callbacks=callbacks, shuffle=True, verbose=verbose)


def seed_settings(config: Config, variant: str, seed: int, data_info: DataInfo, precision: str,
                  devices: int) -> str:
    """A fingerprint of everything that shapes one seed's training but the code and the data
    files: the variant's model and recipe, train's keys, the seed, the data's facts, the
    resolved backend, precision and device count. A checkpoint of other settings is discarded."""
    return _fingerprint(asdict(config.variant(variant)), _train_settings(config, variant), seed,
                        data_info.as_json(), device.backend(), precision, devices)


def _train_settings(config: Config, variant: str) -> dict[str, Any]:
    """train's keys, the variant's own recipe keys overriding (the seeds aside: one run's)."""
    return {k: v for k, v in {**asdict(config.train), **asdict(config.recipe(variant))}.items()
            if k != "seeds"}


def train_seeds(config: Config, variant: str, data: Dataset, data_info: DataInfo,
                inputs: str) -> list[TrainedModel]:
    """The train stage of one variant: every seed of ``train.seeds`` in this process, one
    after the other (each with its own folder models/<variant>/seed<k>/, MLflow run and
    checkpoint). A seed whose folder was made by the same settings and the same ``inputs``
    (a digest of the stage's code and data files) is kept, so adding a seed to
    ``train.seeds`` trains only that seed; folders of seeds no longer listed are removed.
    Returns the models trained now."""
    trained = []
    to_train = []
    for seed in config.train.seeds:
        with device.training_setup(config.train.precision) as (precision, devices):
            expected = _fingerprint(seed_settings(config, variant, seed, data_info, precision, devices),
                                    inputs)
        if _made_by(paths.model_dir(variant, seed)) == expected:
            print(f"{paths.run_name(variant, seed)}: kept (trained earlier with these settings, code "
                  "and data)", flush=True)
        else:
            to_train.append(seed)
    for position, seed in enumerate(to_train):
        print(progress.stage_label("train", config.variants, config.train.seeds, variant, seed),
              flush=True)
        trained.append(train_variant(config, variant, seed, data, data_info, paths.model_dir(variant, seed),
                                     paths.checkpoint_dir(variant, seed), inputs,
                                     seeds_after=len(to_train) - position - 1))
    paths.remove_stale_seeds([paths.variant_outputs(variant)["models"]], config.train.seeds)
    return trained


def _made_by(out_dir: Path) -> str | None:
    """The fingerprint a complete models/<variant>/seed<k>/ folder was made with, else None."""
    files = paths.RunFiles(out_dir)
    if not all(path.is_file() for path in (files.model, files.test_probabilities, files.history,
                                           files.history_csv, files.architecture, files.run_info)):
        return None
    return RunInfo.fingerprint_of(files.run_info)


def train_variant(config: Config, variant: str, seed: int, data: Dataset, data_info: DataInfo,
                  out_dir: Path, checkpoint_dir: Path, inputs: str = "",
                  seeds_after: int = 0) -> TrainedModel:
    """Train ``variant`` under ``seed``; write model, history, summary and run id to ``out_dir``.

    Resumes from ``checkpoint_dir`` when an earlier attempt stopped (Ctrl-C, a kill, a
    tracking failure): the same MLflow run, the epochs it lacks logged again, the training
    time summed over the attempts. Keras' global dtype policy and distribution are set for
    the run and restored after it (``device.training_setup``). ``seeds_after``: how many
    seeds the stage trains after this one (the epoch line's ETA of the stage).
    """
    experiment_id = tracking.connect(config.tracking.experiment)
    keras.utils.set_random_seed(seed)
    with device.training_setup(config.train.precision) as (precision, devices):
        return _train(config, variant, seed, data, data_info, out_dir, checkpoint_dir,
                      experiment_id, precision, devices, inputs, seeds_after)


def _train(config: Config, variant: str, seed: int, data: Dataset, data_info: DataInfo,
           out_dir: Path, checkpoint_dir: Path, experiment_id: str, precision: str,
           devices: int, inputs: str, seeds_after: int = 0) -> TrainedModel:
    spec: ModelSpec = config.variant(variant)
    recipe = config.recipe(variant)
    name = paths.run_name(variant, seed)
    train_settings = _train_settings(config, variant)
    settings = seed_settings(config, variant, seed, data_info, precision, devices)
    checkpoint = Checkpoint(checkpoint_dir, settings)
    resumed = checkpoint.load()
    state: dict[str, Any] = resumed[0] if resumed else {}
    history: list[dict[str, float]] = list(state.get("history", []))
    earlier_seconds = float(state.get("train_seconds", 0.0))
    if resumed and resumed[1] is not None:
        model = resumed[1]
        print(f"Resuming {name} after epoch {len(history)} from {checkpoint.folder}")
    else:
        history = []
        model = recipes.compile_model(build_model(spec, variant), recipe, config.train.epochs,
                                      len(data.y_train), config.train.batch_size)
    tags = {
        "kind": "cnn", "variant": variant, "seed": str(seed),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc_stage": paths.stage_name("train", variant),
        "data_source": data_info.source, "canonical_split": str(data_info.canonical_split),
        "keras_backend": device.backend(), "precision": precision, "device": device.describe(),
    }
    test = (data.x_test, to_targets(data.y_test)) if config.train.monitor_test else None
    started = time.perf_counter()

    def elapsed() -> float:
        return earlier_seconds + time.perf_counter() - started

    try:
        with tracking.run(experiment_id, name, tags, run_id=state.get("run_id"),
                          on_start=lambda run_id: checkpoint.save(run_id, history, None,
                                                                  earlier_seconds)) as run_id:
            tracking.log_params(flatten({"variant": variant, "seed": seed, "model": spec,
                                         "train": train_settings,
                                         "data": {"source": data_info.source,
                                                  "canonical_split": data_info.canonical_split,
                                                  **asdict(data_info.sizes)}}))
            tracking.log_params({"model.parameters": model.count_params()})
            tracking.log_dataset("fashion-mnist-train", data.x_train, data.y_train, "training", data_info)
            tracking.log_dataset("fashion-mnist-test", data.x_test, data.y_test, "testing", data_info)
            tracking.log_missing_steps(history)  # epochs an earlier attempt could not log

            def on_epoch(record: dict[str, float]) -> None:
                history.append(record)
                checkpoint.save(run_id, history, model, elapsed())
                tracking.log_epoch(record)
                epoch_line(record)

            epoch_line = progress.EpochLine(progress.stage_label(
                "train", config.variants, config.train.seeds, variant, seed), config.train.epochs,
                first_epoch=len(history), seeds_after=seeds_after)
            recorder = EpochRecorder(on_epoch, test, config.train.batch_size)
            with cli.stop_at_safe_points():
                fit(model, data, config.train, [StopWhenAsked(), recorder], initial_epoch=len(history),
                    seed=seed)
            train_seconds = elapsed()
            probabilities, predict_seconds = predict_test(model, data.x_test)
            result = TrainedModel(model, history, run_id, device.backend(), precision,
                                  device.describe(), train_seconds, name, probabilities, predict_seconds)
            write_outputs(result, out_dir, data_info, config.evaluate.class_names,
                          _fingerprint(settings, inputs))
            files = paths.RunFiles(out_dir)
            tracking.log_results({"train_seconds": round(result.train_seconds, 1),
                                  "predict_seconds": round(result.predict_seconds, 2)})
            tracking.log_artifacts(files.history, files.architecture)
            examples = -(-2 // devices) * devices  # 2, or a multiple of the devices that split it
            tracking.log_keras_model(model, name, data.x_test[:examples], config.evaluate.class_names,
                                     device.pip_requirements())
    except TrainingError:
        checkpoint.clear()  # resuming would only repeat the failure
        raise
    except tracking.TrackingError as error:
        raise tracking.TrackingError(
            f"{error}. The checkpoint {checkpoint.folder} (after epoch {len(history)}) is kept: "
            "run `dvc repro` again to resume once the store works") from error
    except KeyboardInterrupt as error:
        raise Interrupted(f"interrupted after epoch {len(history)}; run `dvc repro` again to "
                          f"resume (the checkpoint {checkpoint.folder} is kept)") from error
    checkpoint.clear()
    return result


def predict_test(model: keras.Model, x_test: np.ndarray) -> tuple[np.ndarray, float]:
    """The trained model's class probabilities on the test set, (n, 10) float32 (also for a
    model trained in bfloat16), and the seconds ``predict`` took. Inference only: the model's
    weights and the training are as they were."""
    started = time.perf_counter()
    probabilities = np.asarray(model.predict(x_test, batch_size=1024, verbose=0), dtype="float32")
    return probabilities, time.perf_counter() - started


def write_outputs(result: TrainedModel, out_dir: Path, data_info: DataInfo,
                  class_names: tuple[str, ...], fingerprint: str) -> None:
    """models/<variant>/seed<k>/: every file of paths.RunFiles (its run_info also names the
    classes in the model's output order, for fmnist.predict, and the fingerprint of the
    settings and inputs that made it, for ``train_seeds``)."""
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        files = paths.RunFiles(tmp)
        result.model.save(files.model)
        np.save(files.test_probabilities, result.test_probabilities)
        files.history.write_text(json.dumps(result.history, indent=1) + "\n")
        columns = list(dict.fromkeys(key for record in result.history for key in record))
        with files.history_csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(result.history)
        write_text(files.architecture, summary_text(result.model))
        RunInfo(mlflow_run_id=result.run_id, keras_backend=result.backend, precision=result.precision,
                device=result.device, train_seconds=round(result.train_seconds, 1),
                predict_seconds=round(result.predict_seconds, 2),
                epochs=len(result.history), parameters=result.model.count_params(),
                canonical_split=data_info.canonical_split, data_source=data_info.source,
                class_names=tuple(class_names), fingerprint=fingerprint).write(files.run_info)
