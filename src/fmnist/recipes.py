"""A training recipe (params.yaml `train`, each key overridable per variant) as Keras objects:
the optimizer, its learning-rate schedule and the loss.

Schedules are Keras' own (keras.optimizers.schedules), so they are saved with the optimizer
in the .keras file, load without this package, and follow the optimizer's step counter
(``optimizer.iterations``): a resumed run, whose optimizer state comes back from the
checkpoint, continues the schedule where it stopped, and the JAX loop's stateless step,
which advances the same counter, drives it exactly as ``model.fit`` does. Their unit is the
optimizer step; the recipe's is the epoch, so one epoch is ``steps_per_epoch`` steps of the
training set actually trained on (the validation split excluded), the last partial batch
counting as a step, as ``model.fit`` and the JAX loop train it.
"""

from __future__ import annotations

import math

import keras

from fmnist.config import Recipe

ONE_CYCLE_DIV_FACTOR = 25.0  # one_cycle starts at learning_rate / 25 (PyTorch's OneCycleLR default)


def steps_per_epoch(train_size: int, batch_size: int) -> int:
    """Optimizer steps in one epoch over ``train_size`` images (a partial last batch is a step)."""
    if train_size < 1 or batch_size < 1:
        raise ValueError(f"steps_per_epoch needs train_size and batch_size >= 1 (got {train_size}, "
                         f"{batch_size})")
    return math.ceil(train_size / batch_size)


def learning_rate(recipe: Recipe, epochs: int,
                  steps: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The learning rate of ``recipe`` over ``epochs`` epochs of ``steps`` optimizer steps.

    constant: ``learning_rate`` throughout. step: ``learning_rate x step_factor^k`` in epochs
    [k x step_epochs, (k + 1) x step_epochs). cosine: linear warmup from 0 to
    ``learning_rate`` over the first ``warmup_fraction`` of the steps (none when 0), then half a
    cosine down to
    ``final_lr_fraction x learning_rate`` at the last step. one_cycle: the same, the warmup
    starting at ``learning_rate / 25``.
    """
    total = epochs * steps
    if recipe.lr_schedule == "constant":
        return recipe.learning_rate
    if recipe.lr_schedule == "step":
        return keras.optimizers.schedules.ExponentialDecay(
            recipe.learning_rate, decay_steps=recipe.step_epochs * steps, decay_rate=recipe.step_factor,
            staircase=True)
    warmup = min(round(recipe.warmup_fraction * total), total - 1)  # >= 1 step to decay over
    if recipe.lr_schedule == "cosine" and warmup == 0:
        return keras.optimizers.schedules.CosineDecay(recipe.learning_rate, decay_steps=total,
                                                      alpha=recipe.final_lr_fraction)
    start = 0.0 if recipe.lr_schedule == "cosine" else recipe.learning_rate / ONE_CYCLE_DIV_FACTOR
    # the decay's alpha is a fraction of warmup_target, the peak
    return keras.optimizers.schedules.CosineDecay(
        start, decay_steps=total - warmup, alpha=recipe.final_lr_fraction,
        warmup_target=recipe.learning_rate, warmup_steps=warmup)


def optimizer(recipe: Recipe, epochs: int, steps: int) -> keras.optimizers.Optimizer:
    """Adam, or AdamW with decoupled weight decay (applied to every weight, Keras' default)."""
    rate = learning_rate(recipe, epochs, steps)
    if recipe.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=rate, weight_decay=recipe.weight_decay)
    return keras.optimizers.Adam(learning_rate=rate)


def loss(recipe: Recipe) -> keras.losses.Loss:
    """Categorical cross-entropy on the probabilities, the one-hot targets smoothed by
    ``label_smoothing`` (y (1 - e) + e / 10)."""
    return keras.losses.CategoricalCrossentropy(label_smoothing=recipe.label_smoothing)


def label_smoothing(model: keras.Model) -> float:
    """The label smoothing of a model compiled by ``compile_model`` (or loaded after it)."""
    return float(getattr(model.loss, "label_smoothing", 0.0))


def compile_model(model: keras.Model, recipe: Recipe, epochs: int, train_size: int,
                  batch_size: int) -> keras.Model:
    """Compile ``model`` to train by ``recipe`` for ``epochs`` epochs of ``train_size`` images."""
    model.compile(optimizer=optimizer(recipe, epochs, steps_per_epoch(train_size, batch_size)),
                  loss=loss(recipe), metrics=["accuracy"])
    return model
