"""Screenshots for docs/mlflow.md, "Compare the variants in MLflow", from a real small run.

Builds the tests' tiny pipeline (tests/conftest.py: tiny fabricated images, the real
params.yaml shrunk) with 3 variants x 2 seeds and a few more epochs than the tests, runs
the real `dvc repro` in a temporary repository, starts `mlflow ui` on its store and drives
headless Chromium (shoot.mjs, npm's playwright-core) through the views docs/mlflow.md shows.
PNGs go to docs/images/. `make screenshots` installs Chromium and playwright-core first.

    python docs/screenshots/run.py [--keep DIR]   # DIR: keep the repository (and reuse it)
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
    if (repo / "mlflow.db").is_file() and (repo / "metrics" / "summary.json").is_file():
        return repo
    shutil.rmtree(folder, ignore_errors=True)
    params = only_variants(shrink(real_params()), VARIANTS)
    params["train"].update(seeds=SEEDS, epochs=EPOCHS)
    make_dvc_repo(repo, params, local_data=write_tiny_idx(folder / "tiny_idx"))
    subprocess.run(["dvc", "repro"], cwd=repo, env=venv_env(), check=True)
    return repo


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="build (or reuse) the run in this folder")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="fmnist-screenshots-"))
    repo = build_store(folder.resolve())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        ["mlflow", "ui", "--backend-store-uri", f"sqlite:///{repo / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(port)], cwd=repo, env=venv_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(url, server)
        IMAGES.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_URL": url, "OUT_DIR": str(IMAGES),
               "EXPERIMENT": real_params()["tracking"]["experiment"]}
        subprocess.run(["node", str(Path(__file__).with_name("shoot.mjs"))], env=env, check=True,
                       cwd=Path(__file__).parent)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # its own session: the server and its workers
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
