"""How every stage script ends: a clear error and a non-zero exit, no traceback, for the
mistakes a user can fix (bad params, missing or corrupt data, an unreachable server) and
for Ctrl-C or SIGTERM. ``FMNIST_DEBUG=1`` shows the traceback instead.

A stop signal becomes KeyboardInterrupt, so that cleanup runs (MLflow marks the run KILLED,
the training checkpoint stays). Python runs a signal handler wherever the main thread is,
and an exception raised inside a garbage-collector callback (JAX registers one) or a
``__del__`` is printed as "Exception ignored in" and dropped. Hence:

- during training (``stop_at_safe_points``) the first signal is only recorded, and the
  training loop raises it from ordinary code at the next batch or epoch (``check_stop``);
  a second signal raises at once;
- elsewhere the handler raises at once, and one that was dropped is sent again shortly.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import glob
import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from types import ModuleType

from fmnist.config import ConfigError
from fmnist.files import CorruptFileError, DiskFullError

DEBUG_VARIABLE = "FMNIST_DEBUG"


def debugging() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "").strip() not in ("", "0")


# TensorFlow's C++ start-up chatter is noise in a stage's output: warnings and errors only.
# The one place the level is set: stage scripts import this module before Keras, and tests
# and benchmarks pass QUIET_TENSORFLOW to the processes they start.
QUIET_TENSORFLOW = {"TF_CPP_MIN_LOG_LEVEL": "2"}
for _key, _value in QUIET_TENSORFLOW.items():
    os.environ.setdefault(_key, _value)

# The start-up lines no level hides. TensorFlow's libraries log through absl before absl is
# initialised, which writes every message to stderr whatever TF_CPP_MIN_LOG_LEVEL says (and
# TF_ENABLE_ONEDNN_OPTS=0, which silences the first, would change the numbers); a machine
# without an NVIDIA GPU logs its failed CUDA probe as an ERROR. Only these exact messages are
# dropped, and only while TensorFlow is imported (below): every other line still shows.
_NO_NVIDIA_DEVICE = not glob.glob("/dev/nvidia[0-9]*")
_LOG_PREFIX = r"[IWE]\d{4} [\d:.]+ +\d+ "
START_UP_NOISE = re.compile("|".join([
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    _LOG_PREFIX + r"port\.cc:\d+\] oneDNN custom operations are on\. .*",
    _LOG_PREFIX + r"cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine, GPU will not be "
                  r"used\.",
    _LOG_PREFIX + r"cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized to use available CPU .*",
    r"To enable the following instructions: .* in other operations, rebuild TensorFlow with the "
    r"appropriate compiler flags\.",
    *([_LOG_PREFIX + r"cuda_platform\.cc:\d+\] failed call to cuInit: .*"] if _NO_NVIDIA_DEVICE else []),
]))


def without_start_up_noise(text: str) -> str:
    """``text`` less TensorFlow's start-up lines (START_UP_NOISE)."""
    return "".join(line for line in text.splitlines(keepends=True)
                   if not START_UP_NOISE.fullmatch(line.rstrip("\r\n")))


