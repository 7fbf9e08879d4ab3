"""The prepare stage: verify data/raw/, validate it, hold out a validation set, write .npz."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fmnist.data import (
    CANONICAL_MD5,
    FULL_COUNTS,
    IMAGE_SIZE,
    NUM_CLASSES,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    DataError,
    Dataset,
    hold_out_validation,
)
from fmnist.files import atomic_path, file_digest
from fmnist.idx import IdxError, read_idx
from fmnist.records import DataInfo, SourceInfo, SplitSizes


def verify_raw(raw_dir: Path) -> SourceInfo:
    """Check every raw file against the checksum the download stage recorded."""
    info = SourceInfo.read(Path(raw_dir) / SourceInfo.FILE)
    for name in CANONICAL_MD5:
        path = Path(raw_dir) / name
        if not path.is_file():
            raise DataError(f"{path} is missing; run `dvc repro` (it re-runs download)")
        actual = file_digest(path)
        if actual != info.md5.get(name):
            raise DataError(
                f"{path}: checksum mismatch (md5 {actual}, but download recorded "
                f"{info.md5.get(name)}): the file is corrupt or was changed after download. "
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
            validation_seed: int) -> tuple[Dataset, DataInfo]:
    """Verify, validate and split data/raw/ into one .npz; returns the data and its info."""
    source = verify_raw(raw_dir)
    full = source.canonical_split or source.source == "npm"
    x_train, y_train = _read(raw_dir / TRAIN_IMAGES), _read(raw_dir / TRAIN_LABELS)
    x_test, y_test = _read(raw_dir / TEST_IMAGES), _read(raw_dir / TEST_LABELS)
    validate_split("train", x_train, y_train, full)
    validate_split("test", x_test, y_test, full)
    if validation_size >= len(y_train):
        raise DataError(f"data.validation_size = {validation_size} is not smaller than the "
                        f"training set ({len(y_train)} images)")
    if validation_size > 0:
        x_train, y_train, x_val, y_val = hold_out_validation(x_train, y_train, validation_size,
                                                             validation_seed)
    else:
        x_val = np.empty((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        y_val = np.empty((0,), np.uint8)
    data = Dataset(x_train, y_train, x_val, y_val, x_test, y_test)
    with atomic_path(out_file) as tmp:
        with tmp.open("wb") as f:
            np.savez_compressed(f, **vars(data))
    info = DataInfo(source=source.source, origin=source.origin, canonical_split=source.canonical_split,
                    split_seed=source.split_seed, note=source.note,
                    sizes=SplitSizes(train=len(y_train), validation=len(y_val), test=len(y_test)),
                    validation_seed=validation_seed)
    info.write(info_file)
    return data, info
