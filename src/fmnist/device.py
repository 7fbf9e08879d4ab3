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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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


def select_backend(name: str) -> str:
    """Set KERAS_BACKEND from ``train.backend`` before Keras is imported; return the backend.

    The param, not the environment, decides (DVC tracks params, not environment variables);
    a KERAS_BACKEND set in the environment is overridden with a note.
    """
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
    return backend_name


def backend() -> str:
    import keras

    return keras.backend.backend()


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
