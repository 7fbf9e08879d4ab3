"""The GPU check: the real pipeline on a GPU, timed, beside plain reference loops.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu.json] [--budget-s 480]

Run by benchmarks/gpu_check.sh on a GPU machine (JAX with CUDA; the wheels for Keras, MLflow
and DVC travel in .whl/, the data in data/raw/). In one go:
1. the real train stage (`dvc repro --single-item train@<variant>`, all its seeds; the
   stage's own MLflow store, checkpoints and outputs) for the paper's variants
   (`analyse.paper_models`: the authors' three as shipped);
2. the plain references on the same data (benchmarks/reference.py): a jitted ``lax.scan``
   loop and Keras' ``model.fit``, float32 and mixed_bfloat16;
3. the rest of the default pipeline, stage by stage, variant after variant (as
   benchmarks/timed_repro.py), until ``--budget-s`` seconds of the whole check have passed
   (what is left then is not started; `dvc repro` finishes it later).
``gpu.json`` is rewritten after every step, so a check cut short still reports what it did.
Targets (issue 9): the paper's variants x 50 epochs in under 90 s of training in total; the
default pipeline (SVC aside) in under 5 minutes; the stage at >= 0.8x the best reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import timed_repro
from benchmarks.speed import positive_int
from benchmarks.timed_repro import DVC, ENV, stage_order
from fmnist import paths
from fmnist.files import write_json
from fmnist.params import load_params
from fmnist.records import MONITORED_TEST_ACCURACY, DataInfo

# dvc.lock as this check last left it, in an ignored folder: a second call on the same (warm)
# machine gets the tree's dvc.lock sent anew, and gpu_check.sh puts this one back first
SAVED_LOCK = Path(".gpu-state/dvc.lock")
DATA_STAGES = ("check_params", "download", "prepare")


def run_stage(name: str) -> dict:
    """timed_repro's `dvc repro --single-item name`, as a record; dvc.lock saved after it."""
    seconds, ran, code = timed_repro.run_stage(name)
    if Path("dvc.lock").is_file():
        SAVED_LOCK.parent.mkdir(exist_ok=True)
        shutil.copyfile("dvc.lock", SAVED_LOCK)
    return {"stage": name, "wall_seconds": round(seconds, 1), "ran": ran, "exit_code": code}


def trained_run(variant: str, seed: int) -> dict:
    """What the train stage recorded for one model (run.json, the last epoch of history.json)."""
    files = paths.run_files(variant, seed)
    run_info = files.read_run_info()
    history = json.loads(files.history.read_text())
    train_images = DataInfo.read(paths.PREPARED_INFO).sizes.train
    seconds = run_info.train_seconds
    return {"variant": variant, "seed": seed, "epochs": run_info.epochs, "train_seconds": seconds,
            "compile_seconds": run_info.compile_seconds,  # of train_seconds (shared by its seeds)
            "images_per_second": round(run_info.epochs * train_images / seconds),
            "final_test_accuracy": history[-1].get(MONITORED_TEST_ACCURACY),
            "backend": run_info.keras_backend, "precision": run_info.precision,
            "device": run_info.device, "parameters": run_info.parameters}


