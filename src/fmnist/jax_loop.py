"""The train stage's epoch loop under the JAX backend: one compiled call per epoch.

``model.fit`` runs one compiled step per batch and hands every batch from the host; for a
CNN this small on a GPU, that per-step host work, not the arithmetic, sets the speed
(keras issue 18648). Here the images go to the device once, as uint8 (the model scales them
itself), and each epoch is one compiled function: the shuffle, a ``lax.scan`` over the full
batches, the last partial batch (as ``model.fit`` has it), and the monitored evaluation of
the validation and test sets, with one small transfer of the epoch's numbers back to the host.

The step is Keras' own stateless API (``model.stateless_call``, ``optimizer.stateless_apply``,
``optimizer.scale_loss`` for float16 loss scaling), so the model, the optimizer and its state
are the Keras objects ``model.fit`` would train, save and resume; the loss and accuracy are
the compiled ones (categorical cross-entropy on probabilities with the compiled loss' label
smoothing, categorical accuracy), each
epoch's value the mean over its images, as in ``model.fit``'s logs. Callbacks get the
epoch-level calls (train begin/end, epoch begin/end) and, where each batch is a call from
Python (``compiled_epochs`` off), ``on_train_batch_begin``; the other batch-level hooks are
not called.

Seeds together (``fit_seeds``): models of one architecture, each built under its own seed,
train in one loop. Their (trainable, non-trainable, optimizer) states are stacked on a new
leading axis (one entry per seed; the non-trainable state holds each model's dropout and
augmentation seed-generator state) and the step and the evaluation are ``jax.vmap``-ped over
that axis and over the per-seed shuffle keys, so every call trains all the seeds at once: on
a GPU, three seeds cost about one. Each seed's shuffle is its lone run's; its numbers are its
lone run's up to float reassociation (XLA batches the seeds' convolutions into one). On the
CPU the seeds take turns in each epoch instead, through the same compiled functions (see
``fit_seeds``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import keras
import numpy as np

from fmnist.data import NUM_CLASSES
from fmnist.recipes import label_smoothing

EVAL_CHUNK = 1000  # images per evaluation step (on a GPU all steps run in one call)
# epochs per compiled call on an accelerator: one host transfer, checkpoint and MLflow write
# each; an interrupted run redoes at most this many epochs (a few seconds on a GPU)
EPOCH_CHUNK = 10


def _state(model: keras.Model) -> tuple[list, list, list]:
    return ([v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            [v.value for v in model.optimizer.variables])


def _assign(model: keras.Model, state: tuple[list, list, list]) -> None:
    """Write the loop's state back into the Keras variables (for callbacks, saving, resuming)."""
    groups = (model.trainable_variables, model.non_trainable_variables, model.optimizer.variables)
    for variables, values in zip(groups, state, strict=True):
        for variable, value in zip(variables, values, strict=True):
            variable.assign(value)


