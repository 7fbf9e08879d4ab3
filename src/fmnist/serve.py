"""Serve a registered model over HTTP with MLflow's scoring server: ``make serve``, or
``python -m fmnist.serve [--model models:/<name>@<alias>] [--host 127.0.0.1] [--port 5001]``.

The default model is params.yaml's registry alias (``models:/fashion-mnist-authors_cnn2_bn_skip@champion``)
from the project's store (``MLFLOW_TRACKING_URI``, else ./mlflow.db). It runs the app of
``mlflow models serve --env-manager local`` (the model runs in this environment) under uvicorn
in this process, behind a limit on the request size. On start it says which model it serves:
the registered name and version, and the MLflow run, DVC experiment and git commit that
trained it. Before loading anything it checks that the port is free and the model exists:
either is a one-line error.

Request: ``POST /invocations`` with ``{"inputs": <(n, 28, 28) whole-number pixels 0-255>}``;
answer: ``{"predictions": <(n, 10) probabilities>}``, columns in the order of the model's
metadata ``class_names``. A wrong shape or a value outside 0-255 is a 400 error naming the problem.
A request body over ``--max-request-mb`` (default 8 MiB: about 2,000 images as JSON, at most 4
bytes a pixel) is a 413 error with a one-line JSON message, answered without parsing it; send
more images in several requests. Two things of MLflow's that the model cannot change: its JSON
reader casts to the uint8 the signature declares, so fractions are truncated (0.5 -> 0) and
pixels scaled to [0, 1] arrive as a black image; and its error for a wrong input quotes the input
(numpy's repr, in full up to 1,000 values, i.e. one image, twice). ``MLFLOW_DISABLE_SCHEMA_DETAILS=true``
halves that, but also drops the reason ("Shape of input (1, 784) does not match ..."), so it is
left off.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fmnist.cli import debugging

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5001
# 8 MiB: a (n, 28, 28) JSON request takes 2-4 bytes a pixel ("0,", "255,"), about 3 KB an image,
# so some 2,000-4,000 images; MLflow's reader would otherwise parse any size (83 MB: 20 s of work)
DEFAULT_MAX_REQUEST_MB = 8

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class ServeError(RuntimeError):
    """The model cannot be served; the message says why and what to do."""


class LimitRequestSize:
    """ASGI middleware: a request body over ``max_bytes`` gets a 413 with a one-line JSON error
    (MLflow's error format) and never reaches the app. The body is read and dropped, not kept,
    so that the client, still sending, receives the answer."""

    def __init__(self, app: Callable[..., Awaitable[None]], max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._drain(receive)
            await self._too_large(send, int(declared))
            return
        chunks, size, more = [], 0, True
        while more:  # no or a small Content-Length: read the body, as the app would, up to the limit
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await self._drain(receive, more)
                await self._too_large(send, None)
                return
            chunks.append(message.get("body", b""))
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    async def _drain(receive: Receive, more: bool = True) -> None:
        while more:
            message = await receive()
            more = message["type"] == "http.request" and message.get("more_body", False)

    async def _too_large(self, send: Send, size: int | None) -> None:
        what = f"a request of {size:,} bytes" if size is not None else "a request"
        body = json.dumps({"error_code": "REQUEST_TOO_LARGE", "message": (
            f"{what} is over the limit of {self.max_bytes:,} bytes; send the images in several "
            "requests")}).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def check_port_free(host: str, port: int) -> None:
    """The port must be free before the model is loaded (tens of seconds)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ServeError(f"cannot listen on {host}:{port}: {error.strerror or error}; stop what "
                             "uses it or serve on another port (--port, or `make serve PORT=...`)") from error


def describe(model_uri: str) -> str:
    """Which model ``model_uri`` names, in one line (see tracking.ModelOrigin); a model or
    store that does not exist is a ServeError."""
    from fmnist import tracking

    try:
        tracking.use_store(create=False)
        return tracking.model_origin(model_uri).describe()
    except tracking.TrackingError as error:
        raise ServeError(str(error)) from error


def app(model_uri: str, max_request_mb: float) -> LimitRequestSize:
    """The model loaded into MLflow's scoring app, behind the request size limit."""
    from fmnist import tracking

    try:
        return LimitRequestSize(tracking.scoring_app(model_uri), int(max_request_mb * 2**20))
    except tracking.TrackingError as error:
        raise ServeError(str(error)) from error


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fmnist.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="an MLflow model URI (default: params.yaml's registry alias)")
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_MB,
                        help="larger requests get a 413 error (default: %(default)s MiB)")
    args = parser.parse_args(argv)
    try:
        from fmnist.predict import default_model

        check_port_free(args.host, args.port)
        model_uri = args.model or default_model()
        print(f"Serving {describe(model_uri)}", flush=True)
        served = app(model_uri, args.max_request_mb)
    except (FileNotFoundError, ValueError, ServeError) as error:
        if debugging():
            raise
        sys.exit(f"ERROR: {error}")
    print(f"at http://{args.host}:{args.port}/invocations (requests up to {args.max_request_mb:g} MiB)",
          flush=True)
    import uvicorn

    uvicorn.run(served, host=args.host, port=args.port, timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main()