def references(config, variants: list[str], epochs: int, backend: str) -> dict:
    """images/s of the plain loops, per variant and precision, in this process (the scan loop
    under JAX only)."""
    from benchmarks import reference
    from fmnist.data import load_prepared

    data = load_prepared(paths.PREPARED_ARRAYS)
    results = {}
    for variant in variants:
        spec = config.variant(variant)
        for precision in ("float32", "mixed_bfloat16"):
            for name, loop in (("scan_loop", reference.scan_loop), ("plain_fit", reference.plain_fit)):
                if (name == "plain_fit" and precision != "float32") or (
                        name == "scan_loop" and backend != "jax"):
                    continue
                speed = loop(spec, config.recipe(variant), data.x_train, data.y_train,
                             config.train.batch_size, epochs, precision)
                results.setdefault(variant, {})[f"{name}_{precision}"] = round(speed)
                print(f"reference {variant} {name} {precision}: {speed:.0f} images/s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu.json"))
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="start no pipeline stage after this many seconds of the check")
    parser.add_argument("--reference-epochs", type=positive_int, default=5,
                        help="epochs of each plain reference loop (a whole number of at least 1)")
    args = parser.parse_args()
    started = time.perf_counter()
    config = load_params(paths.PARAMS)
    variants = list(config.analyse.paper_models)  # the paper's rows, as the report has them
    report: dict = {"finished": False, "host": platform.node(),
                    "params": {"backend": config.train.backend, "precision": config.train.precision,
                               "epochs": config.train.epochs, "batch_size": config.train.batch_size,
                               "seeds": list(config.train.seeds)}}
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        report["gpu"] = subprocess.run(query, capture_output=True, text=True).stdout.strip()
    else:
        report["gpu"] = "none (no nvidia-smi): a CPU rehearsal of the check"
    write_json(args.out, report)

    # 0. The params check, the data: data/raw travels with the working tree but DVC's cache
    # does not, and DVC counts an output missing from its cache as changed, so it would re-run
    # download (offline there: it fails, after deleting data/raw). Recording the carried
    # data/raw as download's output first makes DVC find it up to date; prepare runs.
    if paths.SOURCE_INFO.exists():
        subprocess.run([*DVC, "commit", "--force", "download"], env=ENV, check=False)
    report["data_stages"] = [run_stage(name) for name in DATA_STAGES]
    if any(step["exit_code"] for step in report["data_stages"]):
        write_json(args.out, report)
        sys.exit("ERROR: download/prepare failed: carry data/raw (run `dvc repro download` first)")

    # 1. The train stage, every paper variant (all its seeds in one process).
    report["stage_runs"] = []
    for variant in variants:
        step = run_stage(f"train@{variant}")
        if step["exit_code"] != 0:
            report["stage_runs"].append(step)
            write_json(args.out, report)
            sys.exit(f"ERROR: train@{variant} failed; see the output above")
        for seed in config.train.seeds:  # the stage's wall time is the first seed's row's
            report["stage_runs"].append({**trained_run(variant, seed), "stage_ran": step["ran"],
                                         "stage_wall_seconds": step["wall_seconds"]
                                         if seed == config.train.seeds[0] else 0.0})
        write_json(args.out, report)
    stage_runs = report["stage_runs"]
    report["device"] = stage_runs[0]["device"]
    report["backend"], report["precision"] = stage_runs[0]["backend"], stage_runs[0]["precision"]
    report["paper_variants_train_seconds"] = round(sum(r["train_seconds"] for r in stage_runs), 1)
    report["paper_variants_stage_wall_seconds"] = round(sum(r["stage_wall_seconds"] for r in stage_runs), 1)

    # 2. The plain references, in this process (the stages have exited: the GPU is free).
    os.environ["KERAS_BACKEND"] = report["backend"]
    report["reference"] = references(config, variants, args.reference_epochs, report["backend"])
    report["stage_vs_best_reference"] = {
        r["variant"]: round(r["images_per_second"] / max(report["reference"][r["variant"]].values()), 3)
        for r in stage_runs}
    write_json(args.out, report)

    # 3. The rest of the default pipeline, as far as the budget allows.
    listed = subprocess.run([*DVC, "stage", "list", "--name-only"], capture_output=True, text=True,
                            check=True, env=ENV).stdout.split()
    pipeline_started = time.perf_counter()
    report["pipeline"] = {"stages": [], "skipped_for_budget": []}
    for name in stage_order(listed, list(config.variants)):
        if name in DATA_STAGES or (name == "baseline" and paths.BASELINE_METRICS.is_file()):
            # data: step 0. The SVC is a CPU job (12 min on 2 cores): its committed result stands
            continue
        if time.perf_counter() - started > args.budget_s:
            report["pipeline"]["skipped_for_budget"].append(name)
            continue
        step = run_stage(name)
        report["pipeline"]["stages"].append(step)
        report["pipeline"]["seconds_so_far"] = round(time.perf_counter() - pipeline_started, 1)
        write_json(args.out, report)
        if step["exit_code"] != 0:
            break
    ran = report["pipeline"]["stages"]
    # The paper variants' trainings ran in step 1; their time counts towards the pipeline's.
    report["pipeline"]["total_seconds_with_step1"] = round(
        sum(s["wall_seconds"] for s in ran) + report["paper_variants_stage_wall_seconds"]
        + sum(s["wall_seconds"] for s in report["data_stages"]), 1)
    report["finished"] = (not report["pipeline"]["skipped_for_budget"]
                          and all(s["exit_code"] == 0 for s in ran))
    report["check_seconds"] = round(time.perf_counter() - started, 1)
    write_json(args.out, report)
    print(json.dumps({k: report[k] for k in ("gpu", "paper_variants_train_seconds",
                                             "stage_vs_best_reference", "finished")}, indent=1))


if __name__ == "__main__":
    main()
