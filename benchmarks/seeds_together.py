"""One variant's seeds under JAX: trained together (one vmapped loop) vs one after the other.

    python -m benchmarks.seeds_together [--variant cnn2] [--seeds 0 1 2] [--epochs 2]
                                        [--images 2000] [--out benchmarks/results/seeds_together-LABEL.json]

Each mode trains the seeds of one variant the way the train stage does (fmnist.training.
train_seeds, JAX forced as ``train.backend: jax`` forces it) in a fresh Python process with
its own MLflow store, on fabricated images (tests/conftest.py's tiny_images, 80 % train),
the real params shrunk as the tests shrink them. "one after the other" is the same code with
the grouping turned off (each seed ``train_variant``'s lone loop); "together" is the train
stage's CPU default (the seeds take turns through one compiled step), "together-vmapped" the
accelerators' (one vmapped step for all the seeds), forced on the CPU. Per mode: the process's
wall time (imports, compiles, MLflow, model logging: the stage less DVC), train_seeds' time,
and the loop seconds (together: the shared loop, once; one after the other: the seeds' sum).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.stage_cost import TRAIN_FRACTION, lscpu_model, tiny_params
from fmnist import data
from fmnist.files import write_json
from fmnist.idx import write_idx
from tests.conftest import real_params, tiny_images

REPO = Path(__file__).resolve().parents[1]
MODES = ("one-after-the-other", "together", "together-vmapped")

CHILD = """
import json, sys, time
from pathlib import Path
import yaml
from fmnist import device
from fmnist.config import parse_params

config = parse_params(yaml.safe_load(Path("params.yaml").read_text()))
device.select_backend(config.train.backend)
from fmnist import training
from fmnist.data import load_prepared
from fmnist.records import DataInfo

if sys.argv[1] == "one-after-the-other":
    training._trains_together = lambda: False
if sys.argv[1] == "together-vmapped":  # the accelerators' way, on the CPU
    real = training.fit_seeds
    training.fit_seeds = lambda *args, **kwargs: real(*args, **kwargs, vmapped=True)
data, info = load_prepared(Path("d.npz")), DataInfo.read(Path("i.json"))
started = time.perf_counter()
results = training.train_seeds(config, sys.argv[2], data, info, "bench")
print("RESULT " + json.dumps({"train_seeds_seconds": time.perf_counter() - started,
                              "train_seconds": {r.name: r.train_seconds for r in results},
                              "last_epoch": {r.name: r.history[-1] for r in results}}))
"""


def prepare_folder(folder: Path, params: dict, images: int) -> None:
    """``folder``: params.yaml, and the fabricated images prepared as the prepare stage packs them."""
    from fmnist.config import parse_params
    from fmnist.download import download
    from fmnist.prepare import prepare

    local = folder / "local"
    local.mkdir(parents=True)
    train_per_class = round(images * TRAIN_FRACTION / data.NUM_CLASSES)
    for (name_images, name_labels), (per_class, seed) in (
            ((data.TRAIN_IMAGES, data.TRAIN_LABELS), (train_per_class, 1)),
            ((data.TEST_IMAGES, data.TEST_LABELS), (images // data.NUM_CLASSES - train_per_class, 2))):
        x, y = tiny_images(per_class, seed)
        write_idx(local / name_images, x)
        write_idx(local / name_labels, y)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    config = parse_params(params)
    download(config.data, folder / "raw", local_dir=local)
    prepare(folder / "raw", folder / "d.npz", folder / "i.json", config.data.validation_size,
            config.data.validation_seed)


def run_mode(source: Path, mode: str, variant: str, attempt: int) -> dict:
    folder = source.parent / f"{mode}-{attempt}"
    folder.mkdir()
    for name in ("params.yaml", "d.npz", "i.json"):
        (folder / name).write_bytes((source / name).read_bytes())
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env.update(KERAS_BACKEND="jax", DVC_ROOT=str(folder), PYTHONPATH=f"{REPO / 'src'}{os.pathsep}{REPO}",
               TF_CPP_MIN_LOG_LEVEL="2")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, mode, variant], cwd=folder, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{mode} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    seconds = list(result["train_seconds"].values())
    loop = sum(seconds) if mode == "one-after-the-other" else max(seconds)
    print(f"{mode}: process {wall:.1f} s, train_seeds {result['train_seeds_seconds']:.1f} s, "
          f"loop {loop:.1f} s", flush=True)
    return {"process_seconds": round(wall, 2),
            "train_seeds_seconds": round(result["train_seeds_seconds"], 2),
            "loop_seconds": round(loop, 2), **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="cnn2")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--images", type=int, default=2000, help="fabricated images, 80 %% train")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each mode, alternating")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    params = tiny_params(real_params(), [args.variant], args.seeds, args.epochs)
    params["train"]["backend"] = "jax"
    report = {"cpu": lscpu_model(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "settings": {"variant": args.variant, "seeds": args.seeds, "epochs": args.epochs,
                           "images": args.images, "batch_size": params["train"]["batch_size"],
                           "backend": "jax (CPU)"},
              "load_average": {"before": [round(x, 2) for x in os.getloadavg()]}}
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source"
        source.mkdir()
        prepare_folder(source, params, args.images)
        runs = {mode: [] for mode in MODES}
        for attempt in range(args.repeat):
            for mode in MODES if attempt % 2 == 0 else MODES[::-1]:
                runs[mode].append(run_mode(source, mode, args.variant, attempt))
    report["load_average"]["after"] = [round(x, 2) for x in os.getloadavg()]
    report["runs"] = runs
    report["median"] = {mode: {key: statistics.median(run[key] for run in runs[mode])
                               for key in ("process_seconds", "train_seeds_seconds", "loop_seconds")}
                        for mode in MODES}
    alone = report["median"]["one-after-the-other"]
    report["speedup_over_one_after_the_other"] = {
        mode: {key: round(alone[key] / report["median"][mode][key], 2)
               for key in ("loop_seconds", "process_seconds")} for mode in MODES[1:]}
    print(f"medians of {args.repeat}, as fast as one after the other: "
          f"{report['speedup_over_one_after_the_other']}")
    if args.out:
        write_json(args.out, report)


if __name__ == "__main__":
    main()
