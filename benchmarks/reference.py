"""Plain training loops to hold the train stage against, on the same model, data and batch size.

- ``plain_fit``: Keras' own ``model.fit`` on ready float32 arrays, nothing else (no callbacks,
  no monitored test set, no checkpoints, no MLflow): the reference on any backend.
- ``scan_loop``: the shortest fast JAX loop we know, written independently of the stage's
  (fmnist.jax_loop): float32 inputs and one-hot targets on the device, one jitted
  ``lax.scan`` per epoch over full batches, no evaluation: the reference on a GPU.

Both train by the variant's recipe as the stage does (``fmnist.recipes.compile_model``: its
optimizer, schedule, weight decay and label smoothing), so a recipe's cost is in both sides.
Each returns images/s over ``epochs`` timed epochs after one untimed epoch (compilation).
"""

from __future__ import annotations

import time

import keras
import numpy as np

from fmnist import recipes
from fmnist.config import ModelSpec, Recipe
from fmnist.data import NUM_CLASSES
from fmnist.models import build_model


def _model(spec: ModelSpec, recipe: Recipe, precision: str, seed: int, epochs: int, train_size: int,
           batch_size: int) -> keras.Model:
    """The variant's model, compiled by its recipe for the untimed epoch and ``epochs`` more."""
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(seed)
    return recipes.compile_model(build_model(spec), recipe, 1 + epochs, train_size, batch_size)


def _arrays(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # (n, 28, 28) float32 pixels 0-255: the model scales them itself (fmnist.models)
    return images.astype("float32"), np.eye(NUM_CLASSES, dtype="float32")[labels]


def plain_fit(spec: ModelSpec, recipe: Recipe, images: np.ndarray, labels: np.ndarray, batch_size: int,
              epochs: int, precision: str = "float32", seed: int = 0) -> float:
    model = _model(spec, recipe, precision, seed, epochs, len(images), batch_size)
    x, y = _arrays(images, labels)
    model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)
    started = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0)
    return epochs * len(x) / (time.perf_counter() - started)


def scan_loop(spec: ModelSpec, recipe: Recipe, images: np.ndarray, labels: np.ndarray, batch_size: int,
              epochs: int, precision: str = "float32", seed: int = 0) -> float:
    import jax
    import jax.numpy as jnp

    steps = len(images) // batch_size  # full batches only: the schedule is told so
    model = _model(spec, recipe, precision, seed, epochs, steps * batch_size, batch_size)
    optimizer = model.optimizer
    optimizer.build(model.trainable_variables)
    x, y = (jnp.asarray(a) for a in _arrays(images, labels))

    def loss_fn(trainable, non_trainable, xb, yb):
        probabilities, non_trainable = model.stateless_call(trainable, non_trainable, xb, training=True)
        return model.loss(yb, probabilities), non_trainable  # the recipe's (mean over the batch)

    def step(state, batch):
        trainable, non_trainable, optimizer_vars = state
        (loss, non_trainable), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, non_trainable, x[batch], y[batch])
        trainable, optimizer_vars = optimizer.stateless_apply(optimizer_vars, grads, trainable)
        return (trainable, non_trainable, optimizer_vars), loss

    @jax.jit
    def epoch(state, key):
        order = jax.random.permutation(key, len(x))[:steps * batch_size].reshape(steps, batch_size)
        return jax.lax.scan(step, state, order)

    state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
             [v.value for v in optimizer.variables])
    key = jax.random.PRNGKey(seed)
    state, losses = epoch(state, key)
    jax.block_until_ready(losses)
    started = time.perf_counter()
    for e in range(epochs):
        state, losses = epoch(state, jax.random.fold_in(key, e + 1))
    jax.block_until_ready(losses)
    return epochs * steps * batch_size / (time.perf_counter() - started)
