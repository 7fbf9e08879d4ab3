"""Training throughput: the train stage's own input path beside a plain `model.fit`.

For each variant, in one process, on the same machine, model and batch size: time N
training steps (after warm-up steps that compile the step function) through
`fmnist.training.fit` (uint8 -> float conversion, one-hot targets, the stage's
callback) and through `model.fit` on ready float arrays. Prints images/s and the
process's peak memory. Runs under any Keras backend (KERAS_BACKEND=jax on the GPU machine).

    python benchmarks/throughput.py [--steps 60] [--warmup 10] [--variants cnn2 ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from fmnist import device, paths, training  # noqa: E402
from fmnist.config import load_params  # noqa: E402
from fmnist.models import build_model  # noqa: E402
from fmnist.prepare import Dataset, load_prepared  # noqa: E402


def _images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The prepared training images when present, else random ones of the same shape."""
    if paths.PREPARED_ARRAYS.is_file():
        data = load_prepared(paths.PREPARED_ARRAYS)
        reps = -(-n // len(data.y_train))
        return np.tile(data.x_train, (reps, 1, 1))[:n], np.tile(data.y_train, reps)[:n]
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def _timed(step: callable) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def measure(variant: str, steps: int, warmup: int, batch_size: int) -> dict[str, float]:
    config = load_params(paths.PARAMS)
    train = dataclasses.replace(config.train, epochs=1, batch_size=batch_size)
    x, y = _images(steps * batch_size)
    empty = np.empty((0, 28, 28), np.uint8)

    def dataset(n: int) -> Dataset:
        return Dataset(x[:n], y[:n], empty, empty[:, 0, 0], empty, empty[:, 0, 0])

    results = {}
    # The stage's path: fmnist.training.fit with the stage's per-epoch recorder (no test set).
    keras.utils.set_random_seed(0)
    model = training.compile_model(build_model(config.variant(variant), variant), train)
    recorder = training.EpochRecorder(on_epoch=lambda record: None, test=None, batch_size=batch_size)
    training.fit(model, dataset(warmup * batch_size), train, [recorder])
    seconds = _timed(lambda: training.fit(model, dataset(steps * batch_size), train, [recorder]))
    results["stage"] = steps * batch_size / seconds
    # A plain model.fit on arrays that are already float and one-hot.
    keras.utils.set_random_seed(0)
    model = training.compile_model(build_model(config.variant(variant), variant), train)
    inputs, targets = training.to_inputs(x), training.to_targets(y)
    model.fit(inputs[:warmup * batch_size], targets[:warmup * batch_size], batch_size=batch_size,
              epochs=1, verbose=0)
    seconds = _timed(lambda: model.fit(inputs, targets, batch_size=batch_size, epochs=1, verbose=0))
    results["plain"] = steps * batch_size / seconds
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="timed training steps per variant")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size")
    parser.add_argument("--variants", nargs="*", default=None, help="default: all in params.yaml")
    args = parser.parse_args()
    config = load_params(paths.PARAMS)
    batch_size = args.batch_size or config.train.batch_size
    print(f"backend {device.backend()}, device {device.describe()}, batch {batch_size}, "
          f"{args.steps} timed steps after {args.warmup} warm-up steps, "
          f"data: {'prepared' if Path(paths.PREPARED_ARRAYS).is_file() else 'random'}")
    print(f"{'variant':<16}{'stage images/s':>16}{'plain fit images/s':>20}{'stage/plain':>13}")
    for variant in args.variants or list(config.variants):
        r = measure(variant, args.steps, args.warmup, batch_size)
        print(f"{variant:<16}{r['stage']:>16.0f}{r['plain']:>20.0f}{r['stage'] / r['plain']:>13.2f}",
              flush=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (max RSS) of this process: {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
