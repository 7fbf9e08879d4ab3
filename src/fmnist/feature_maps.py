"""The paper's Figs. 5-7: every conv block's output for the first test image of chosen
classes, from one variant's first-seed model. Drawn by the analyse stage, the one stage that
loads those models (the evaluate stage scores the train stage's probabilities and imports no
Keras); one compiled, batched call per model probes all the chosen images at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from fmnist import plots
from fmnist.models import feature_layer_names


def first_of_class(labels: np.ndarray, label: int) -> int:
    matches = np.flatnonzero(labels == label)
    if not len(matches):
        raise ValueError(f"the test set has no image of class {label}")
    return int(matches[0])


def feature_maps(model: keras.Model, images: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Each conv block's activated output for each (28, 28) uint8 image of ``images`` (n, 28, 28),
    as (channels, h, w) by its layer's name (block1_relu, block1_skip, ...: what the block pools),
    one dict per image; one ``predict`` call (one compiled step) for all of them."""
    names = feature_layer_names(model)
    probe = keras.Model(model.inputs[0], [model.get_layer(name).output for name in names])
    outputs = probe.predict(images, batch_size=len(images), verbose=0)
    if not isinstance(outputs, list | tuple):
        outputs = [outputs]
    # per layer (n, h, w, channels) -> per image (channels, h, w); float32 also for bfloat16
    outputs = [np.transpose(np.asarray(output, dtype="float32"), (0, 3, 1, 2)) for output in outputs]
    return [{name: output[n] for name, output in zip(names, outputs, strict=True)}
            for n in range(len(images))]


def draw(model: keras.Model, x_test: np.ndarray, y_test: np.ndarray, class_names: Sequence[str],
         classes: Sequence[str], figures: Sequence[Path], title: str) -> None:
    """Figs. 5-7 of one model: for each of ``classes`` its first test image's feature maps,
    drawn to the matching path of ``figures``."""
    indices = [first_of_class(y_test, list(class_names).index(name)) for name in classes]
    if not indices:
        return
    for class_name, index, maps, figure in zip(classes, indices, feature_maps(model, x_test[indices]),
                                               figures, strict=True):
        plots.feature_maps(x_test[index], list(maps.values()), list(maps), figure,
                           f"{title}: conv block outputs for the first test {class_name} "
                           f"(test image {index})")
