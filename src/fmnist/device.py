"""Which Keras backend, which device (GPU or CPU) and which precision training runs with.

The only backend-specific code of the project besides the JAX epoch loop (fmnist.jax_loop):
model and training code use ``keras`` and ``keras.ops`` alone, so the same stage runs under
the tensorflow, jax and torch backends. ``train.backend`` and ``train.precision`` in
params.yaml choose; ``auto`` resolves here, and the resolved values are recorded with every
trained model (its run info, MLflow tags, the report).

Nothing here imports Keras at module level: ``select_backend`` must run before the first
``import keras`` of the process (Keras reads KERAS_BACKEND once, when it is imported).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fmnist import paths
from fmnist.config import ConfigError

# The extra that installs each backend's GPU build (pyproject.toml); see docs/gpu.md.
GPU_INSTALL_HINT = "make gpu   (pip install -e '.[gpu]': JAX with CUDA)"


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _nvidia_device_present() -> bool:
    """A cheap look for an NVIDIA GPU (device files), so that CPU machines never import JAX."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def _jax_sees_gpu() -> bool:
    import jax

    try:
        return jax.default_backend() in ("gpu", "cuda", "rocm")
    except RuntimeError:
        return False


def resolve_backend(name: str) -> str:
    """``train.backend`` -> the backend to use: ``auto`` is jax where JAX sees a GPU (its
    compiled epoch loop is this project's GPU path), else tensorflow (the fastest on the CPUs
    measured, see docs/timing.md)."""
    if name != "auto":
        if not _installed(name):
            raise ConfigError(f"params.yaml: train.backend = {name!r}, but the {name} package is not "
                              f"installed in this environment; install it (`pip install {name}`) "
                              "or choose another backend (auto, tensorflow, jax, torch)")
        return name
    if _installed("jax") and _nvidia_device_present() and _jax_sees_gpu():
        return "jax"
    if _installed("tensorflow"):
        return "tensorflow"
    for fallback in ("jax", "torch"):
        if _installed(fallback):
            return fallback
    raise ConfigError("params.yaml: train.backend = 'auto', but none of tensorflow, jax, torch is "
                      "installed; run `make run` (or pip install -e .) first")


# JAX's own variables that size its GPU memory; where the user set one, none is added
JAX_MEMORY_VARIABLES = ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                        "XLA_PYTHON_CLIENT_ALLOCATOR")
JAX_CACHE_MAX_BYTES = 2**30  # beyond it JAX evicts the least recently used programs


