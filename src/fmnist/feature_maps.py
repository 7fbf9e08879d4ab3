"""The paper's Figs. 5-7 as data: every conv block's output (what the block pools) for the
first test image of each class, from one trained model. The train stage probes each seed's
model once, all the images in one batched call (fmnist.training.probe_first_of_each_class), and writes
them beside the model (paths.RunFiles.feature_maps); the analyse stage reads them and draws the
classes of analyse.feature_map_classes, importing no Keras. Every class is kept, so that other
classes are drawn without re-training.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmnist.data import IMAGE_SIZE
from fmnist.files import CorruptFileError, error_reason

# float16 on disk: a figure's colour scale shows far less than its 3 significant digits, and
# it halves the file (10 images: 0.51 MB of maps for cnn2, 0.75 MB for cnn4_bn_aug; compressed
# 0.27 and 0.32 MB a seed on the real data, after a short fit).
# A block's output on pixels scaled to [0, 1] stays far inside its range; anything beyond
# +-65504 is clipped rather than made infinite.
STORED_DTYPE = np.float16
_LAYER = "layer{}"  # the archive's key of the n-th layer's maps (layer_names holds the names)


def first_of_each_class(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the classes present in ``labels``, ascending; the index of each one's first image)."""
    classes, indices = np.unique(labels, return_index=True)
    return classes, indices


@dataclass(frozen=True)
class FeatureMaps:
    """One model's feature maps of the first test image of each class.

    ``classes`` (k,): the labels, ascending; ``indices`` (k,): their images' places in the test
    set; ``images`` (k, 28, 28) uint8: those images; ``layers``: by layer name, in block order,
    (k, channels, h, w) each (float32 as probed, float16 as read back).
    """

    classes: np.ndarray
    indices: np.ndarray
    images: np.ndarray
    layers: dict[str, np.ndarray]

    def of_class(self, label: int) -> tuple[int, np.ndarray, dict[str, np.ndarray]]:
        """Class ``label``'s first test image: its test-set index, the (28, 28) image and its
        maps by layer name, (channels, h, w) each."""
        found = np.flatnonzero(self.classes == label)
        if not len(found):
            raise ValueError(f"the test set has no image of class {label}, so it has no feature maps; "
                             "name other classes in analyse.feature_map_classes of params.yaml")
        n = int(found[0])
        return int(self.indices[n]), self.images[n], {name: maps[n] for name, maps in self.layers.items()}

    def write(self, path: Path) -> None:
        """A compressed .npz at ``path``, written in place: the train stage writes it into the
        folder it then moves into place (training.write_outputs), as every other file there."""
        limit = float(np.finfo(STORED_DTYPE).max)
        layers = {_LAYER.format(n): np.clip(maps, -limit, limit).astype(STORED_DTYPE)
                  for n, maps in enumerate(self.layers.values())}
        with Path(path).open("wb") as f:
            np.savez_compressed(f, classes=np.asarray(self.classes, dtype=np.int64),
                                indices=np.asarray(self.indices, dtype=np.int64),
                                images=np.asarray(self.images, dtype=np.uint8),
                                layer_names=np.array(list(self.layers), dtype=str), **layers)

    @classmethod
    def read(cls, path: Path, remedy: str) -> FeatureMaps:
        """What ``write`` wrote; a missing, damaged or malformed file is a one-line error ending
        with ``remedy``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; {remedy}")
        try:
            with np.load(path) as arrays:
                names = [str(name) for name in arrays["layer_names"]]
                maps = cls(arrays["classes"], arrays["indices"], arrays["images"],
                           {name: arrays[_LAYER.format(n)] for n, name in enumerate(names)})
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as error:
            raise CorruptFileError(f"{path} cannot be read as feature maps ({error_reason(error)}): it is "
                                   f"damaged or was replaced; {remedy}") from error
        k = len(maps.classes)
        if (maps.indices.shape != (k,) or maps.images.shape != (k, IMAGE_SIZE, IMAGE_SIZE)
                or not maps.layers or any(m.ndim != 4 or len(m) != k for m in maps.layers.values())):
            raise CorruptFileError(f"{path} does not hold one image and one (channels, h, w) array per "
                                   f"layer for each of its {k} classes: it was replaced; {remedy}")
        return maps
