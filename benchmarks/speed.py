"""Training speed on this machine: the train stage's loop beside plain references, for each
backend and precision, same model, data, batch size; one process per backend.

    python benchmarks/speed.py [--backends tensorflow jax] [--precisions float32 mixed_bfloat16]
                               [--variants cnn2 cnn2_bn_skip] [--images 10000] [--epochs 1]
                               [--tf-threads default 2,1] [--repeats 1]

Per (backend, precision, variant), after one untimed epoch (compilation, warm-up):
- stage: ``fmnist.training.fit`` with the stage's epoch recorder and the monitored test set
  evaluated after every epoch (as the default params do; 1 test image per 6 training images,
  the proportion of a real epoch): images/s of training, the test evaluation included;
- plain: Keras' ``model.fit`` on ready float arrays, nothing else (benchmarks/reference.py).
--tf-threads compares TensorFlow's thread pools: ``default`` (TensorFlow's own choice) or
``INTRA,INTER`` (TF_NUM_INTRAOP_THREADS, TF_NUM_INTEROP_THREADS in the worker's environment);
each setting is a worker process of its own, and --repeats cycles through them that many times,
interleaved, so a drift of the machine's load falls on every setting alike. The thread settings
are TensorFlow's: other backends run once per repeat, their rows labelled ``-``.
The 50-epoch estimate is 50 x 60,000 images at the stage's rate. Writes
benchmarks/results/speed-<cpu>.json and prints a table; name the CPU with every number quoted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from fmnist.cli import QUIET_TENSORFLOW
from fmnist.device import cpu_model  # imports no Keras: each worker chooses its backend first

FULL_EPOCH_IMAGES = 60_000


def worker(args: argparse.Namespace) -> None:
    """One backend, in this process: every precision x variant; prints one JSON line each."""
    os.environ["KERAS_BACKEND"] = args.worker
    import keras

    from benchmarks import reference
    from fmnist import device, paths, recipes, training
    from fmnist.data import Dataset, load_prepared
    from fmnist.models import build_model
    from fmnist.params import load_params

    config = load_params(paths.PARAMS)
    data = load_prepared(paths.PREPARED_ARRAYS)
    x, y = data.x_train[:args.images], data.y_train[:args.images]
    # the test set in the proportion of a real epoch (10,000 test : 60,000 training images)
    n_test = len(y) * len(data.y_test) // len(data.y_train)
    empty = data.x_train[:0]
    subset = Dataset(x, y, empty, data.y_train[:0], data.x_test[:n_test], data.y_test[:n_test])
    test = (subset.x_test, training.to_targets(subset.y_test))
    for precision in args.precisions:
        for variant in args.variants:
            keras.mixed_precision.set_global_policy(precision)
            keras.utils.set_random_seed(0)
            spec = config.variant(variant)
            model = recipes.compile_model(build_model(spec, variant), config.recipe(variant),
                                          1 + args.epochs, len(y), config.train.batch_size)
            recorder = training.EpochRecorder(lambda record: None, test, config.train.batch_size)
            warm = dataclasses.replace(config.train, epochs=1)
            training.fit(model, subset, warm, [recorder])  # compiles; not timed
            timed = dataclasses.replace(config.train, epochs=1 + args.epochs)
            started = time.perf_counter()
            training.fit(model, subset, timed, [recorder], initial_epoch=1)
            stage = args.epochs * len(y) / (time.perf_counter() - started)
            plain = reference.plain_fit(spec, config.recipe(variant), x, y, config.train.batch_size,
                                        args.epochs, precision)
            print(json.dumps({"backend": device.backend(), "precision": precision, "variant": variant,
                              "stage_images_per_second": round(stage),
                              "plain_fit_images_per_second": round(plain)}), flush=True)


def thread_setting(text: str) -> str:
    """'default', or 'INTRA,INTER' with two positive whole numbers."""
    if text != "default" and not re.fullmatch(r"[1-9][0-9]*,[1-9][0-9]*", text):
        raise argparse.ArgumentTypeError(f"{text!r}: give 'default' or INTRA,INTER such as 2,1")
    return text


def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    if not re.fullmatch(r"[1-9][0-9]*", text):
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1")
    return int(text)


def run_worker(args: argparse.Namespace, backend: str, threads: str) -> list[dict]:
    """One worker process for a backend under a thread setting; its result rows."""
    command = [sys.executable, "-m", "benchmarks.speed", "--worker", backend, "--images",
               str(args.images), "--epochs", str(args.epochs), "--precisions", *args.precisions,
               "--variants", *args.variants]
    env = {**os.environ, **QUIET_TENSORFLOW}
    if threads != "default":
        env["TF_NUM_INTRAOP_THREADS"], env["TF_NUM_INTEROP_THREADS"] = threads.split(",")
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        print(f"{backend} (tf threads {threads}): failed\n{result.stderr[-2000:]}", file=sys.stderr)
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["tensorflow", "jax"])
    parser.add_argument("--precisions", nargs="+", default=["float32", "mixed_bfloat16"])
    parser.add_argument("--variants", nargs="+", default=["cnn2", "cnn2_bn_skip"])
    parser.add_argument("--images", type=positive_int, default=10_000,
                        help="training images per timed epoch")
    parser.add_argument("--epochs", type=positive_int, default=1, help="timed epochs")
    parser.add_argument("--tf-threads", nargs="+", default=["default"], type=thread_setting,
                        help="'default' or INTRA,INTER: TensorFlow's thread pools, one worker each")
    parser.add_argument("--repeats", type=positive_int, default=1,
                        help="cycles through the --tf-threads settings")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    for repeat in range(args.repeats):
        for backend in args.backends:
            for threads in args.tf_threads if backend == "tensorflow" else ["default"]:
                label = threads if backend == "tensorflow" else "-"
                rows += [{**row, "tf_threads": label, "repeat": repeat}
                         for row in run_worker(args, backend, threads)]
    if not rows:
        sys.exit("speed.py: every worker failed (see above); nothing written")
    cpu = cpu_model()
    print(f"CPU: {cpu}, {os.cpu_count()} cores; {args.images} training images x {args.epochs} timed "
          "epoch(s) after one untimed; batch from params.yaml")
    print(f"{'backend':<11}{'precision':<16}{'variant':<14}{'tf threads':<11}{'stage img/s':>12}"
          f"{'plain fit img/s':>16}{'stage/plain':>12}{'50 epochs (min)':>16}")
    for row in rows:
        minutes = 50 * FULL_EPOCH_IMAGES / row["stage_images_per_second"] / 60
        row["estimated_50_epoch_minutes"] = round(minutes, 1)
        print(f"{row['backend']:<11}{row['precision']:<16}{row['variant']:<14}{row['tf_threads']:<11}"
              f"{row['stage_images_per_second']:>12}{row['plain_fit_images_per_second']:>16}"
              f"{row['stage_images_per_second'] / row['plain_fit_images_per_second']:>12.2f}{minutes:>16.1f}")
    slug = re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-")
    out = args.out or Path("benchmarks/results") / f"speed-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu, "cores": os.cpu_count(), "images": args.images,
                               "timed_epochs": args.epochs, "repeats": args.repeats,
                               "finished": time.strftime("%FT%T"),
                               "rows": rows}, indent=1) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