def jax_environment(root: Path) -> dict[str, str]:
    """The environment every JAX process of the project starts with (JAX reads these when it
    is imported), for the project at ``root``:

    - a persistent compilation cache in ``root``/.cache/jax, shared by every stage and queue
      worker (under ``dvc exp run --queue``, ``root`` is DVC_ROOT, the main workspace): a new
      process loads the epoch function and Keras' many small init programs compiled by an
      earlier one instead of compiling them (see docs/timing.md). Every program is cached
      (no minimum compile time or size), the folder is bounded (JAX_CACHE_MAX_BYTES, which
      also makes JAX lock it against concurrent writers), and on a GPU XLA's per-fusion
      autotune results are kept in it too (JAX passes that flag to the GPU compiler only);
    - memory allocated as needed (XLA_PYTHON_CLIENT_PREALLOCATE=false), not 75 % of the GPU
      at start, so that two stages or queue workers share one GPU; left out where the user
      set any of JAX_MEMORY_VARIABLES.
    """
    environment = {
        "JAX_COMPILATION_CACHE_DIR": str(root / paths.JAX_CACHE),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
        "JAX_COMPILATION_CACHE_MAX_SIZE": str(JAX_CACHE_MAX_BYTES),
        "JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES": "xla_gpu_per_fusion_autotune_cache_dir",
    }
    if not any(variable in os.environ for variable in JAX_MEMORY_VARIABLES):
        environment["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return environment


def prepare_jax() -> None:
    """Put ``jax_environment`` into this process' environment (a value already set wins);
    call before JAX is first imported, which ``select_backend`` does."""
    if "jax" in sys.modules:
        raise RuntimeError("JAX was imported before fmnist.device.prepare_jax could set its "
                           "compilation cache and memory settings")
    for key, value in jax_environment(paths.project_root()).items():
        os.environ.setdefault(key, value)


def keep_tensorflow_unloaded() -> None:
    """Under JAX or torch, stop Keras from importing TensorFlow where it only asks whether it
    is installed (``keras.utils.set_random_seed`` to seed it, saving a model to check objects
    for TensorFlow types): 2-4 s of start-up for nothing. TensorFlow imported later by anyone
    still works; Keras then only skips seeding it (nothing here uses it under these
    backends) and its type checks (no TensorFlow object can exist before it is imported)."""
    if backend() == "tensorflow" or "tensorflow" in sys.modules:
        return
    from keras.src.utils import module_utils

    lazy = getattr(module_utils, "tensorflow", None)
    # Keras' lazy module caches its answer in _available (looked up in vars(): a missing
    # attribute would make it import TensorFlow); another Keras only costs the import
    if lazy is not None and "_available" in vars(lazy):
        lazy._available = False


def select_backend(name: str) -> str:
    """Set KERAS_BACKEND from ``train.backend`` before Keras is imported; return the backend.

    The param, not the environment, decides (DVC tracks params, not environment variables);
    a KERAS_BACKEND set in the environment is overridden with a note. Where JAX is installed,
    its environment (``jax_environment``) is set first: ``auto`` imports JAX to look for a
    GPU. Then Keras is imported, without the modules of ``UNUSED_AT_IMPORT``; under JAX or
    torch it is kept from importing TensorFlow (``keep_tensorflow_unloaded``).
    """
    if _installed("jax") and "jax" not in sys.modules:
        prepare_jax()
    backend_name = resolve_backend(name)
    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() != backend_name:
            raise RuntimeError(f"Keras was imported with backend {keras.backend.backend()} before "
                               f"select_backend({name!r}) could set {backend_name}")
        return backend_name
    previous = os.environ.get("KERAS_BACKEND")
    if previous and previous != backend_name:
        print(f"NOTE: KERAS_BACKEND={previous} in the environment is ignored: train.backend "
              f"({name}) selects {backend_name}.")
    os.environ["KERAS_BACKEND"] = backend_name
    with _refused(name for name in UNUSED_AT_IMPORT if name != backend_name):
        import keras  # noqa: F401, PLC0415 (with the backend just set)
    if backend_name != "tensorflow":
        keep_tensorflow_unloaded()
    return backend_name


# What Keras and TensorFlow import at start-up for integrations no stage of the project uses:
# scikit-learn for keras.wrappers' estimators, matplotlib for keras.visualization's image
# gallery, JAX for TensorFlow Lite's converter (under other backends than JAX). About 1.4 s of
# a train stage's 4 s of Keras import on a 2-core CPU (docs/timing.md). Each of these imports
# is guarded there (``try: import ... except ImportError``), so refusing them while Keras is
# imported turns only those integrations off; importing the modules later works as usual.
UNUSED_AT_IMPORT = ("sklearn", "matplotlib", "jax")


@contextmanager
def _refused(names: Iterable[str]) -> Iterator[None]:
    """While inside, ``import <name>`` (and of its submodules) raises ModuleNotFoundError for
    each of ``names`` not imported yet: Python's own signal, a None in sys.modules."""
    refused = [name for name in names if name not in sys.modules]
    for name in refused:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in refused:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def backend() -> str:
    import keras

    return keras.backend.backend()


# JAX's own timings of making a compiled function: tracing to a jaxpr, lowering it, and XLA's
# compile (or the read from the persistent compilation cache)
_JAX_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                       "/jax/core/compile/jaxpr_to_mlir_module_duration",
                       "/jax/core/compile/backend_compile_duration")


