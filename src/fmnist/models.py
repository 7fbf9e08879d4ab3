"""One builder turns any valid ModelSpec (params.yaml `variants`) into a Keras model.

A conv block is: [batch norm] -> conv -> [+ shortcut] -> ReLU -> max-pool, then after the
last block [batch norm] -> flatten -> dense -> dropout -> softmax. With ``skip`` the block
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

import keras
from keras import layers

from fmnist.config import IMAGE_SIZE, NUM_CLASSES, ModelSpec


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
    blocks = zip(spec.block_filters, spec.block_paddings, spec.block_kernel_initializers,
                 spec.block_bias_initializers, strict=True)
    for block, (filters, padding, kernel_init, bias_init) in enumerate(blocks, start=1):
        normalized = layers.BatchNormalization(name=f"block{block}_bn")(x) if spec.batch_norm else x
        # (batch, h, w, filters); the activation is a layer of its own (no parameters), so that
        # it can sit before or after the skip sum
        h = layers.Conv2D(filters, spec.kernel_size, padding=padding, kernel_initializer=kernel_init,
                          bias_initializer=bias_init, name=f"block{block}_conv")(normalized)
        if spec.skip:
            source = normalized if spec.skip_from == "batch_norm" else x
            shortcut = _shortcut(source, filters, spec, f"block{block}")
            if spec.skip_activation == "before_sum":
                h = layers.Activation("relu", name=f"block{block}_relu")(h)
                h = layers.Add(name=f"block{block}_skip")([h, shortcut])
            else:
                h = layers.Add(name=f"block{block}_skip")([h, shortcut])
                h = layers.Activation("relu", name=f"block{block}_relu")(h)
        else:
            h = layers.Activation("relu", name=f"block{block}_relu")(h)
        x = layers.MaxPooling2D(spec.pool_size, padding=spec.pool_padding, name=f"block{block}_pool")(h)
    if spec.final_batch_norm:
        x = layers.BatchNormalization(name="final_bn")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(spec.dense_units, activation="relu", name="dense")(x)
    x = layers.Dropout(spec.dropout_rate, name="dropout")(x)
    # float32 even under a mixed precision policy: a softmax in bfloat16/float16 rounds the
    # probabilities that the cross-entropy takes the log of (Keras' mixed precision guide)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)


def feature_layer_names(model: keras.Model) -> list[str]:
    """The layers whose outputs the paper shows as feature maps (Figs. 6-7): what each block
    pools, i.e. its activated conv output (after the skip sum where the block has one)."""
    return [layer.input._keras_history.operation.name for layer in model.layers
            if layer.name.endswith("_pool")]


def _inputs_of(layer: keras.Layer) -> str:
    """The layers feeding ``layer`` ("image x32" for the repeat shortcut)."""
    try:
        tensors = keras.tree.flatten(layer._inbound_nodes[0].input_tensors)
    except (AttributeError, IndexError):
        return ""
    names = [tensor._keras_history.operation.name for tensor in tensors]
    counts = {name: names.count(name) for name in names}
    return ", ".join(name if n == 1 else f"{name} x{n}" for name, n in counts.items())


def summary_text(model: keras.Model) -> str:
    """The model summary (the paper's Fig. 4) as a plain-text table."""
    rows = [("Layer", "Type", "Output shape", "Params", "Inputs")]
    for layer in model.layers:
        rows.append((layer.name, type(layer).__name__, str(tuple(layer.output.shape)),
                     f"{layer.count_params():,}", _inputs_of(layer)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f'Model: "{model.name}"']
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
                     + "  " + row[4])
    trainable = sum(int(w.numpy().size) for w in model.trainable_weights)
    total = model.count_params()
    lines.append(f"Total params: {total:,} (trainable {trainable:,}, non-trainable {total - trainable:,})")
    return "\n".join(line.rstrip() for line in lines) + "\n"
