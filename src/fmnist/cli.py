"""How every stage script ends: a clear one-paragraph error and exit code 1, no traceback,
for the mistakes a user can fix (bad params, missing or corrupt data, unreachable server)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable

from fmnist.config import ConfigError

# Stage scripts import this module first: TensorFlow's C++ start-up chatter is noise here.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _user_errors() -> tuple[type[BaseException], ...]:
    from fmnist.download import DownloadError
    from fmnist.prepare import DataError

    errors: list[type[BaseException]] = [ConfigError, DownloadError, DataError, FileNotFoundError]
    try:
        from fmnist.tracking import TrackingError
        from fmnist.training import TrainingError
    except ImportError:  # keras/mlflow not importable: the data stages still report cleanly
        pass
    else:
        errors += [TrackingError, TrainingError]
    return tuple(errors)


def parse_run_args(description: str) -> argparse.Namespace:
    """``--variant`` and ``--seed``: the trained model a per-run stage (train, evaluate) is for."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--variant", required=True, help="a key of `variants` in params.yaml")
    parser.add_argument("--seed", type=int, required=True)
    return parser.parse_args()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stage_main(main: Callable[[], None]) -> None:
    """Run a stage; SIGTERM is turned into KeyboardInterrupt so that cleanup runs (MLflow
    marks the run KILLED and the training checkpoint stays for the next run to resume)."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        main()
    except _user_errors() as error:
        print(f"ERROR: {error}", file=sys.stderr)
        sys.exit(1)