class CompileClock:
    """What ``compile_clock`` measured: ``seconds``, or None where it could not."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] | None = None

    @property
    def seconds(self) -> float | None:
        """The wall time covered by the compile events (a function traced inside another's
        trace counts once)."""
        if self.spans is None:
            return None
        covered, reached = 0.0, float("-inf")
        for start, end in sorted(self.spans):
            if end > reached:
                covered += end - max(start, reached)
                reached = end
        return covered


@contextmanager
def compile_clock() -> Iterator[CompileClock]:
    """Time the compiles of the code inside: under JAX, the wall time its tracing, lowering
    and XLA compiles took (from JAX's monitoring events; a hit in the persistent compilation
    cache counts as its read); under TensorFlow and torch ``seconds`` stays None (their
    tracing is not reported apart from the steps it runs in)."""
    clock = CompileClock()
    if backend() != "jax":
        yield clock
        return
    import jax.monitoring  # noqa: PLC0415 (the backend is JAX: imported already)

    clock.spans = []

    def listen(event: str, start: float, end: float, **_: object) -> None:
        if event in _JAX_COMPILE_EVENTS:
            clock.spans.append((start, end))

    jax.monitoring.register_event_time_span_listener(listen)
    try:
        yield clock
    finally:
        jax.monitoring.unregister_event_time_span_listener(listen)


def accelerator() -> str:
    """'gpu' when the backend sees one (it then uses it by default), else 'cpu'."""
    name = backend()
    if name == "tensorflow":
        import tensorflow as tf

        return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
    if name == "jax":
        return "gpu" if _jax_sees_gpu() else "cpu"
    if name == "torch":
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    return "cpu"


def _use_all_devices() -> int:
    """Under JAX with several devices (GPUs, or CPU devices that
    XLA_FLAGS=--xla_force_host_platform_device_count=N makes), train data-parallel on all of
    them: Keras' DataParallel distribution keeps a replica of the variables on each device and
    splits every batch between them (XLA averages the gradients). Call before the model is
    built; returns the number of devices (1: nothing changed). Every batch, the last one
    included, must divide evenly by that number.
    """
    if backend() != "jax":
        return 1
    import keras

    devices = keras.distribution.list_devices()
    if len(devices) < 2:
        return 1
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    return len(devices)


def data_parallel_devices() -> int:
    """How many devices share each batch (1 when no distribution is set)."""
    import keras

    distribution = keras.distribution.distribution()
    return 1 if distribution is None else int(distribution.device_mesh.devices.size)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where that file does not exist."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def resolve_precision(name: str) -> str:
    """``train.precision`` -> a Keras dtype policy name; call after the backend is chosen.

    ``auto`` chooses bfloat16 only where it was measured faster at equal accuracy: the
    TensorFlow backend on CPUs with AMX (Intel Sapphire Rapids and later: 1.5x for CNN2,
    91.06 vs 90.91 % after 15 epochs). Everywhere else float32: on AVX2-only CPUs (AMD EPYC
    Milan) bfloat16 is emulated and was 4x slower; AVX512-BF16 CPUs and GPUs are not yet
    measured with this model (benchmarks/gpu_check.sh measures them on a GPU).
    """
    if name != "auto":
        return name
    if backend() == "tensorflow" and accelerator() == "cpu" and "amx_bf16" in cpu_flags():
        return "mixed_bfloat16"
    return "float32"


@contextmanager
def training_setup(precision: str) -> Iterator[tuple[str, int]]:
    """Within: ``train.precision`` resolved and made Keras' global dtype policy, and under JAX
    with several devices the data-parallel distribution (see ``_use_all_devices``); yields
    (policy, devices). Both are Keras globals of the process: they are restored on exit, so
    that what trains next in the same process (another seed, a test) starts from Keras'
    defaults whatever ``auto`` resolved to on this CPU.
    """
    import keras

    previous_policy = keras.mixed_precision.global_policy()
    previous_distribution = keras.distribution.distribution()
    try:
        policy = resolve_precision(precision)
        keras.mixed_precision.set_global_policy(policy)
        yield policy, _use_all_devices()  # before the model (and its variables) is built
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
        keras.distribution.set_distribution(previous_distribution)


def describe() -> str:
    """e.g. 'gpu (NVIDIA H100 80GB HBM3)' or 'cpu (AMD EPYC)'; recorded with every trained model."""
    kind = accelerator()
    devices = data_parallel_devices()
    if devices > 1:
        return f"{_describe_one(kind)} x{devices}, data parallel"
    return _describe_one(kind)


def _describe_one(kind: str) -> str:
    if kind != "gpu":
        return f"cpu ({cpu_model()})"
    name = backend()
    try:
        if name == "jax":
            import jax

            return f"gpu ({jax.devices()[0].device_kind})"
        if name == "torch":
            import torch

            return f"gpu ({torch.cuda.get_device_name(0)})"
        import tensorflow as tf

        details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
        return f"gpu ({details.get('device_name', 'unknown')})"
    except Exception:  # the name is a nicety; the kind is what matters
        return kind


def pip_requirements() -> list[str]:
    """What a logged model needs to load: Keras, its backend and numpy, at the versions used.

    Given to MLflow so that it does not infer them by importing the model in a subprocess
    (measured: 9 s per logged model inferred, 0.1 s given).
    """
    from importlib.metadata import version

    packages = ["keras", backend(), "numpy"]
    return [f"{package}=={version(package)}" for package in packages]


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"
