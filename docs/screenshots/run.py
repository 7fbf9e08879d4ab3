"""Screenshots for docs/mlflow.md, "Compare the variants in MLflow": its steps walked in a browser.

Starts `mlflow ui` (one worker, no job runner, as `make mlflow-ui`) on an MLflow store and
drives headless Chromium (shoot.mjs, npm's playwright-core) through docs/mlflow.md's "Step
by step" from the home page, in a fresh profile; a step that cannot be followed fails, naming
it. The store is either

- built: the tests' tiny pipeline (tests/conftest.py: tiny fabricated images, the real
  params.yaml shrunk) with 3 variants x 2 seeds and a few more epochs than the tests, run
  with the real `dvc repro` in a temporary repository; or
- ``--store DIR``: an existing project's (DIR holds mlflow.db and mlartifacts/, e.g. the
  project's folder after `make run`), used as it is.

PNGs go to docs/images/ (``--out`` elsewhere). `make screenshots` installs Chromium and
playwright-core first.

    python docs/screenshots/run.py [--store DIR | --keep DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from fmnist import paths  # noqa: E402
from fmnist.tracking_server import free_port  # noqa: E402
from tests.conftest import (  # noqa: E402
    make_dvc_repo,
    only_variants,
    real_params,
    shrink,
    venv_env,
    write_tiny_idx,
)

VARIANTS = ["cnn2", "cnn2_bn", "cnn2_bn_skip"]
SEEDS = [0, 1]
EPOCHS = 8  # the tests train 2: enough epochs that the curves read as curves
IMAGES = REPO / "docs" / "images"


def build_store(folder: Path) -> Path:
    """The tiny pipeline, run for real; returns the repository holding mlflow.db."""
    repo = folder / "repo"
    if (repo / paths.MLFLOW_DB).is_file() and (repo / paths.SUMMARY).is_file():
        return repo
    shutil.rmtree(folder, ignore_errors=True)
    params = only_variants(shrink(real_params()), VARIANTS)
    params["train"].update(seeds=SEEDS, epochs=EPOCHS)
    make_dvc_repo(repo, params, local_data=write_tiny_idx(folder / "tiny_idx"))
    subprocess.run(["dvc", "repro"], cwd=repo, env=venv_env(), check=True)
    return repo


def check_store(folder: Path) -> Path:
    folder = folder.resolve()
    missing = [name for name in (paths.MLFLOW_DB, paths.MLFLOW_ARTIFACTS) if not (folder / name).exists()]
    if missing:
        raise SystemExit(f"--store {folder}: no {' and no '.join(missing)} there (an MLflow store is a "
                         f"folder holding {paths.MLFLOW_DB} and {paths.MLFLOW_ARTIFACTS}/)")
    return folder


def wait_for(url: str, server: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"mlflow ui exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"mlflow ui did not answer at {url} within {timeout_s:.0f} s")


def shoot(store: Path, out: Path) -> int:
    """`mlflow ui` on ``store`` (its artifacts: ``store``/mlartifacts), shoot.mjs against it;
    returns shoot.mjs's exit code."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        ["mlflow", "ui", "--backend-store-uri", f"sqlite:///{store / paths.MLFLOW_DB}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=store,
        env={**venv_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(url, server)
        out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_URL": url, "OUT_DIR": str(out),
               "EXPERIMENT": real_params()["tracking"]["experiment"]}
        return subprocess.run(["node", str(Path(__file__).with_name("shoot.mjs"))], env=env,
                              cwd=Path(__file__).parent).returncode
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # its own session: the server and its workers
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--store", type=Path, help="shoot the MLflow store in this folder (its mlflow.db "
                        "and mlartifacts/) instead of a tiny run's")
    source.add_argument("--keep", type=Path, help="build (or reuse) the tiny run in this folder")
    parser.add_argument("--out", type=Path, default=IMAGES, help=f"where the PNGs go (default {IMAGES})")
    args = parser.parse_args()
    if args.store:
        sys.exit(shoot(check_store(args.store), args.out.resolve()))
    folder = (args.keep or Path(tempfile.mkdtemp(prefix="fmnist-screenshots-"))).resolve()
    try:
        code = shoot(build_store(folder), args.out.resolve())
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
