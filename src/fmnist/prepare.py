"""The prepare stage: verify data/raw/, validate it, hold out a validation set, write .npz."""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from fmnist.config import IMAGE_SIZE, NUM_CLASSES
from fmnist.download import CANONICAL_MD5, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS
from fmnist.files import atomic_path, file_digest, read_json, write_json
from fmnist.idx import IdxError, read_idx

FULL_COUNTS = {"train": 60_000, "test": 10_000}


class DataError(ValueError):
    """data/raw/ or data/prepared/ is not what the pipeline expects."""


@dataclass(frozen=True)
class Dataset:
    """Images (n, 28, 28) uint8 and labels (n,) uint8; the validation set may be empty."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def verify_raw(raw_dir: Path) -> dict[str, Any]:
    """Check every raw file against the checksum the download stage recorded."""
    info = read_json(Path(raw_dir) / "source.json", "written by the download stage")
    for name in CANONICAL_MD5:
        path = Path(raw_dir) / name
        if not path.is_file():
            raise DataError(f"{path} is missing; run `dvc repro` (it re-runs download)")
        actual = file_digest(path)
        if actual != info["md5"][name]:
            raise DataError(
                f"{path}: checksum mismatch (md5 {actual}, but download recorded "
                f"{info['md5'][name]}): the file is corrupt or was changed after download. "
                "Run `dvc repro` to restore it (DVC sees the change and re-runs download).")
    return info


def _read(path: Path) -> np.ndarray:
    try:
        return read_idx(path)
    except IdxError as error:
        raise DataError(str(error)) from error


def validate_split(name: str, images: np.ndarray, labels: np.ndarray, full: bool) -> None:
    """28x28 uint8 images, labels 0..9 matching in number; with ``full``, the Fashion-MNIST
    sizes (60,000/10,000 images, 6,000/1,000 per class)."""
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{name} images have shape {images.shape}, expected (n, 28, 28)")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{name}: {len(images)} images but labels of shape {labels.shape}")
    if len(labels) == 0 or labels.max() >= NUM_CLASSES:
        raise DataError(f"{name} labels must be 0..{NUM_CLASSES - 1} (got max "
                        f"{labels.max() if len(labels) else 'none'})")
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    if full:
        expected = FULL_COUNTS[name]
        if len(labels) != expected or (counts != expected // NUM_CLASSES).any():
            raise DataError(f"{name}: {len(labels)} images, per class {counts.tolist()}; "
                            f"Fashion-MNIST has {expected}, {expected // NUM_CLASSES} per class")
    elif (counts == 0).any():
        raise DataError(f"{name}: classes {np.flatnonzero(counts == 0).tolist()} have no images")


def prepare(raw_dir: Path, out_file: Path, info_file: Path, validation_size: int,
            validation_seed: int) -> tuple[Dataset, dict[str, Any]]:
    """Verify, validate and split data/raw/ into one .npz; returns the data and its info."""
    source = verify_raw(raw_dir)
    full = source["canonical_split"] or source["source"] == "npm"
    x_train, y_train = _read(raw_dir / TRAIN_IMAGES), _read(raw_dir / TRAIN_LABELS)
    x_test, y_test = _read(raw_dir / TEST_IMAGES), _read(raw_dir / TEST_LABELS)
    validate_split("train", x_train, y_train, full)
    validate_split("test", x_test, y_test, full)
    if validation_size >= len(y_train):
        raise DataError(f"data.validation_size = {validation_size} is not smaller than the "
                        f"training set ({len(y_train)} images)")
    if validation_size > 0:
        x_train, x_val, y_train, y_val = train_test_split(
            x_train, y_train, test_size=validation_size, stratify=y_train,
            random_state=validation_seed)
    else:
        x_val = np.empty((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        y_val = np.empty((0,), np.uint8)
    data = Dataset(x_train, y_train, x_val, y_val, x_test, y_test)
    with atomic_path(out_file) as tmp:
        with tmp.open("wb") as f:
            np.savez_compressed(f, **vars(data))
    info = {
        "source": source["source"],
        "origin": source["origin"],
        "canonical_split": source["canonical_split"],
        "split_seed": source["split_seed"],
        "note": source["note"],
        "sizes": {"train": len(y_train), "validation": len(y_val), "test": len(y_test)},
        "validation_seed": validation_seed,
    }
    write_json(info_file, info)
    return data, info


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


def data_info(info_file: Path) -> dict[str, Any]:
    return read_json(info_file, "written by the prepare stage")
