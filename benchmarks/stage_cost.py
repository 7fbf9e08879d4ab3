"""What the pipeline costs beyond the training itself: the whole default pipeline, every
stage, on tiny data, from a fresh repository of one commit; each stage's wall time.

    python -m benchmarks.stage_cost [--ref HEAD] [--out benchmarks/results/stage_cost-LABEL.json]
                                    [--variants cnn2 ...] [--seeds 0 ...] [--epochs 1] [--images 2000]
    python -m benchmarks.stage_cost --compare before.json after.json

The ref's dvc.yaml, stages/, src/, plot_templates/, .gitignore, params.yaml and
data/local/README.md (``git archive``: committed files only) go to a temporary git + DVC
repository. Its params.yaml is the ref's, shrunk as the tests shrink it (local data, the
baseline on 200 images) to every variant x 3 seeds x 1 epoch, the ref's batch size; the data
are 2,000 fabricated images (tests/conftest.py's tiny_images, 80 % train). One `dvc repro`
runs there, its stages importing that ref's code (PYTHONPATH=<repository>/src, checked), and
every line it prints is timestamped as it arrives. A stage's time runs from DVC's
"Running stage 'X':" to the next such line (its command and DVC's hashing of its outputs);
a line "[timing] {json}" that a stage prints is kept with it.

On data this small a stage's time is nearly all fixed cost: starting Python, importing
TensorFlow, building and compiling the model, MLflow, DVC. A stage's fixed cost here is its
time less the "loop" seconds of its [timing] lines (its whole time where it prints none).
--compare prints the ratio of the totals and of the mean fixed cost per stage.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from fmnist import data, repro
from fmnist.files import read_json, write_json
from fmnist.idx import write_idx
from tests.conftest import only_variants, shrink, tiny_images

REPO = Path(__file__).resolve().parents[1]
ARCHIVED = ("dvc.yaml", "stages", "src", "plot_templates", ".gitignore", "params.yaml",
            "data/local/README.md")
TIMING = "[timing]"
TRAIN_FRACTION = 0.8
BASELINE_IMAGES = 200


def lscpu_model() -> str:
    """lscpu's "Model name" (the CPU), or the platform's word for it."""
    try:
        listed = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in listed.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            return value.strip()
    return platform.processor() or "unknown"


def git(*args: str, check: bool = True, text: bool = False) -> subprocess.CompletedProcess:
    """git in this repository (where the refs are)."""
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, check=check, text=text)


def make_repository(commit: str, dest: Path, params: dict, images: int) -> None:
    """``dest``: a git + DVC repository of ``commit``'s pipeline files, ``params`` and
    ``images`` fabricated images in data/local/."""
    present = [path for path in ARCHIVED
               if git("cat-file", "-e", f"{commit}:{path}", check=False).returncode == 0]
    archive = git("archive", "--format=tar", commit, *present).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    local = dest / "data" / "local"
    local.mkdir(parents=True, exist_ok=True)
    train_per_class = round(images * TRAIN_FRACTION / data.NUM_CLASSES)
    test_per_class = images // data.NUM_CLASSES - train_per_class
    for (name_images, name_labels), (per_class, seed) in (
            ((data.TRAIN_IMAGES, data.TRAIN_LABELS), (train_per_class, 1)),
            ((data.TEST_IMAGES, data.TEST_LABELS), (test_per_class, 2))):
        x, y = tiny_images(per_class, seed)
        write_idx(local / name_images, x)
        write_idx(local / name_labels, y)
    for command in (["git", "init", "-q"], ["git", "config", "user.email", "bench@example.com"],
                    ["git", "config", "user.name", "bench"], ["dvc", "init", "-q"],
                    ["dvc", "config", "core.analytics", "false"], ["git", "add", "-A"],
                    ["git", "commit", "-qm", f"pipeline of {commit}"]):
        subprocess.run(command, cwd=dest, capture_output=True, check=True, env=environment(dest))


def environment(repository: Path) -> dict[str, str]:
    """The stages' environment: this interpreter's bin first on PATH (python, dvc), the
    repository's own src/ first on the import path (not the venv's editable install)."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(repository / "src")
    env["PYTHONUNBUFFERED"] = "1"  # each line as it is printed, for its timestamp
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def tiny_params(raw: dict, variants: list[str] | None, seeds: list[int], epochs: int) -> dict:
    """The ref's params, shrunk as the tests shrink them; the ref's batch size kept."""
    params = shrink(raw)
    for section, keys in params.items():  # keys shrink sets that an older ref's params lack
        if isinstance(keys, dict):
            for key in [k for k in keys if k not in raw.get(section, {})]:
                del keys[key]
    params["train"].update(epochs=epochs, seeds=seeds, batch_size=raw["train"]["batch_size"])
    params["baseline"]["train_size"] = BASELINE_IMAGES
    return only_variants(params, variants) if variants else params


