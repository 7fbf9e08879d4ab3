"""How every stage script ends: a clear error and a non-zero exit, no traceback, for the
mistakes a user can fix (bad params, missing or corrupt data, an unreachable server) and
for Ctrl-C. ``FMNIST_DEBUG=1`` shows the traceback instead."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable

from fmnist.config import ConfigError
from fmnist.files import CorruptFileError

# TensorFlow's C++ start-up chatter is noise in a stage's output: warnings and errors only.
# The one place the level is set: stage scripts import this module before Keras, and tests
# and benchmarks pass QUIET_TENSORFLOW to the processes they start.
QUIET_TENSORFLOW = {"TF_CPP_MIN_LOG_LEVEL": "2"}
for _key, _value in QUIET_TENSORFLOW.items():
    os.environ.setdefault(_key, _value)

DEBUG_VARIABLE = "FMNIST_DEBUG"
_USER_ERRORS = {  # module -> its error classes; only modules already imported can have raised
    "fmnist.download": ("DownloadError",),
    "fmnist.data": ("DataError",),
    "fmnist.registry": ("PromotionError",),
    "fmnist.tracking": ("TrackingError",),
    "fmnist.training": ("TrainingError",),
}


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM), with what was kept and how to go on as its message."""


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConfigError, CorruptFileError, FileNotFoundError]
    for module_name, names in _USER_ERRORS.items():
        module = sys.modules.get(module_name)
        if module is not None:
            errors += [getattr(module, name) for name in names]
    return tuple(errors)


def debugging() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "").strip() not in ("", "0")


def parse_run_args(description: str) -> argparse.Namespace:
    """``--variant`` and ``--seed``: the trained model a per-run stage (train, evaluate) is for."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--variant", required=True, help="a key of `variants` in params.yaml")
    parser.add_argument("--seed", type=int, required=True)
    return parser.parse_args()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _fail(message: str, code: int) -> None:
    print(f"ERROR: {message}", file=sys.stderr)
    sys.exit(code)


def stage_main(main: Callable[[], None]) -> None:
    """Run a stage; SIGTERM is turned into KeyboardInterrupt so that cleanup runs (MLflow
    marks the run KILLED and the training checkpoint stays for the next run to resume).

    Exit codes: 1 for an error, 130 for an interruption. With FMNIST_DEBUG=1 every error
    propagates with its traceback.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        main()
    except KeyboardInterrupt as error:
        if debugging():
            raise
        _fail(str(error) if isinstance(error, Interrupted)
              else "interrupted; run `dvc repro` again to go on (finished stages do not run again)",
              130)
    except Exception as error:
        if debugging():
            raise
        if isinstance(error, _user_errors()):
            _fail(str(error), 1)
        first_line = (str(error).strip().splitlines() or [""])[0]
        _fail(f"unexpected {type(error).__name__}: {first_line} (set {DEBUG_VARIABLE}=1 to see "
              "the traceback)", 1)
