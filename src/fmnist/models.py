"""One builder turns any valid ModelSpec (params.yaml `variants`) into a Keras model.

A conv block is: [batch norm] -> conv -> [+ shortcut] -> ReLU -> max-pool, then after the
last block [batch norm] -> flatten (or global average pooling) -> dense -> dropout -> softmax.
With ``convs_per_block`` n > 1 the block is n x ([batch norm] -> conv -> ReLU), the shortcut
spanning all n convs (the last ReLU placed as below). Augmentation layers (random shift,
horizontal flip) come first when the spec asks for them, and act in training only. With ``skip`` the block
computes y = ReLU(conv(h) + x) (``skip_activation: after_sum``, as in ResNet; our default) or
y = ReLU(conv(h)) + x (``before_sum``, the authors' public code), where h is the block's
input x after the optional batch norm and the shortcut adds x itself (``skip_from: input``)
or h (``batch_norm``, the authors'). Where conv(h) has more channels than x (1 -> 32 in the
first block), ``skip_projection: repeat`` copies x's channels (no parameters; the same sum as
Keras 2's broadcasting add in the authors' code) and ``conv1x1`` learns a 1x1 projection.
Only built-in layers are used, so a saved .keras file loads without this package.

The model takes what the data set holds, (batch, 28, 28) pixels 0-255 (uint8, or any number
type: the values are what counts), white item on black, and does its own preprocessing with
two layers without parameters: scaling to [0, 1] and adding the channel axis. So a user, the
MLflow model and the serving endpoint feed raw pixels, and the parameter counts stay the
paper's. Pixels already scaled to [0, 1] are not pixels: the logged MLflow model declares
uint8 input, which refuses them (fmnist.tracking).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import layers

from fmnist.config import ModelSpec
from fmnist.data import IMAGE_SIZE, NUM_CLASSES
from fmnist.files import CorruptFileError, error_reason


def _shortcut(x: keras.KerasTensor, filters: int, spec: ModelSpec, name: str) -> keras.KerasTensor:
    channels = x.shape[-1]
    if channels == filters:
        return x
    if spec.skip_projection == "conv1x1":
        return layers.Conv2D(filters, 1, padding="same", name=f"{name}_projection")(x)
    if filters % channels:
        raise ValueError(f"skip_projection 'repeat' needs filters ({filters}) to be a multiple of "
                         f"the input channels ({channels}); use skip_projection: conv1x1")
    return layers.Concatenate(name=f"{name}_repeat")([x] * (filters // channels))


def _augmentation(x: keras.KerasTensor, spec: ModelSpec) -> keras.KerasTensor:
    """Random shift and flip of the (batch, 28, 28, 1) images, in training only: Keras'
    preprocessing layers pass images through unchanged when called with training=False
    (predict, evaluate), and draw from a seed state that is one of the model's
    non-trainable variables (so the JAX loop's stateless step advances it)."""
    if spec.augment_translate:
        # pad-and-crop by up to n pixels: a shift drawn uniformly from [-(n + 0.5), n + 0.5]
        # pixels and nearest-neighbour sampling moves the image by a whole number of pixels,
        # each of -n..n equally likely; the vacated border is zero (black), as the padding
        factor = (spec.augment_translate + 0.5) / IMAGE_SIZE
        x = layers.RandomTranslation(factor, factor, fill_mode="constant", fill_value=0.0,
                                     interpolation="nearest", name="augment_translate")(x)
    if spec.augment_flip:
        x = layers.RandomFlip("horizontal", name="augment_flip")(x)
    return x


def build_model(spec: ModelSpec, name: str = "model") -> keras.Model:
    """Map (batch, 28, 28) pixels 0-255 to (batch, 10) class probabilities."""
    spec.validate(f"variants.{name}")
    # float32: uint8 and whole-number float pixels convert exactly, so both give the same answer
    # (jax_loop feeds the uint8 arrays it keeps on the device)
    inputs = keras.Input(shape=(IMAGE_SIZE, IMAGE_SIZE), dtype="float32", name="image")
    # float32 also under a mixed precision policy: the scaling as exact as before it moved
    # into the model; the first layer with weights casts to the compute dtype
    x = layers.Rescaling(1.0 / 255.0, dtype="float32", name="scale")(inputs)  # [0, 1]
    x = layers.Reshape((IMAGE_SIZE, IMAGE_SIZE, 1), dtype="float32", name="add_channel")(x)
    x = _augmentation(x, spec)  # training only; after the scaling, on (batch, 28, 28, 1)
    blocks = zip(spec.block_filters, spec.block_paddings, spec.block_kernel_initializers,
                 spec.block_bias_initializers, strict=True)
    for block, (filters, padding, kernel_init, bias_init) in enumerate(blocks, start=1):
        # one conv per block keeps the names block1_bn, block1_conv, ...; more are numbered
        names = [""] if spec.convs_per_block == 1 else [str(i) for i in range(1, spec.convs_per_block + 1)]
        h = x
        for i, suffix in enumerate(names):
            normalized = (layers.BatchNormalization(name=f"block{block}_bn{suffix}")(h)
                          if spec.batch_norm else h)
            if i == 0:
                first_normalized = normalized
            # (batch, h, w, filters); the activation is a layer of its own (no parameters), so
            # that the block's last one can sit before or after the skip sum
            h = layers.Conv2D(filters, spec.kernel_size, padding=padding, kernel_initializer=kernel_init,
                              bias_initializer=bias_init, name=f"block{block}_conv{suffix}")(normalized)
            if i < len(names) - 1:
                h = layers.Activation("relu", name=f"block{block}_relu{suffix}")(h)
        relu = f"block{block}_relu{names[-1]}"
        if spec.skip:
            # the shortcut spans the block's convs (a residual block when there are several)
            source = first_normalized if spec.skip_from == "batch_norm" else x
            shortcut = _shortcut(source, filters, spec, f"block{block}")
            if spec.skip_activation == "before_sum":
                h = layers.Activation("relu", name=relu)(h)
                h = layers.Add(name=f"block{block}_skip")([h, shortcut])
            else:
                h = layers.Add(name=f"block{block}_skip")([h, shortcut])
                h = layers.Activation("relu", name=relu)(h)
        else:
            h = layers.Activation("relu", name=relu)(h)
        x = layers.MaxPooling2D(spec.pool_size, padding=spec.pool_padding, name=f"block{block}_pool")(h)
    if spec.final_batch_norm:
        x = layers.BatchNormalization(name="final_bn")(x)
    if spec.global_pool:
        x = layers.GlobalAveragePooling2D(name="global_average")(x)  # (batch, filters)
    else:
        x = layers.Flatten(name="flatten")(x)  # (batch, h * w * filters)
    x = layers.Dense(spec.dense_units, activation="relu", name="dense")(x)
    x = layers.Dropout(spec.dropout_rate, name="dropout")(x)
    # float32 even under a mixed precision policy: a softmax in bfloat16/float16 rounds the
    # probabilities that the cross-entropy takes the log of (Keras' mixed precision guide)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)


def _tensor_sources(value: Any) -> Iterator[str]:
    """The layers that made the tensors named in a serialized call (``get_config``)."""
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            yield value["config"]["keras_history"][0]  # [layer name, node index, tensor index]
        else:
            for item in value.values():
                yield from _tensor_sources(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensor_sources(item)


def layer_inputs(model: keras.Model) -> dict[str, list[str]]:
    """Each layer's input layers, in call order, from the model's public config (a layer fed
    the same tensor n times lists it n times)."""
    return {layer["name"]: list(_tensor_sources(layer["inbound_nodes"][:1]))
            for layer in model.get_config()["layers"]}


def feature_layer_names(model: keras.Model) -> list[str]:
    """The layers whose outputs the paper shows as feature maps (Figs. 6-7): what each block
    pools, i.e. its activated conv output (after the skip sum where the block has one)."""
    inputs = layer_inputs(model)
    return [inputs[layer.name][0] for layer in model.layers if layer.name.endswith("_pool")]


def probe_feature_maps(model: keras.Model, images: np.ndarray) -> dict[str, np.ndarray]:
    """Each block's feature maps (``feature_layer_names``) for ``images`` (n, 28, 28) pixels, by
    layer name in block order, (n, channels, h, w) float32 each (also for a bfloat16 model);
    one ``predict`` call (one compiled step) for all the images."""
    names = feature_layer_names(model)
    probe = keras.Model(model.inputs[0], [model.get_layer(name).output for name in names])
    outputs = probe.predict(images, batch_size=len(images), verbose=0)
    if not isinstance(outputs, list | tuple):
        outputs = [outputs]
    # (n, h, w, channels) -> (n, channels, h, w): a figure's rows are channels
    return {name: np.transpose(np.asarray(output, dtype="float32"), (0, 3, 1, 2))
            for name, output in zip(names, outputs, strict=True)}


def _inputs_of(names: list[str]) -> str:
    """The layers feeding a layer, repeated ones counted ("image x32" for the repeat shortcut)."""
    counts = {name: names.count(name) for name in names}
    return ", ".join(name if n == 1 else f"{name} x{n}" for name, n in counts.items())


def summary_text(model: keras.Model) -> str:
    """The model summary (the paper's Fig. 4) as a plain-text table."""
    rows = [("Layer", "Type", "Output shape", "Params", "Inputs")]
    inputs = layer_inputs(model)
    for layer in model.layers:
        rows.append((layer.name, type(layer).__name__, str(tuple(layer.output.shape)),
                     f"{layer.count_params():,}", _inputs_of(inputs[layer.name])))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f'Model: "{model.name}"']
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
                     + "  " + row[4])
    trainable = sum(int(w.numpy().size) for w in model.trainable_weights)
    total = model.count_params()
    lines.append(f"Total params: {total:,} (trainable {trainable:,}, non-trainable {total - trainable:,})")
    return "\n".join(line.rstrip() for line in lines) + "\n"


def load_model_file(path: Path, remedy: str) -> keras.Model:
    """A model another stage saved; a missing or damaged file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {remedy}")
    try:
        return keras.models.load_model(path)
    except Exception as error:  # noqa: BLE001 (Keras raises many kinds for a damaged file)
        raise CorruptFileError(f"{path} cannot be read as a Keras model ({error_reason(error)}): it is "
                               f"damaged or was replaced; {remedy}") from error