def stage_times(lines: list[tuple[float, str]], end: float) -> list[dict[str, Any]]:
    """Per stage, in the order DVC ran them, from `dvc repro`'s (seconds, line) output:
    {"stage", "seconds" (to the next stage's start, or ``end``), "timing": [its [timing]
    lines' JSON]}."""
    stages: list[dict[str, Any]] = []
    starts = []
    for seconds, line in lines:
        match = repro.RUNNING.search(line)
        if match:
            stages.append({"stage": match.group(1), "timing": []})
            starts.append(seconds)
        elif line.startswith(TIMING) and stages:
            try:
                stages[-1]["timing"].append(json.loads(line[len(TIMING):]))
            except json.JSONDecodeError:
                pass  # not ours to judge: the time is still measured
    for stage, start, stop in zip(stages, starts, [*starts[1:], end], strict=True):
        stage["seconds"] = round(stop - start, 2)
    return stages


def lines_start(lines: list[tuple[float, str]], end: float) -> float:
    """Seconds before DVC ran its first stage (``end`` if it ran none)."""
    return next((seconds for seconds, line in lines if repro.RUNNING.search(line)), end)


def fixed_cost(stage: dict[str, Any]) -> float:
    """A stage's seconds less the training loop's, where its [timing] lines give them."""
    return stage["seconds"] - sum(float(t.get("loop", 0.0)) for t in stage["timing"])


def run_repro(repository: Path, log: Path) -> tuple[list[tuple[float, str]], float, int]:
    """`dvc repro` in ``repository``, each output line timestamped (seconds from its start)
    into ``log`` and echoed; (lines, total seconds, exit code)."""
    lines = []
    started = time.perf_counter()
    with subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=repository, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=environment(repository)) as process, \
            log.open("w") as out:
        for line in process.stdout:
            seconds = time.perf_counter() - started
            lines.append((seconds, line.rstrip("\n")))
            out.write(f"{seconds:9.3f}  {line}")
            out.flush()
            print(f"{seconds:8.1f}  {line}", end="", flush=True)
    return lines, time.perf_counter() - started, process.returncode


def imported_from(repository: Path) -> str:
    """Where the stages' ``import fmnist`` resolves (must be the repository's src/)."""
    return subprocess.run([sys.executable, "-c", "import fmnist; print(fmnist.__file__)"],
                          cwd=repository, capture_output=True, text=True, check=True,
                          env=environment(repository)).stdout.strip()


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{report['commit'][:12]} on {report['cpu']}: {report['stage_count']} stages")
    for stage in report["stages"]:
        timing = "  ".join(f"{key} {value}" for t in stage["timing"] for key, value in t.items())
        print(f"  {stage['stage']:<40} {stage['seconds']:8.1f} s  {timing}")
    print(f"  {'total (dvc repro)':<40} {report['total_seconds']:8.1f} s")
    print(f"  {'mean fixed cost per stage':<40} {report['mean_fixed_cost_seconds']:8.1f} s")


def by_kind(report: dict[str, Any]) -> dict[str, tuple[int, float]]:
    """Stage name before '@' (train, evaluate, ...) -> (stages, seconds)."""
    kinds: dict[str, tuple[int, float]] = {}
    for stage in report["stages"]:
        kind = repro.kind(stage["stage"])
        count, seconds = kinds.get(kind, (0, 0.0))
        kinds[kind] = (count + 1, seconds + stage["seconds"])
    return kinds


