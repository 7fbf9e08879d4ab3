"""Which Keras backend and which device (GPU or CPU) training runs on.

The only backend-specific code of the project: model and training code use ``keras`` and
``keras.ops`` alone, so the same stage runs under KERAS_BACKEND=tensorflow, jax or torch.
"""

from __future__ import annotations

import keras


def backend() -> str:
    return keras.backend.backend()


def accelerator() -> str:
    """'gpu' when the backend sees one (it then uses it by default), else 'cpu'."""
    name = backend()
    if name == "tensorflow":
        import tensorflow as tf

        return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
    if name == "jax":
        import jax

        return "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else "cpu"
    if name == "torch":
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    return "cpu"


def describe() -> str:
    """e.g. 'gpu (NVIDIA H100 80GB HBM3)' or 'cpu'; recorded with every trained model."""
    kind = accelerator()
    if kind != "gpu":
        return kind
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
