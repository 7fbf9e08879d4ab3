"""`make run`'s `dvc repro`, with a progress line over the whole pipeline at each stage start.

    python -m fmnist.repro [dvc repro arguments]

It asks DVC which stages will run (`dvc repro --dry` with the same arguments: the stages
changed now, plus those after them, which a dry run cannot see change), then runs
`dvc repro`, passing its output through as it comes, and before each stage's
"Running stage" line prints one line of its own:

    [pipeline 4/21] train@cnn2_bn - 3 done, about 40 min left

The time left adds up each stage's duration measured on this machine in earlier runs
(STAGE_SECONDS, not in git); a stage never timed takes the mean of its kind (``train@...``),
and a kind never timed is named instead. The count corrects itself as DVC goes: a stage it
skips leaves the count, one it runs unforeseen joins it. The exit code is `dvc repro`'s;
Ctrl-C reaches DVC and the running stage as without this wrapper (a stopped train stage keeps
its checkpoint). The stages write to a pipe, not to the terminal: their lines are those of a
log (Keras' per-step bar is left out; the epoch line is there).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from fmnist import paths
from fmnist.files import write_json

# Each stage's last measured duration on this machine: {stage: seconds}. In DVC's own
# temporary folder, which git ignores; a clone measures afresh.
STAGE_SECONDS = Path(".dvc/tmp/fmnist-stage-seconds.json")
# Outputs whose content never changes (check_params', see dvc.yaml): a stage that runs does
# not make the stages after it run through them.
UNCHANGING_OUTPUTS = {paths.PARAMS_CHECKED.as_posix()}

RUNNING = re.compile(r"^Running stage '(.+)':$")
SKIPPED = re.compile(r"^Stage '(.+)' didn't change, skipping$")
QUOTED = re.compile(r"'([^']+)'")


def kind(stage: str) -> str:
    """``train@cnn2`` -> ``train``; a stage without a matrix is its own kind."""
    return stage.split("@", 1)[0]


def estimate(stage: str, seconds: dict[str, float]) -> float | None:
    """The stage's measured duration, else the mean of its kind's, else None."""
    if stage in seconds:
        return seconds[stage]
    same_kind = [value for name, value in seconds.items() if kind(name) == kind(stage)]
    return sum(same_kind) / len(same_kind) if same_kind else None


def rough(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 1:
        return "under a minute"
    if minutes < 60:
        return f"about {minutes} min"
    return f"about {minutes // 60} h {minutes % 60:02d} min"


def progress_line(stage: str, done: int, to_go: Iterable[str], seconds: dict[str, float]) -> str:
    """The line printed as ``stage`` starts, ``done`` stages before it and ``to_go`` after."""
    left = [stage, *to_go]
    estimates = {name: estimate(name, seconds) for name in left}
    untimed = ", ".join(sorted({kind(name) for name, value in estimates.items() if value is None}))
    if all(value is None for value in estimates.values()):
        eta = "no ETA yet (not timed on this machine yet)"
    else:
        eta = f"{rough(sum(value for value in estimates.values() if value is not None))} left"
        if untimed:
            eta += f" + {untimed} (not timed on this machine yet)"
    return f"[pipeline {done + 1}/{done + len(left)}] {stage} - {done} done, {eta}"


def _dvc(args: list[str], **kwargs) -> subprocess.Popen:
    # unbuffered: the stages' lines come through as they are printed
    return subprocess.Popen(["dvc", "repro", *args], env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            **kwargs)


def planned(args: list[str]) -> list[str] | None:
    """The stages `dvc repro args` will run: those its dry run finds changed, and those after
    them; None when the dry run names no stage (the real run then says why).

    A dry run stops at a stage whose input an earlier stage makes and has not made yet (a
    fresh clone: data/raw): with --keep-going it names that stage and those it skips."""
    dry = _dvc(["--dry", "--keep-going", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
               text=True, encoding="utf-8", errors="replace")
    output, _ = dry.communicate()
    changed: set[str] = set()
    unchanged: set[str] = set()
    for line in output.splitlines():
        if running := RUNNING.search(line):
            changed.add(running.group(1))
        elif skipped := SKIPPED.search(line):
            unchanged.add(skipped.group(1))
        elif "failed to reproduce" in line or "skipped due to this failure" in line:
            changed.update(QUOTED.findall(line))
    if not changed | unchanged:
        return None
    return _with_downstream(changed, changed | unchanged)


def _with_downstream(changed: set[str], plan: set[str]) -> list[str]:
    """The stages of ``plan`` that are in ``changed`` or after one of them, directly or not
    (DVC's stage graph), in the graph's order."""
    from dvc.repo import Repo

    with Repo() as repo:
        graph = repo.index.graph
    found: set[str] = set()
    todo = [stage for stage in graph if stage.addressing in changed]
    while todo:
        stage = todo.pop()
        if stage.addressing in found or stage.addressing not in plan:
            continue
        found.add(stage.addressing)
        if any(out.def_path not in UNCHANGING_OUTPUTS for out in stage.outs):
            todo.extend(graph.predecessors(stage))  # the stages that depend on it
    return [stage.addressing for stage in graph if stage.addressing in found]


def read_seconds(path: Path) -> dict[str, float]:
    try:
        return {str(k): float(v) for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


class Progress:
    """Follows `dvc repro`'s output lines: the progress line at each stage start, each
    finished stage's duration recorded in ``seconds_file``."""

    def __init__(self, to_go: list[str], seconds_file: Path):
        self.to_go = list(to_go)
        self.seconds_file = seconds_file
        self.seconds = read_seconds(seconds_file)
        self.done = 0
        self.current: tuple[str, float] | None = None

    def line(self, text: str, now: float) -> str | None:
        """What to print before DVC's line ``text``, if anything."""
        if skipped := SKIPPED.search(text):
            self._drop(skipped.group(1))
            return None
        running = RUNNING.search(text)
        if not running:
            return None
        stage = running.group(1)
        self.finished(now)
        self._drop(stage)
        self.current = (stage, now)
        return progress_line(stage, self.done, self.to_go, self.seconds)

    def finished(self, now: float) -> None:
        """The current stage has ended well: its duration is recorded."""
        if self.current is None:
            return
        stage, started = self.current
        self.seconds[stage] = round(now - started, 1)
        self.done += 1
        self.current = None
        write_json(self.seconds_file, self.seconds)

    def _drop(self, stage: str) -> None:
        if stage in self.to_go:
            self.to_go.remove(stage)


def run(args: list[str]) -> int:
    """`dvc repro args` with the progress lines; returns its exit code."""
    to_go = planned(args)
    # Ctrl-C reaches DVC and its stage from the terminal; here it must only not stop the reading
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        if to_go is None:
            return _dvc(args).wait()
        progress = Progress(to_go, STAGE_SECONDS)
        dvc = _dvc(args, stdout=subprocess.PIPE, text=True, encoding="utf-8", errors="replace")
        for text in dvc.stdout:
            line = progress.line(text.rstrip("\n"), time.monotonic())
            if line:
                sys.stdout.write(line + "\n")
            sys.stdout.write(text)
            sys.stdout.flush()
        code = dvc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    if code == 0:
        progress.finished(time.monotonic())
    return code


def main() -> None:
    try:
        sys.exit(run(sys.argv[1:]))
    except KeyboardInterrupt:  # during the dry run
        sys.exit(130)


if __name__ == "__main__":
    main()
