"""The train stage: fit one variant under each of its seeds, resumably, tracked in MLflow
(under JAX the seeds together in one loop, each with its own run, checkpoint and folder).

Test loss and accuracy are computed after every epoch because the paper plots them
(Fig. 3); they are only monitored: nothing here selects an epoch or stops on them, and the
model kept is the one after the last epoch.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from fmnist import cli, device, paths, progress, recipes, tracking
from fmnist.cli import Interrupted
from fmnist.config import Config, TrainConfig
from fmnist.data import NUM_CLASSES, Dataset
from fmnist.feature_maps import FeatureMaps, first_of_each_class
from fmnist.files import atomic_path, error_reason, write_json, write_text
from fmnist.models import build_model, probe_feature_maps, summary_text
from fmnist.params import flatten
from fmnist.records import MONITORED_TEST_ACCURACY, MONITORED_TEST_LOSS, DataInfo, RunInfo


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN or infinite)."""


def to_targets(labels: np.ndarray) -> np.ndarray:
    """(n,) ints -> (n, 10) one-hot float32 (categorical cross-entropy, as in the paper)."""
    return keras.utils.to_categorical(labels, NUM_CLASSES).astype("float32")


class EpochRecorder(keras.callbacks.Callback):
    """Completes each epoch's record: monitored test metrics, timing, a finite-loss check,
    then hands it to ``on_epoch`` (which checkpoints and logs it). Where the loop runs
    epochs in chunks (fmnist.jax_loop), it calls ``on_chunk`` at each chunk's end."""

    def __init__(self, on_epoch: Callable[[dict[str, float]], None],
                 test: tuple[np.ndarray, np.ndarray] | None, batch_size: int,
                 on_chunk: Callable[[], None] | None = None):
        super().__init__()
        self.on_epoch = on_epoch
        self.on_chunk = on_chunk
        self.test = test
        self.batch_size = batch_size
        self._started = 0.0

    def on_chunk_end(self, epoch: int) -> None:
        if self.on_chunk is not None:
            self.on_chunk()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        record = {"epoch": epoch + 1}
        record.update({key: float(value) for key, value in (logs or {}).items()})
        if not math.isfinite(record.get("loss", 0.0)):
            raise TrainingError(f"training loss became {record['loss']} at epoch {epoch + 1}; "
                                "lower train.learning_rate or check the data")
        if "learning_rate" not in record:  # a chunk's loop gives each epoch's
            # the rate the schedule gives the next step, i.e. at this epoch's end
            record["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        if self.test is not None and MONITORED_TEST_ACCURACY not in record:  # the JAX loop computes it
            scores = self.model.evaluate(*self.test, batch_size=self.batch_size, verbose=0,
                                         return_dict=True)
            record[MONITORED_TEST_LOSS] = float(scores["loss"])
            record[MONITORED_TEST_ACCURACY] = float(scores["accuracy"])
        record.setdefault("epoch_seconds", time.perf_counter() - self._started)
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
        _restore_seed_generators(model, state.get("seed_generators", []))
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
             train_seconds: float, compile_seconds: float | None = None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if model is not None:
            with atomic_path(self.model_file) as tmp:  # tmp keeps the .keras suffix
                model.save(tmp)
        write_json(self.state_file, {"fingerprint": self.fingerprint, "run_id": run_id,
                                     "history": history, "train_seconds": train_seconds,
                                     "compile_seconds": compile_seconds,
                                     "seed_generators": [] if model is None else [
                                         np.asarray(v).tolist() for v in _seed_generator_states(model)]})

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _seed_generator_states(model: keras.Model) -> list:
    """The state of the model's seed generators (dropout, augmentation), in layer order: the
    .keras file does not keep them (a loaded model draws new ones), so the checkpoint does,
    and a resumed run draws the masks the uninterrupted run would have."""
    return [v for v in model.non_trainable_variables if v.name == "seed_generator_state"]


def _restore_seed_generators(model: keras.Model, saved: list) -> None:
    variables = _seed_generator_states(model)
    if len(saved) == len(variables):  # else a checkpoint written before they were kept
        for variable, value in zip(variables, saved, strict=True):
            variable.assign(np.asarray(value, dtype=variable.dtype))


@dataclass(frozen=True)
class TrainedModel:
    model: keras.Model
    history: list[dict[str, float]]
    run_id: str
    backend: str
    precision: str
    device: str
    train_seconds: float
    compile_seconds: float | None  # of train_seconds (device.compile_clock; None: not measured)
    name: str  # the run's name (paths.run_name)
    # the final model's class probabilities on the test set, (n, 10) float32: the evaluate
    # stage scores these instead of loading the model; and how long predicting them took
    test_probabilities: np.ndarray
    predict_seconds: float
    # the final model's feature maps of the first test image of each class (Figs. 5-7): the
    # analyse stage draws these instead of loading the model
    feature_maps: FeatureMaps


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


def fit_seeds(models: list[keras.Model], data: Dataset, train: TrainConfig, callbacks: list[list],
              initial_epoch: int, seeds: list[int], vmapped: bool | None = None) -> None:
    """Train ``models`` (one architecture and recipe, ``models[i]`` under ``seeds[i]``, with
    ``callbacks[i]``) together from ``initial_epoch``: JAX on one device only (``fit``'s loop
    for all the seeds; ``vmapped``: see fmnist.jax_loop.fit_seeds)."""
    from fmnist import jax_loop

    jax_loop.fit_seeds(models, data.x_train, data.y_train, batch_size=train.batch_size,
                       epochs=train.epochs, initial_epoch=initial_epoch, seeds=seeds, callbacks=callbacks,
                       validation=(data.x_val, data.y_val),
                       test=(data.x_test, data.y_test) if train.monitor_test else None,
                       vmapped=vmapped, verbose=False)


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
    """The train stage of one variant: every seed of ``train.seeds`` in this process (each
    with its own folder models/<variant>/seed<k>/, MLflow run and checkpoint). A seed whose
    folder was made by the same settings and the same ``inputs`` (a digest of the stage's code
    and data files) is kept, so adding a seed to ``train.seeds`` trains only that seed; folders
    of seeds no longer listed are removed. Under JAX on one device the seeds to train that
    start at the same epoch (all fresh, or all resuming after the same epoch) train together,
    in one vmapped loop (``train_together``); else one after the other, under TensorFlow each
    fresh seed in the model object the seed before it finished (``train_variant``'s ``reuse``),
    so that its functions are traced once per stage: an earlier seed's ``model`` in the list
    returned then holds a later seed's state (its files in models/ are its own). Returns the
    seeds trained now."""
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
    if _trains_together():
        trained = train_together(config, variant, to_train, data, data_info, inputs)
    else:
        trained = []
        for position, seed in enumerate(to_train):
            print(progress.stage_label("train", config.variants, config.train.seeds, variant, seed),
                  flush=True)
            trained.append(train_variant(config, variant, seed, data, data_info,
                                         paths.model_dir(variant, seed), paths.checkpoint_dir(variant, seed),
                                         inputs, seeds_after=len(to_train) - position - 1,
                                         reuse=_reusable(trained)))
    paths.remove_stale_seeds([paths.variant_outputs(variant)["models"]], config.train.seeds)
    return trained


def _reusable(trained: list[TrainedModel]) -> keras.Model | None:
    """The model the next fresh seed trains in (``_take_over``): the last one trained, under
    TensorFlow (where it was measured and tested; torch traces nothing, JAX on one device
    trains its seeds together)."""
    return trained[-1].model if trained and device.backend() == "tensorflow" else None


def _trains_together() -> bool:
    """Seeds train together in one vmapped loop where fmnist.jax_loop trains: JAX on one device."""
    return device.backend() == "jax" and device.data_parallel_devices() == 1


def _made_by(out_dir: Path) -> str | None:
    """The fingerprint a complete models/<variant>/seed<k>/ folder was made with, else None."""
    files = paths.RunFiles(out_dir)
    if not all(path.is_file() for path in (files.model, files.test_probabilities, files.feature_maps,
                                           files.history, files.history_csv, files.architecture,
                                           files.run_info)):
        return None
    return RunInfo.fingerprint_of(files.run_info)


def train_variant(config: Config, variant: str, seed: int, data: Dataset, data_info: DataInfo,
                  out_dir: Path, checkpoint_dir: Path, inputs: str = "",
                  seeds_after: int = 0, reuse: keras.Model | None = None) -> TrainedModel:
    """Train ``variant`` under ``seed``; write model, history, summary and run id to ``out_dir``.

    Resumes from ``checkpoint_dir`` when an earlier attempt stopped (Ctrl-C, a kill, a
    tracking failure): the same MLflow run, the epochs it lacks logged again, the training
    time summed over the attempts. Keras' global dtype policy and distribution are set for
    the run and restored after it (``device.training_setup``). ``seeds_after``: how many
    seeds the stage trains after this one (the epoch line's ETA of the stage). ``reuse``: a
    model of ``variant`` that an earlier seed finished in this process; a fresh seed trains in
    it (``_take_over``), and so does not trace its train, test and predict functions again.
    """
    experiment_id = tracking.connect(config.tracking.experiment)
    with device.training_setup(config.train.precision) as (precision, devices):
        run = _prepare(config, variant, seed, data, data_info, out_dir, checkpoint_dir, precision,
                       devices, inputs, reuse)
        return _train(config, [run], data, data_info, experiment_id, seeds_after)[0]


def train_together(config: Config, variant: str, seeds: list[int], data: Dataset, data_info: DataInfo,
                   inputs: str) -> list[TrainedModel]:
    """Train ``variant`` under each of ``seeds`` (JAX on one device), in its own folder,
    checkpoint and MLflow run as ``train_variant`` has them, the seeds that start at the same
    epoch in one vmapped loop (fmnist.jax_loop.fit_seeds): a group per start epoch, all fresh
    seeds in one. Each model is built under its own seed (the weights a lone run starts from);
    its ``train_seconds`` is the loop time it shared with its group."""
    if not seeds:
        return []
    experiment_id = tracking.connect(config.tracking.experiment)
    trained = []
    with device.training_setup(config.train.precision) as (precision, devices):
        runs = [_prepare(config, variant, seed, data, data_info, paths.model_dir(variant, seed),
                         paths.checkpoint_dir(variant, seed), precision, devices, inputs)
                for seed in seeds]
        groups: dict[int, list[_SeedRun]] = {}
        for run in runs:
            groups.setdefault(len(run.history), []).append(run)
        left = len(runs)
        for first_epoch in sorted(groups):
            group = groups[first_epoch]
            left -= len(group)
            for run in group:
                print(progress.stage_label("train", config.variants, config.train.seeds, variant, run.seed)
                      + (f" (with seeds {', '.join(str(r.seed) for r in group if r is not run)})"
                         if len(group) > 1 else ""), flush=True)
            trained += _train(config, group, data, data_info, experiment_id, seeds_after=left)
    return trained


@dataclass
class _SeedRun:
    """One seed's training while it runs: what it resumes from, its model and its run."""

    variant: str
    seed: int
    out_dir: Path
    checkpoint: Checkpoint
    settings: str  # seed_settings
    made_by: str  # the fingerprint its run.json records (settings and inputs)
    precision: str
    devices: int
    model: keras.Model
    history: list[dict[str, float]]
    earlier_seconds: float  # training time of earlier attempts
    earlier_compile_seconds: float | None  # their compile time (None: not measured)
    resumed_run_id: str | None
    run_id: str = ""
    loop_started: float = 0.0
    train_seconds: float = 0.0  # elapsed() when the loop ended
    compile_clock: device.CompileClock | None = None  # this attempt's, while its loop runs
    result: TrainedModel | None = None

    @property
    def name(self) -> str:
        return paths.run_name(self.variant, self.seed)

    def elapsed(self) -> float:
        return self.earlier_seconds + time.perf_counter() - self.loop_started

    def compile_seconds(self) -> float | None:
        """Of ``elapsed()``, the time spent compiling (None where the backend does not say)."""
        now = self.compile_clock.seconds if self.compile_clock else None
        return None if now is None else (self.earlier_compile_seconds or 0.0) + now


def _prepare(config: Config, variant: str, seed: int, data: Dataset, data_info: DataInfo, out_dir: Path,
             checkpoint_dir: Path, precision: str, devices: int, inputs: str,
             reuse: keras.Model | None = None) -> _SeedRun:
    """A seed's model: its checkpoint's (an earlier attempt stopped), else built and compiled
    under the seed (Keras' global seed: the weights and the seed generators' state), that
    state then set in ``reuse`` where one is given (``_take_over``)."""
    keras.utils.set_random_seed(seed)
    settings = seed_settings(config, variant, seed, data_info, precision, devices)
    checkpoint = Checkpoint(checkpoint_dir, settings)
    resumed = checkpoint.load()
    state: dict[str, Any] = resumed[0] if resumed else {}
    history: list[dict[str, float]] = list(state.get("history", []))
    if resumed and resumed[1] is not None:
        model = resumed[1]
        print(f"Resuming {paths.run_name(variant, seed)} after epoch {len(history)} from "
              f"{checkpoint.folder}")
    else:
        history = []
        model = recipes.compile_model(build_model(config.variant(variant), variant), config.recipe(variant),
                                      config.train.epochs, len(data.y_train), config.train.batch_size)
        if reuse is not None:
            model = _take_over(reuse, model)
    return _SeedRun(variant, seed, Path(out_dir), checkpoint, settings, _fingerprint(settings, inputs),
                    precision, devices, model, history, float(state.get("train_seconds", 0.0)),
                    state.get("compile_seconds"), state.get("run_id"))


def _take_over(trained: keras.Model, fresh: keras.Model) -> keras.Model:
    """``trained`` (an earlier seed's model of the same variant and recipe) set to ``fresh``'s
    starting state, its weights (batch-norm statistics included), optimizer state (step count,
    moments) and seed generators (dropout, augmentation), so that it trains as ``fresh`` would,
    to the last bit (tests/test_training.py). TensorFlow traces a model's train, test and
    predict functions once per model object: the seeds after the first of a stage reuse them
    (on tiny data 0.5-2 s a seed; measured in docs/timing.md)."""
    trained.set_weights(fresh.get_weights())
    fresh.optimizer.build(fresh.trainable_variables)  # its variables' starting values
    for target, value in zip([*trained.optimizer.variables, *_seed_generator_states(trained)],
                             [*fresh.optimizer.variables, *_seed_generator_states(fresh)], strict=True):
        target.assign(value)
    return trained


def _train(config: Config, runs: list[_SeedRun], data: Dataset, data_info: DataInfo, experiment_id: str,
           seeds_after: int = 0) -> list[TrainedModel]:
    """Train ``runs`` (one variant, the same first epoch) in one loop, each in its own MLflow
    run (all open at once: the per-epoch logs go by run id; each run's own logging and its end
    happen while it is MLflow's active run, the runs nested in the order they started)."""
    try:
        with contextlib.ExitStack() as stack:
            for run in runs:
                stack.enter_context(_tracked(config, run, data, data_info, experiment_id))
            epoch_lines = [progress.EpochLine(progress.stage_label(
                "train", config.variants, config.train.seeds, run.variant, run.seed), config.train.epochs,
                first_epoch=len(run.history), seeds_after=seeds_after) for run in runs]
            test = (data.x_test, to_targets(data.y_test)) if config.train.monitor_test else None
            # images per second: those of every seed in the loop (they share each epoch's time)
            images = len(runs) * len(data.y_train)
            callbacks = [[StopWhenAsked(), _recorder(run, line, test, config.train.batch_size, images,
                                                     chunked=_trains_together())]
                         for run, line in zip(runs, epoch_lines, strict=True)]
            started = time.perf_counter()
            with cli.stop_at_safe_points(), device.compile_clock() as compile_clock:
                for run in runs:
                    run.loop_started, run.compile_clock = started, compile_clock
                if len(runs) == 1:
                    fit(runs[0].model, data, config.train, callbacks[0], initial_epoch=len(runs[0].history),
                        seed=runs[0].seed)
                else:
                    fit_seeds([run.model for run in runs], data, config.train, callbacks,
                              initial_epoch=len(runs[0].history), seeds=[run.seed for run in runs])
            for run in runs:  # the loop's time, before any run's outputs are written and logged
                run.train_seconds = run.elapsed()
            # each run's outputs and model are logged as its _tracked context exits (last first)
    except TrainingError:
        for run in runs:  # resuming would repeat the failure (the seeds started together)
            run.checkpoint.clear()
        raise
    except tracking.TrackingError as error:
        raise tracking.TrackingError(
            f"{error}. {_kept(runs)}: run `dvc repro` again to resume once the store works") from error
    except KeyboardInterrupt as error:
        folders = ", ".join(str(run.checkpoint.folder) for run in runs)
        kept = (f"the checkpoint {folders} is kept" if len(runs) == 1
                else f"the checkpoints {folders} are kept")
        raise Interrupted(f"interrupted after epoch {min(len(run.history) for run in runs)}; run `dvc repro` "
                          f"again to resume ({kept})") from error
    for run in runs:
        run.checkpoint.clear()
    return [run.result for run in runs if run.result is not None]


def _kept(runs: list[_SeedRun]) -> str:
    if len(runs) == 1:
        return f"The checkpoint {runs[0].checkpoint.folder} (after epoch {len(runs[0].history)}) is kept"
    return "The checkpoints " + ", ".join(f"{run.checkpoint.folder} (after epoch {len(run.history)})"
                                          for run in runs) + " are kept"


def _recorder(run: _SeedRun, epoch_line: progress.EpochLine, test: tuple[np.ndarray, np.ndarray] | None,
              batch_size: int, images: int, chunked: bool) -> EpochRecorder:
    """``run``'s EpochRecorder: each epoch's record (with ``images`` trained per epoch over
    its time) into the history, the checkpoint and MLflow, and its epoch line. ``chunked``
    (fmnist.jax_loop calls ``on_chunk_end``): the checkpoint and MLflow once per chunk of
    epochs, its records in one batch."""
    pending: list[dict[str, float]] = []

    def flush() -> None:
        if pending:
            run.history.extend(pending)
            run.checkpoint.save(run.run_id, run.history, run.model, run.elapsed(), run.compile_seconds())
            if len(pending) == 1:
                tracking.log_epoch(pending[0], run_id=run.run_id)
            else:
                tracking.log_epochs(pending, run_id=run.run_id)
            pending.clear()

    def on_epoch(record: dict[str, float]) -> None:
        record["images_per_second"] = images / record["epoch_seconds"]
        pending.append(record)
        if not chunked:
            flush()
        epoch_line(record)

    return EpochRecorder(on_epoch, test, batch_size, on_chunk=flush if chunked else None)


@contextlib.contextmanager
def _tracked(config: Config, run: _SeedRun, data: Dataset, data_info: DataInfo,
             experiment_id: str) -> Iterator[None]:
    """``run``'s MLflow run around its training: started (or resumed) and its params and data
    logged on entry; on a normal exit its outputs written (``run.result``) and logged."""
    variant, spec = run.variant, config.variant(run.variant)
    tags = {
        "kind": "cnn", "variant": variant, "seed": str(run.seed),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc_stage": paths.stage_name("train", variant),
        "data_source": data_info.source, "canonical_split": str(data_info.canonical_split),
        "keras_backend": device.backend(), "precision": run.precision, "device": device.describe(),
    }
    with tracking.run(experiment_id, run.name, tags, run_id=run.resumed_run_id,
                      on_start=lambda run_id: run.checkpoint.save(run_id, run.history, None,
                                                                  run.earlier_seconds),
                      system_metrics=True) as run_id:
        run.run_id = run_id
        tracking.log_params(flatten({"variant": variant, "seed": run.seed, "model": spec,
                                     "train": _train_settings(config, variant),
                                     "data": {"source": data_info.source,
                                              "canonical_split": data_info.canonical_split,
                                              **asdict(data_info.sizes)}}))
        tracking.log_params({"model.parameters": run.model.count_params()})
        tracking.log_dataset("fashion-mnist-train", data.x_train, data.y_train, "training", data_info)
        tracking.log_dataset("fashion-mnist-test", data.x_test, data.y_test, "testing", data_info)
        tracking.log_missing_steps(run.history)  # epochs an earlier attempt could not log
        yield
        probabilities, predict_seconds = predict_test(run.model, data.x_test)
        result = TrainedModel(run.model, run.history, run_id, device.backend(), run.precision,
                              device.describe(), run.train_seconds, run.compile_seconds(), run.name,
                              probabilities, predict_seconds,
                              probe_first_of_each_class(run.model, data.x_test, data.y_test))
        write_outputs(result, run.out_dir, data_info, config.evaluate.class_names, run.made_by)
        files = paths.RunFiles(run.out_dir)
        timings = {"train_seconds": round(result.train_seconds, 1),
                   "predict_seconds": round(result.predict_seconds, 2)}
        if result.compile_seconds is not None:
            timings["compile_seconds"] = round(result.compile_seconds, 2)
        tracking.log_results(timings)
        tracking.log_artifacts(files.history, files.architecture)
        examples = -(-2 // run.devices) * run.devices  # 2, or a multiple of the devices that split it
        tracking.log_keras_model(run.model, run.name, data.x_test[:examples], config.evaluate.class_names,
                                 device.pip_requirements())
        run.result = result


def predict_test(model: keras.Model, x_test: np.ndarray) -> tuple[np.ndarray, float]:
    """The trained model's class probabilities on the test set, (n, 10) float32 (also for a
    model trained in bfloat16), and the seconds ``predict`` took. Inference only: the model's
    weights and the training are as they were."""
    started = time.perf_counter()
    probabilities = np.asarray(model.predict(x_test, batch_size=1024, verbose=0), dtype="float32")
    return probabilities, time.perf_counter() - started


def probe_first_of_each_class(model: keras.Model, x_test: np.ndarray, y_test: np.ndarray) -> FeatureMaps:
    """The trained model's feature maps of the first test image of every class, in one batched
    probe (10 images): the analyse stage draws those of analyse.feature_map_classes."""
    classes, indices = first_of_each_class(y_test)
    images = x_test[indices]  # (k, 28, 28)
    # data parallel (device.training_setup), a batch divides evenly by the devices: the last
    # image repeated up to a multiple of them, its copies' maps dropped
    padding = -len(images) % device.data_parallel_devices()
    probed = probe_feature_maps(model, np.concatenate([images, np.repeat(images[-1:], padding, axis=0)]))
    return FeatureMaps(classes, indices, images, {name: maps[:len(images)] for name, maps in probed.items()})


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
        result.feature_maps.write(files.feature_maps)
        files.history.write_text(json.dumps(result.history, indent=1) + "\n")
        columns = list(dict.fromkeys(key for record in result.history for key in record))
        with files.history_csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(result.history)
        write_text(files.architecture, summary_text(result.model))
        RunInfo(mlflow_run_id=result.run_id, keras_backend=result.backend, precision=result.precision,
                device=result.device, train_seconds=round(result.train_seconds, 1),
                compile_seconds=None if result.compile_seconds is None else round(result.compile_seconds, 2),
                predict_seconds=round(result.predict_seconds, 2),
                epochs=len(result.history), parameters=result.model.count_params(),
                canonical_split=data_info.canonical_split, data_source=data_info.source,
                class_names=tuple(class_names), fingerprint=fingerprint).write(files.run_info)
