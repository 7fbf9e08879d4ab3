"""Run the pipeline one stage at a time and record each stage's wall time.

    python benchmarks/timed_repro.py [--out benchmarks/results/repro_timing.json]
                                     [--variants cnn2 cnn2_bn ...] [--skip-cache-lost]

Equivalent to `dvc repro` (each stage runs through `dvc repro --single-item`, so DVC still
skips stages that are up to date): each variant's train then evaluate stage (all its seeds),
so a re-run resumes where it stopped. The
timing file is rewritten after every stage; stages DVC skipped are recorded as skipped.
With --variants, only those variants' train and evaluate stages run (after the first
stages), so that a long reference run goes group by group: the stages after them (analyse,
register) need every variant and run in the call without --variants.

With --skip-cache-lost, a stage whose only change is outputs missing from DVC's cache (run
on another machine, its dvc.lock entry and git-tracked outputs committed) is not run again:
a reference run can go on over machines that share git but no DVC cache or remote. The
report needs none of those outputs (docs/pipeline.md); `dvc repro` would run them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fmnist import paths
from fmnist.files import read_json, write_json
from fmnist.params import load_params

FIRST = ("check_params", "download", "prepare", "baseline")
# DVC and the stage commands (`python stages/...`) from this interpreter's environment.
DVC = [sys.executable, "-m", "dvc"]
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def stage_order(names: list[str], variants: list[str], only: list[str] | None = None) -> list[str]:
    """check_params, download, prepare, baseline, then each variant's train and evaluate (all
    its seeds), then the rest; with ``only``, no rest and only those variants' stages."""
    def wanted(name: str) -> bool:
        _, _, variant = name.partition("@")
        if only is None:
            return True
        return variant in only if variant else name in FIRST

    def key(name: str) -> tuple:
        base, _, variant = name.partition("@")
        if name in FIRST:
            return (0, FIRST.index(name))
        if variant:
            return (1, variants.index(variant), base != "train")
        return (2, names.index(name))
    return sorted(filter(wanted, names), key=key)


def cache_lost_outputs(status: list, lost: set[str]) -> list[str] | None:
    """From `dvc status --json <stage>`'s entry for one stage: the outputs it would restore
    from a cache that does not hold them, when that is all that is out of date (deps, params
    and command as recorded; a dep missing only if it is such an output of an earlier stage,
    in ``lost``); else None. [] when the stage is up to date."""
    outputs = []
    for entry in status:
        if not isinstance(entry, dict):
            return None  # e.g. "changed command", "always changed"
        for kind, changes in entry.items():
            if kind == "changed outs" and all(state == "not in cache" for state in changes.values()):
                outputs += list(changes)
            elif not (kind == "changed deps" and all(
                    state == "deleted" and path in lost for path, state in changes.items())):
                return None
    return outputs


def skip_reason(name: str, status: list, lost: set[str]) -> str | None:
    """Why --skip-cache-lost does not run ``name`` (None: run it). A train or evaluate stage
    whose only change is its outputs missing from the cache ran elsewhere (they join
    ``lost``); register needs every model, so not while some are lost. The first stages
    (download, prepare, ...) run: the later ones need their outputs here."""
    if "@" in name:
        outputs = cache_lost_outputs(status, lost)
        if status and outputs is not None:
            lost.update(outputs)
            return f"ran elsewhere ({', '.join(outputs) or 'its inputs'} not in DVC's cache)"
    elif name == "register" and lost:
        return f"needs every model; {len(lost)} outputs are not in DVC's cache (`dvc pull` them first)"
    return None


def stage_status(name: str) -> list:
    listed = subprocess.run([*DVC, "status", "--json", name], capture_output=True, text=True,
                            check=True, env=ENV).stdout
    return json.loads(listed or "{}").get(name, [])


def run_stage(name: str) -> tuple[float, bool, int]:
    """`dvc repro --single-item name`, its output passed through; (seconds, whether it ran,
    DVC's exit code)."""
    started = time.perf_counter()
    ran = False
    with subprocess.Popen([*DVC, "repro", "--single-item", name], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=ENV) as process:
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            ran = ran or f"Running stage '{name}'" in line
    return time.perf_counter() - started, ran, process.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/repro_timing.json"))
    parser.add_argument("--variants", nargs="+", metavar="VARIANT",
                        help="only these variants' train and evaluate stages (default: all stages)")
    parser.add_argument("--skip-cache-lost", action="store_true",
                        help="do not re-run a stage whose only change is outputs missing from DVC's cache")
    args = parser.parse_args()
    config = load_params(paths.PARAMS)
    unknown = sorted(set(args.variants or ()) - set(config.variants))
    if unknown:
        sys.exit(f"ERROR: --variants: {', '.join(unknown)} not in params.yaml's variants "
                 f"({', '.join(config.variants)})")
    listed = subprocess.run([*DVC, "stage", "list", "--name-only"], capture_output=True,
                            text=True, check=True, env=ENV).stdout.split()
    timings = read_json(args.out, "a previous timing")["stages"] if args.out.exists() else {}
    lost: set[str] = set()
    for name in stage_order(listed, list(config.variants), args.variants):
        print(f"== {name}", flush=True)
        reason = skip_reason(name, stage_status(name), lost) if args.skip_cache_lost else None
        if reason:
            timings.setdefault(name, {"seconds": None, "note": f"not run: {reason}"})
            print(f"== {name}: not run: {reason}", flush=True)
        else:
            seconds, ran, code = run_stage(name)
            if code != 0:
                sys.exit(f"ERROR: stage {name} failed (exit {code}); fix it and re-run this script: "
                         "finished stages are not run again")
            if ran:
                timings[name] = {"seconds": round(seconds, 1), "finished": time.strftime("%FT%T")}
            else:
                timings.setdefault(name, {"seconds": None, "note": "up to date, not run here"})
            print(f"== {name}: {seconds:.1f} s ({'ran' if ran else 'up to date'})", flush=True)
        write_json(args.out, {"command": "dvc repro --single-item <stage>", "stages": timings})


if __name__ == "__main__":
    main()