def _padded_chunks(images: np.ndarray, labels: np.ndarray) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A set as (chunks, EVAL_CHUNK, ...) device arrays plus a mask of the real images."""
    n = len(labels)
    size = min(EVAL_CHUNK, n)
    chunks = math.ceil(n / size)
    pad = chunks * size - n
    x = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    y = np.concatenate([labels.astype(np.int32), np.zeros(pad, np.int32)])
    mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    return (jnp.asarray(x.reshape(chunks, size, *images.shape[1:])),
            jnp.asarray(y.reshape(chunks, size)), jnp.asarray(mask.reshape(chunks, size)))


def _stack(states: Sequence[tuple[list, list, list]]) -> tuple[list, list, list]:
    """Per-seed states -> one state whose every array has a leading (seeds,) axis."""
    return jax.tree_util.tree_map(lambda *values: jnp.stack(values), *states)


def _unstack(state: tuple[list, list, list], index: int) -> tuple[list, list, list]:
    return jax.tree_util.tree_map(lambda value: value[index], state)


def make_epoch_functions(model: keras.Model, n_train: int, batch_size: int, compiled_epochs: bool,
                         before_step: Callable[[int], None] | None = None, stacked: bool = False):
    """(train_epoch, evaluate) for the model's state and device arrays.

    ``stacked``: the state carries a leading (seeds,) axis (``_stack``) and ``train_epoch``
    takes one shuffle key per seed; the step and the evaluation are vmapped over that axis
    (models of ``model``'s architecture and optimizer), the images and labels shared.

    ``compiled_epochs``: each epoch (each evaluation) is one compiled call with a
    ``lax.scan`` over the batches: what a GPU needs. Otherwise a Python loop calls the same
    compiled step per batch: on XLA's CPU backend, convolutions inside a scan ran 4x slower
    than the same step called from Python (measured here; see docs/timing.md); that loop
    calls ``before_step(batch)`` before each step.
    """
    optimizer = model.optimizer
    full_steps, remainder = divmod(n_train, batch_size)
    smoothing = label_smoothing(model)

    def loss_and_updates(trainable, non_trainable, optimizer_vars, xb, yb):
        probabilities, non_trainable, losses = model.stateless_call(
            trainable, non_trainable, xb, training=True, return_losses=True)
        targets = jax.nn.one_hot(yb, NUM_CLASSES, dtype=probabilities.dtype)
        loss = jnp.mean(keras.losses.categorical_crossentropy(targets, probabilities,
                                                              label_smoothing=smoothing))
        if losses:
            loss = loss + sum(losses)
        # float16 loss scaling reads the scale from the optimizer's (stateless) variables
        with keras.StatelessScope(state_mapping=list(zip(optimizer.variables, optimizer_vars,
                                                         strict=True))):
            scaled = optimizer.scale_loss(loss)
        correct = jnp.sum(jnp.argmax(probabilities, axis=-1) == yb)
        return scaled, (loss, correct, non_trainable)

    gradient = jax.value_and_grad(loss_and_updates, has_aux=True)

    def step(state, x_all, y_all, indices):
        """One optimizer step on the images at ``indices``; returns (loss sum, correct)."""
        trainable, non_trainable, optimizer_vars = state
        xb, yb = x_all[indices], y_all[indices]  # (batch, 28, 28) uint8, (batch,) int32
        (_, (loss, correct, non_trainable)), grads = gradient(
            trainable, non_trainable, optimizer_vars, xb, yb)
        trainable, optimizer_vars = optimizer.stateless_apply(optimizer_vars, grads, trainable)
        return (trainable, non_trainable, optimizer_vars), (loss * indices.shape[0], correct)

    def chunk_scores(trainable, non_trainable, xb, yb, keep):
        """(loss sum, correct count) over one evaluation chunk's real images."""
        probabilities, _ = model.stateless_call(trainable, non_trainable, xb, training=False)
        targets = jax.nn.one_hot(yb, NUM_CLASSES, dtype=probabilities.dtype)
        losses = keras.losses.categorical_crossentropy(targets, probabilities, label_smoothing=smoothing)
        correct = (jnp.argmax(probabilities, axis=-1) == yb).astype(jnp.float32)
        return jnp.sum(losses * keep), jnp.sum(correct * keep)

    def epoch_logs(loss_sum, correct):
        return {"loss": loss_sum / n_train, "accuracy": correct / n_train}

    def scores_logs(loss_sum, correct, mask):
        return {"loss": loss_sum / mask.sum(), "accuracy": correct / mask.sum()}

    def over_seeds(function, in_axes):
        """``function`` vmapped over the seeds' axis where the state is stacked."""
        return jax.vmap(function, in_axes=in_axes) if stacked else function

    if compiled_epochs:
        def train_epoch(state, x_all, y_all, key):
            order = jax.random.permutation(key, n_train)
            loss_sum, correct = jnp.float32(0.0), jnp.int32(0)
            if full_steps:
                batches = order[:full_steps * batch_size].reshape(full_steps, batch_size)
                state, (losses, corrects) = jax.lax.scan(
                    lambda s, idx: step(s, x_all, y_all, idx), state, batches)
                loss_sum, correct = losses.sum(), corrects.sum()
            if remainder:  # the last, smaller batch, as model.fit trains it
                state, (loss, last) = step(state, x_all, y_all, order[full_steps * batch_size:])
                loss_sum, correct = loss_sum + loss, correct + last
            return state, epoch_logs(loss_sum, correct)

        def evaluate(trainable, non_trainable, x_chunks, y_chunks, mask):
            _, (losses, corrects) = jax.lax.scan(
                lambda carry, arrays: (carry, chunk_scores(trainable, non_trainable, *arrays)),
                None, (x_chunks, y_chunks, mask))
            return scores_logs(losses.sum(), corrects.sum(), mask)

        return (jax.jit(over_seeds(train_epoch, (0, None, None, 0))),
                jax.jit(over_seeds(evaluate, (0, 0, None, None, None))))

    step_once = jax.jit(over_seeds(step, (0, None, None, 0)))
    scores_once = jax.jit(over_seeds(chunk_scores, (0, 0, None, None, None)))
    permutation = over_seeds(lambda key: jax.random.permutation(key, n_train), 0)

    def train_epoch_stepwise(state, x_all, y_all, key):
        order = permutation(key)  # (n,), or (seeds, n) stacked
        loss_sum, correct = 0.0, 0
        for batch, begin in enumerate(range(0, n_train, batch_size)):
            if before_step is not None:
                before_step(batch)
            state, (loss, batch_correct) = step_once(state, x_all, y_all,
                                                     order[..., begin:begin + batch_size])
            loss_sum, correct = loss_sum + loss, correct + batch_correct
        return state, epoch_logs(loss_sum, correct)

    def evaluate_stepwise(trainable, non_trainable, x_chunks, y_chunks, mask):
        totals = [scores_once(trainable, non_trainable, *arrays)
                  for arrays in zip(x_chunks, y_chunks, mask, strict=True)]
        return scores_logs(sum(t[0] for t in totals), sum(t[1] for t in totals), mask)

    return train_epoch_stepwise, evaluate_stepwise


def fit(model: keras.Model, images: np.ndarray, labels: np.ndarray, *, batch_size: int, epochs: int,
        initial_epoch: int = 0, seed: int = 0, callbacks: Sequence[keras.callbacks.Callback] = (),
        validation: tuple[np.ndarray, np.ndarray] | None = None,
        test: tuple[np.ndarray, np.ndarray] | None = None, compiled_epochs: bool | None = None,
        verbose: bool = True) -> None:
    """Train a compiled model on uint8 ``images`` (n, 28, 28) and int ``labels`` (n,) from
    ``initial_epoch`` to ``epochs``; logs carry val_* and test_* metrics for the sets given.

    The shuffle of epoch e is a function of (seed, e) alone, so a resumed run shuffles its
    remaining epochs as the uninterrupted run would have. ``compiled_epochs`` (default: on a
    GPU or other accelerator, not on the CPU): see ``make_epoch_functions``.
    """
    fit_seeds([model], images, labels, batch_size=batch_size, epochs=epochs,
              initial_epoch=initial_epoch, seeds=[seed], callbacks=[callbacks], validation=validation,
              test=test, compiled_epochs=compiled_epochs, verbose=verbose)


def fit_seeds(models: Sequence[keras.Model], images: np.ndarray, labels: np.ndarray, *, batch_size: int,
              epochs: int, seeds: Sequence[int], callbacks: Sequence[Sequence[keras.callbacks.Callback]],
              initial_epoch: int = 0, validation: tuple[np.ndarray, np.ndarray] | None = None,
              test: tuple[np.ndarray, np.ndarray] | None = None, compiled_epochs: bool | None = None,
              vmapped: bool | None = None, chunk_epochs: int | None = None, verbose: bool = True) -> None:
    """``fit`` for several models of one architecture and recipe, ``models[i]`` trained
    under ``seeds[i]`` (its shuffles) with ``callbacks[i]``, in one loop: every model gets
    its state and its callbacks' epoch calls after each chunk of epochs.

    ``vmapped`` (default: on an accelerator, not on the CPU): the seeds' states stacked and
    each call vmapped over them (the module's docstring). Otherwise each epoch calls the
    same compiled functions once per seed: one compile for all the seeds (a lone run per
    seed compiles its own), each seed's numbers exactly its lone run's. On XLA's CPU backend
    a vmapped epoch of 3 seeds took 1.1-1.5x the time of their turns (batched convolutions;
    benchmarks/results/seeds_together-amd-epyc.json), so there it is off.

    ``chunk_epochs`` (with ``compiled_epochs``; default EPOCH_CHUNK there, else 1): that many
    epochs per compiled call (a ``lax.scan`` over the epochs), their numbers brought to the
    host in one transfer. Chunks end at multiples of ``chunk_epochs`` (and at ``epochs``), so
    a run resumed from a chunk's end goes on in the same chunks. The callbacks get every
    epoch's ``on_epoch_begin`` before the chunk runs and its ``on_epoch_end`` after it (the
    model then holds the chunk's last state; the logs carry each epoch's ``learning_rate``
    and ``epoch_seconds``, the chunk's time shared out), then ``on_chunk_end(last_epoch)``
    where a callback has it: the moment to checkpoint and log once per chunk.
    """
    if not (len(models) == len(seeds) == len(callbacks)) or not models:
        raise ValueError(f"fit_seeds needs one seed and one callback list per model; got "
                         f"{len(models)} models, {len(seeds)} seeds, {len(callbacks)} callback lists")
    for model in models:
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
    if compiled_epochs is None:
        compiled_epochs = jax.default_backend() != "cpu"
    if vmapped is None:
        vmapped = jax.default_backend() != "cpu"
    if chunk_epochs is None:
        chunk_epochs = EPOCH_CHUNK if compiled_epochs else 1
    if chunk_epochs < 1 or (chunk_epochs > 1 and not compiled_epochs):
        raise ValueError(f"chunk_epochs must be 1, or more with compiled_epochs; got {chunk_epochs}")
    stacked = vmapped and len(models) > 1
    callback_lists = [keras.callbacks.CallbackList(list(given), model=model)
                      for model, given in zip(models, callbacks, strict=True)]

    def before_step(batch: int) -> None:
        for callback_list in callback_lists:
            callback_list.on_train_batch_begin(batch)

    train_epoch, evaluate = make_epoch_functions(models[0], len(labels), batch_size, compiled_epochs,
                                                 before_step=before_step, stacked=stacked)
    x_all, y_all = jnp.asarray(images), jnp.asarray(labels.astype(np.int32))
    monitored = {prefix: _padded_chunks(*arrays)
                 for prefix, arrays in (("val_", validation), ("test_", test))
                 if arrays is not None and len(arrays[1])}

    def run_epoch(state, key, x_all, y_all, monitored):
        state, results = train_epoch(state, x_all, y_all, key)
        for prefix, chunks in monitored.items():
            scores = evaluate(state[0], state[1], *chunks)
            results.update({prefix + name: value for name, value in scores.items()})
        return state, results

    @jax.jit
    def run_chunk(state, keys, x_all, y_all, monitored):
        """``len(keys)`` epochs in one call; each result gets a leading (epochs,) axis."""
        return jax.lax.scan(lambda s, key: run_epoch(s, key, x_all, y_all, monitored), state, keys)

    def run(state, keys):
        """(state after the chunk, the chunk's results) for ``keys`` (epochs, ...)."""
        if chunk_epochs == 1:  # no scan: the step called per batch on the CPU
            state, results = run_epoch(state, keys[0], x_all, y_all, monitored)
            return state, jax.tree_util.tree_map(lambda value: value[None], results)
        return run_chunk(state, keys, x_all, y_all, monitored)

    base_keys = [jax.random.PRNGKey(seed) for seed in seeds]
    for model in models:
        model.stop_training = False
    for callback_list in callback_lists:
        callback_list.on_train_begin()
    if stacked:
        state = _stack([_state(model) for model in models])
    else:
        states = [_state(model) for model in models]
    begin = initial_epoch
    while begin < epochs:
        end = min(epochs, (begin // chunk_epochs + 1) * chunk_epochs)
        for epoch in range(begin, end):
            for callback_list in callback_lists:
                callback_list.on_epoch_begin(epoch)
        started = time.perf_counter()
        # (epochs, 2) per seed, or (epochs, seeds, 2) stacked
        keys = [jnp.stack([jax.random.fold_in(key, epoch) for epoch in range(begin, end)])
                for key in base_keys]
        if stacked:
            state, results = run(state, jnp.stack(keys, axis=1))
            results = jax.device_get(results)  # one transfer: every seed's numbers, (epochs, seeds)
            states = [_unstack(state, index) for index in range(len(models))]
            seed_results = [{key: value[:, index] for key, value in results.items()}
                            for index in range(len(models))]
        else:
            outcomes = [run(state, key) for state, key in zip(states, keys, strict=True)]
            states = [state for state, _ in outcomes]
            seed_results = jax.device_get([results for _, results in outcomes])
        seconds = (time.perf_counter() - started) / (end - begin)
        for index, (model, callback_list) in enumerate(zip(models, callback_lists, strict=True)):
            _assign(model, states[index])
            steps_done = int(model.optimizer.iterations.numpy())
            for offset, epoch in enumerate(range(begin, end)):
                logs = {key: float(value[offset]) for key, value in seed_results[index].items()}
                if end - begin > 1:  # the model holds the chunk's end: each epoch's own rate
                    logs["learning_rate"] = _learning_rate(
                        model, steps_done - (end - epoch - 1) * _steps(len(labels), batch_size))
                    logs["epoch_seconds"] = seconds
                if verbose:
                    print(f"Epoch {epoch + 1}/{epochs} (seed {seeds[index]}) - {seconds:.1f}s - "
                          + " - ".join(f"{key}: {value:.4f}" for key, value in logs.items()), flush=True)
                callback_list.on_epoch_end(epoch, logs)
            for callback in callback_list.callbacks:
                if hasattr(callback, "on_chunk_end"):
                    callback.on_chunk_end(end - 1)
        if any(model.stop_training for model in models):
            break
        begin = end
    for callback_list in callback_lists:
        callback_list.on_train_end()


def _steps(n_train: int, batch_size: int) -> int:
    return math.ceil(n_train / batch_size)


def _learning_rate(model: keras.Model, iterations: int) -> float:
    """The rate the optimizer's schedule gives after ``iterations`` steps (the model's
    optimizer is set there for the reading and put back)."""
    counter = model.optimizer.iterations
    now = counter.numpy()
    counter.assign(iterations)
    try:
        return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    finally:
        counter.assign(now)
