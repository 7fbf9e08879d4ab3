"""Fashion-MNIST as the pipeline holds it: the data set's facts, the prepared arrays, their
conversion to model inputs, and the seeded stratified splits.

The download stage writes data/raw/ and the prepare stage data/prepared/ (see download,
prepare); every stage that reads the images reads them through this module.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# --- the data set's facts -----------------------------------------------------------------

IMAGE_SIZE = 28
NUM_CLASSES = 10
TRAIN_SIZE = 60_000
TEST_SIZE = 10_000
FULL_COUNTS = {"train": TRAIN_SIZE, "test": TEST_SIZE}  # 6,000 and 1,000 images per class

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
# Published with the dataset (github.com/zalandoresearch/fashion-mnist).
CANONICAL_MD5 = {
    TRAIN_IMAGES: "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    TRAIN_LABELS: "25c81989df183df01b3e8a0aad5dffbe",
    TEST_IMAGES: "bef4ecab320f06d8554ea6380940ec79",
    TEST_LABELS: "bb300cfdad3c16e7a12a480ee83cd310",
}


class DataError(ValueError):
    """data/raw/ or data/prepared/ is not what the pipeline expects."""


# --- the prepared arrays ------------------------------------------------------------------

@dataclass(frozen=True)
class Dataset:
    """Images (n, 28, 28) uint8 and labels (n,) uint8; the validation set may be empty."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_prepared(path: Path) -> Dataset:
    """data/prepared/'s arrays; a file that is not what prepare wrote is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `dvc repro prepare` first")
    remedy = ("it is damaged or was replaced; run `dvc repro` (DVC restores it from its cache "
              "or re-runs prepare)")
    try:
        with np.load(path) as arrays:
            data = Dataset(**{key: arrays[key] for key in Dataset.__dataclass_fields__})
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, TypeError, AttributeError,
            pickle.UnpicklingError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if "pickled" in reason:  # numpy's guess for any file that is not .npy/.npz
            reason = "not a NumPy .npz archive"
        raise DataError(f"{path} cannot be read as the prepare stage's arrays ({reason}): "
                        + remedy) from error
    for split in ("train", "val", "test"):
        images, labels = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        if (images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE)
                or labels.ndim != 1 or len(labels) != len(images)):
            raise DataError(f"{path}: x_{split} {images.shape} {images.dtype} / y_{split} "
                            f"{labels.shape} are not 28x28 uint8 images with one label each: "
                            + remedy)
    return data


# --- splits -------------------------------------------------------------------------------
# Two seeded stratified splits, each kept as it was first written: merging them into one
# would move images between the splits of data already prepared (and change its numbers).

def split_stratified(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held_out): ``round(fraction * n_c)`` of each class c held out, both
    shuffled. The same labels and seed always give the same split. The npm source's
    train/test split and the baseline's training subset."""
    rng = np.random.default_rng(seed)
    kept, held_out = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_out = int(round(fraction * len(members)))
        held_out.append(members[:n_out])
        kept.append(members[n_out:])
    return rng.permutation(np.concatenate(kept)), rng.permutation(np.concatenate(held_out))


def hold_out_validation(images: np.ndarray, labels: np.ndarray, size: int, seed: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_val, y_val): ``size`` images held out of train, stratified and
    seeded (scikit-learn's train_test_split); the prepare stage's validation set."""
    # imported here: scikit-learn takes a second to import, and config reads this module's facts
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    x_train, x_val, y_train, y_val = train_test_split(images, labels, test_size=size, stratify=labels,
                                                      random_state=seed)
    return x_train, y_train, x_val, y_val