def compare(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The lines --compare prints: per stage kind, the totals and the mean fixed cost, with
    the ratio after / before."""
    lines = [f"before: {before['commit'][:12]} ({before['cpu']}, {before['date']})",
             f"after:  {after['commit'][:12]} ({after['cpu']}, {after['date']})"]
    if before["cpu"] != after["cpu"] or before["settings"] != after["settings"]:
        lines.append("WARNING: different CPUs or settings; the ratios compare unlike runs")
    lines.append(f"{'':<26}{'before':>16}{'after':>16}{'after/before':>14}")
    a_kinds, b_kinds = by_kind(before), by_kind(after)
    for kind in dict.fromkeys([*a_kinds, *b_kinds]):
        (a_n, a_s), (b_n, b_s) = a_kinds.get(kind, (0, 0.0)), b_kinds.get(kind, (0, 0.0))
        ratio = f"{b_s / a_s:14.2f}" if a_s else f"{'-':>14}"
        lines.append(f"{kind:<26}{f'{a_n} x, {a_s:.1f} s':>16}{f'{b_n} x, {b_s:.1f} s':>16}{ratio}")
    for label, key in (("total", "total_seconds"), ("mean fixed cost / stage", "mean_fixed_cost_seconds")):
        lines.append(f"{label:<26}{before[key]:>14.1f} s{after[key]:>14.1f} s"
                     f"{after[key] / before[key]:14.2f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="HEAD", help="the commit to measure (default HEAD)")
    parser.add_argument("--out", type=Path, help="the JSON report (default "
                        "benchmarks/results/stage_cost-<commit>.json); the timestamped log beside it")
    parser.add_argument("--variants", nargs="+", metavar="VARIANT",
                        help="only these variants (default: all of the ref's params.yaml)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="SEED")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--images", type=int, default=2000, help="fabricated images, 80 %% train")
    parser.add_argument("--keep", action="store_true", help="keep the temporary repository")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"),
                        help="print the ratios of two reports instead of running")
    args = parser.parse_args()
    if args.compare:
        before, after = (read_json(path, "a stage_cost report") for path in args.compare)
        print("\n".join(compare(before, after)))
        return
    if args.images < 10 * data.NUM_CLASSES:
        parser.error(f"--images: at least {10 * data.NUM_CLASSES} (a few per class in train and test)")
    commit = git("rev-parse", "--verify", f"{args.ref}^{{commit}}", text=True).stdout.strip()
    out = args.out or REPO / "benchmarks" / "results" / f"stage_cost-{commit[:12]}.json"
    raw = yaml.safe_load(git("show", f"{commit}:params.yaml", text=True).stdout)
    unknown = sorted(set(args.variants or ()) - set(raw["variants"]))
    if unknown:
        parser.error(f"--variants: {', '.join(unknown)} not in {args.ref}'s params.yaml "
                     f"({', '.join(raw['variants'])})")
    params = tiny_params(raw, args.variants, args.seeds, args.epochs)
    settings = {"variants": list(params["variants"]), "seeds": args.seeds, "epochs": args.epochs,
                "batch_size": params["train"]["batch_size"], "images": args.images,
                "baseline_train_size": BASELINE_IMAGES}
    work = Path(tempfile.mkdtemp(prefix="stage-cost-"))
    repository = work / "repo"
    repository.mkdir()
    try:
        make_repository(commit, repository, params, args.images)
        fmnist_file = imported_from(repository)
        if not Path(fmnist_file).is_relative_to(repository / "src"):
            sys.exit(f"ERROR: the stages would import fmnist from {fmnist_file}, not {repository / 'src'}")
        print(f"{commit[:12]} in {repository}: dvc repro ({len(settings['variants'])} variants x "
              f"{len(args.seeds)} seeds x {args.epochs} epoch(s), {args.images} images)", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        load_before = os.getloadavg()
        lines, total, code = run_repro(repository, out.with_suffix(".log"))
        stages = stage_times(lines, total)
        report = {
            "cpu": lscpu_model(), "cpus": len(os.sched_getaffinity(0)), "date": time.strftime("%FT%T"),
            "ref": args.ref, "commit": commit, "settings": settings,
            "load_average": {"before": [round(v, 2) for v in load_before],
                             "after": [round(v, 2) for v in os.getloadavg()]},
            "fmnist_imported_from": fmnist_file, "exit_code": code,
            "stage_count": len(stages), "total_seconds": round(total, 2),
            # DVC's start: reading dvc.yaml, checking what changed (in the total, in no stage)
            "before_first_stage_seconds": round(lines_start(lines, total), 2),
            "mean_fixed_cost_seconds": round(sum(map(fixed_cost, stages)) / max(len(stages), 1), 2),
            "stages": stages, "params": params}
        write_json(out, report)
        print_table(report)
        print(f"\n{out} (log: {out.with_suffix('.log')})")
        if code != 0:
            sys.exit(f"ERROR: dvc repro failed (exit {code}); its output: {out.with_suffix('.log')}")
    finally:
        if args.keep:
            print(f"kept: {repository}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
