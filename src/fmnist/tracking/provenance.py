"""What made a run, from git and DVC: the commit, the DVC experiment, the params changed
from the committed params.yaml (PROVENANCE_TAGS), and the name of the pipeline execution
(EXECUTION_TAG). Set on every stage's own run (``fmnist.tracking.runs.run``) and copied to
its registered version.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from fmnist import paths
from fmnist.params import flatten, read_yaml
from fmnist.tracking.store import MAX_PARAM_LENGTH


def _git(*args: str, root: Path | None = None) -> str | None:
    """git's output, or None where it fails (no git, not a repository, no commit yet)."""
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, cwd=root or Path.cwd())
    except OSError:
        return None
    return result.stdout if result.returncode == 0 else None


def git_commit(root: Path | None = None) -> str:
    return (_git("rev-parse", "HEAD", root=root) or "unknown").strip() or "unknown"


# What a run's model came from, beyond the commit (every run of one `dvc repro` or of the
# experiments started from one commit shares that): the DVC experiment, the params that
# differ from the committed params.yaml, and whether the pipeline's inputs were committed.
# Set on every stage's own run (``run``) and copied to its registered version.
PROVENANCE_TAGS = ("git_commit", "dvc_exp_name", "workspace_committed", "params_changed")
# The files that decide what the pipeline computes; its outputs (dvc.lock, metrics/,
# reports/), which every `dvc repro` rewrites, do not count.
PIPELINE_INPUTS = (str(paths.PARAMS), "dvc.yaml", "src", "stages")


def params_changed(root: Path | None = None) -> str:
    """The params whose value in params.yaml differs from the committed one (``key=value``,
    comma-separated; "" for none; "unknown" outside git). Lists are one value."""
    root = root or Path.cwd()
    committed = _git("show", f"HEAD:{paths.PARAMS}", root=root)
    if committed is None or not (root / paths.PARAMS).is_file():
        return "unknown"
    before = flatten(read_yaml(committed) or {})
    after = flatten(read_yaml((root / paths.PARAMS).read_text()) or {})
    changed = [f"{key}={json.dumps(after[key]) if isinstance(after[key], (list, dict)) else after[key]}"
               for key in after if before.get(key, object()) != after[key]]
    changed += [f"{key} (removed)" for key in before if key not in after]
    return ", ".join(changed)[:MAX_PARAM_LENGTH]


def workspace_committed(root: Path | None = None) -> str:
    """"true" when params.yaml, dvc.yaml, src/ and stages/ have no uncommitted change,
    "false" when they have, "unknown" outside git."""
    status = _git("status", "--porcelain", "--", *PIPELINE_INPUTS, root=root)
    return "unknown" if status is None else str(not status.strip()).lower()


def provenance_tags(root: Path | None = None) -> dict[str, str]:
    """PROVENANCE_TAGS of work done now, in ``root`` (the working directory)."""
    return {"git_commit": git_commit(root), "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
            "workspace_committed": workspace_committed(root), "params_changed": params_changed(root)}


# Which pipeline execution a run belongs to, as a tag (the UI's Group by -> Tags) and in the
# run's name (the runs table and every chart legend): `dvc exp run` adds the same variants
# and seeds again, and without it three experiments' runs all read `cnn2-seed0`.
EXECUTION_TAG = "pipeline_run"


def execution(root: Path | None = None) -> str:
    """The name of the pipeline execution that runs now: the DVC experiment's (DVC sets
    DVC_EXP_NAME under every `dvc exp run`, choosing a name where the user gave none); in the
    workspace (`dvc repro`), ``workspace-<short commit>``, with ``-dirty`` (git describe's
    word) when params.yaml, dvc.yaml, src/ or stages/ differ from that commit: the commit says
    which code and params made the runs, where "workspace" alone would merge every commit's;
    ``workspace`` outside git."""
    name = os.environ.get("DVC_EXP_NAME", "")
    if name:
        return name
    commit = (_git("rev-parse", "--short", "HEAD", root=root) or "").strip()
    if not commit:
        return "workspace"
    return f"workspace-{commit}" + ("-dirty" if workspace_committed(root) == "false" else "")
