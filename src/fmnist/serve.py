"""Serve a registered model over HTTP with MLflow's scoring server: ``make serve``, or
``python -m fmnist.serve [--model models:/<name>@<alias>] [--host 127.0.0.1] [--port 5001]``.

The default model is params.yaml's registry alias (``models:/fashion-mnist-authors_cnn2_bn_skip@champion``)
from the project's store (``MLFLOW_TRACKING_URI``, else ./mlflow.db). The process becomes
``mlflow models serve --env-manager local`` (the model runs in this environment; MLflow starts
uvicorn, so this environment's bin/ goes first on PATH, else: ``uvicorn: not found``).

Request: ``POST /invocations`` with ``{"inputs": <(n, 28, 28) whole-number pixels 0-255>}``;
answer: ``{"predictions": <(n, 10) probabilities>}``, columns in the order of the model's
metadata ``class_names``. A wrong shape or a value outside 0-255 is a 400 error naming the problem. Two
things of MLflow's that the model cannot change: its JSON reader casts to the uint8 the
signature declares, so fractions are truncated (0.5 -> 0) and pixels scaled to [0, 1] arrive as
a black image; and its error for a wrong input quotes the input (numpy's repr, in full up to
1,000 values, i.e. one image, twice). ``MLFLOW_DISABLE_SCHEMA_DETAILS=true`` halves that, but
also drops the reason ("Shape of input (1, 784) does not match ..."), so it is left off.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5001


def command(model_uri: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> list[str]:
    mlflow = Path(sys.executable).parent / "mlflow"
    return [str(mlflow), "models", "serve", "-m", model_uri, "--env-manager", "local",
            "-h", host, "-p", str(port)]


def environment() -> dict[str, str]:
    """This environment's bin/ first on PATH (uvicorn), the project's store."""
    from fmnist.tracking import tracking_uri

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = tracking_uri()
    return env


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fmnist.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="an MLflow model URI (default: params.yaml's registry alias)")
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args(argv)
    try:
        from fmnist.predict import default_model

        model_uri = args.model or default_model()
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"ERROR: {error}")
    cmd = command(model_uri, args.host, args.port)
    print(f"Serving {model_uri} at http://{args.host}:{args.port}/invocations", flush=True)
    os.execve(cmd[0], cmd, environment())


if __name__ == "__main__":
    main()