@contextlib.contextmanager
def _start_up_lines_dropped() -> Iterator[None]:
    """Hold what is written to file descriptor 2 (C++ libraries write there, not to
    sys.stderr) and pass it on, less START_UP_NOISE, when the block ends, raising or not."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = without_start_up_noise(held.read().decode(errors="replace"))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


class _QuietTensorFlowLoader(importlib.abc.Loader):
    """TensorFlow's own loader, run with its start-up lines dropped; on a machine without an
    NVIDIA GPU it also makes TensorFlow's CUDA probe (otherwise at the first operation) then."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with _start_up_lines_dropped():
            self.loader.exec_module(module)
            if _NO_NVIDIA_DEVICE:
                module.config.list_physical_devices("GPU")


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` (whoever imports it: Keras, a stage) with _QuietTensorFlowLoader.
    It stays in place until TensorFlow is imported: a look without an import
    (``importlib.util.find_spec``, fmnist.device's "is it installed?") gets the same spec."""

    def __init__(self) -> None:
        self.looking = False

    def find_spec(self, name: str, path: object = None, target: object = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if name != "tensorflow" or self.looking:
            return None
        self.looking = True
        try:
            spec = importlib.util.find_spec(name)  # the other finders' spec
        finally:
            self.looking = False
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietTensorFlowLoader(spec.loader)
        return spec


# FMNIST_DEBUG=1 shows every line.
if "tensorflow" not in sys.modules and not debugging():
    sys.meta_path.insert(0, _QuietTensorFlowFinder())


_USER_ERRORS = {  # module -> its error classes; only modules already imported can have raised
    "fmnist.download": ("DownloadError",),
    "fmnist.data": ("DataError",),
    "fmnist.registry": ("PromotionError",),
    "fmnist.search": ("SearchError",),
    "fmnist.tracking": ("TrackingError",),
    "fmnist.training": ("TrainingError",),
}


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RESEND_AFTER_S = 0.05  # a stop the handler could not raise is sent again after this long


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM), with what was kept and how to go on as its message."""


class _Stop(KeyboardInterrupt):
    """What the stop-signal handler raises."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


_requested: int | None = None  # a stop signal recorded in stop_at_safe_points, not yet raised
_deferring = False


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConfigError, CorruptFileError, DiskFullError, FileNotFoundError]
    for module_name, names in _USER_ERRORS.items():
        module = sys.modules.get(module_name)
        if module is not None:
            errors += [getattr(module, name) for name in names]
    return tuple(errors)


def parse_variant_args(description: str) -> argparse.Namespace:
    """``--variant``: the variant a per-variant stage (train, evaluate) is for, all its seeds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--variant", required=True, help="a key of `variants` in params.yaml")
    return parser.parse_args()


def _on_stop_signal(signum: int, frame: object) -> None:
    global _requested
    if _deferring and _requested is None:
        _requested = signum  # raised by check_stop, from ordinary code
        return
    raise _Stop(signum)


def _on_unraisable(hook_args: object, next_hook: Callable[[object], None]) -> None:
    """A stop the handler raised where Python cannot raise (a gc callback, a ``__del__``) is
    not lost: the same signal is sent again from a thread, and lands elsewhere."""
    error = getattr(hook_args, "exc_value", None)
    if isinstance(error, _Stop):
        timer = threading.Timer(RESEND_AFTER_S, os.kill, (os.getpid(), error.signum))
        timer.daemon = True
        timer.start()
        return
    next_hook(hook_args)


def check_stop() -> None:
    """Raise KeyboardInterrupt if a stop signal was recorded (see ``stop_at_safe_points``)."""
    global _requested
    if _requested is not None:
        signum, _requested = _requested, None
        raise _Stop(signum)


@contextlib.contextmanager
def stop_at_safe_points() -> Iterator[None]:
    """Within: a stop signal is recorded, not raised, and the code inside calls
    ``check_stop`` where stopping is safe (between training batches and epochs). On leaving,
    a recorded stop is raised. Only where ``stage_main`` handles the signals."""
    global _deferring
    _deferring = True
    try:
        yield
    finally:
        _deferring = False
    check_stop()


def _fail(message: str, code: int) -> None:
    print(f"ERROR: {message}", file=sys.stderr)
    sys.exit(code)


def stage_main(main: Callable[[], None]) -> None:
    """Run a stage; SIGTERM and Ctrl-C are turned into KeyboardInterrupt so that cleanup runs
    (MLflow marks the run KILLED and the training checkpoint stays for the next run to
    resume); see the module's docstring for when.

    Exit codes: 1 for an error, 130 for an interruption. With FMNIST_DEBUG=1 every error
    propagates with its traceback.

    A stage run as a script (``main`` defined in ``__main__``) then ends its process at once
    (``_end_process``), skipping the interpreter's teardown of TensorFlow, Keras and MLflow:
    about 2 s of every train stage on a 2-core CPU (docs/timing.md). Called from elsewhere (a
    test), it returns or raises SystemExit as any function would.
    """
    global _requested
    _requested = None
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum, handler in previous.items():
        # SIGINT only where Python's own handler is set (not where it is ignored)
        if signum == signal.SIGTERM or handler is signal.default_int_handler:
            signal.signal(signum, _on_stop_signal)
    previous_hook = sys.unraisablehook
    sys.unraisablehook = lambda hook_args: _on_unraisable(hook_args, previous_hook)
    as_script = main.__module__ == "__main__"
    code: object = 0
    try:
        _run(main)
    except SystemExit as request:
        if not as_script:
            raise
        code = request.code
    finally:
        sys.unraisablehook = previous_hook
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)
    if as_script:
        _end_process(code)


def _end_process(code: object) -> None:
    """End the process as Python does after ``SystemExit(code)``, less the teardown of its
    modules: other non-daemon threads joined, atexit handlers run (logging's flush, MLflow's),
    the standard streams flushed; then ``os._exit``. Every file a stage writes is closed by
    then (the writers use ``with``), and MLflow's SQLite store commits each write."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # noqa: SLF001 (what the interpreter runs at exit)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"), as Python prints it
        print(code, file=sys.stderr)
        status = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe, a closed stream
            stream.flush()
    os._exit(status & 0xFF)


def _run(main: Callable[[], None]) -> None:
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
