"""Every figure of the paper, drawn with matplotlib (Agg: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fmnist.files import atomic_path  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def dataset_grid(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], path: Path,
                 per_class: int = 10) -> None:
    """The paper's Fig. 1: one row per class, its label and name, then example images."""
    n_classes = len(class_names)
    fig, axes = plt.subplots(n_classes, per_class, figsize=(per_class * 0.8 + 1.6, n_classes * 0.8))
    for label, row in enumerate(axes):
        examples = np.flatnonzero(labels == label)[:per_class]
        for column, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if column < len(examples):
                ax.imshow(images[examples[column]], cmap="gray_r")
        row[0].set_ylabel(f"{label} {class_names[label]}", rotation=0, ha="right", va="center",
                          fontsize=9)
    fig.suptitle("Fashion-MNIST: examples per class")
    _save(fig, path)


def confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: Path, title: str) -> None:
    """The paper's Fig. 9: counts, rows actual and columns predicted."""
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(matrix, cmap="Blues")
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=8,
                    color="white" if matrix[i, j] > threshold else "black")
    labels = [f"{i} {name}" for i, name in enumerate(class_names)]
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("Actual class")
    ax.set_title(title)
    _save(fig, path)


def error_grid(images: np.ndarray, captions: Sequence[str], path: Path, title: str) -> None:
    """The paper's Fig. 8: the misclassified images with the highest cross-entropy (a
    model that makes no test error gets a figure that says so)."""
    n = len(images)
    if n == 0:
        fig, ax = plt.subplots(figsize=(4, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "no misclassified test image", ha="center", va="center")
        fig.suptitle(title)
        _save(fig, path)
        return
    columns = min(n, 3)
    rows = max(1, -(-n // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, caption in zip(axes.ravel(), images, captions, strict=False):
        ax.imshow(image, cmap="gray_r")
        ax.set_title(caption, fontsize=8)
    fig.suptitle(title)
    _save(fig, path)


def _mosaic(maps: np.ndarray, columns: int) -> np.ndarray:
    """(channels, h, w) -> one (rows * (h + 1) - 1, columns * (w + 1) - 1) image: the channels
    row by row, each scaled to [0, 1] on its own (as one imshow per channel would), NaN between
    them (drawn blank)."""
    channels, h, w = maps.shape
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    scaled = np.divide(maps - low, span, out=np.zeros(maps.shape), where=span > 0)
    rows = -(-channels // columns)
    mosaic = np.full((rows * (h + 1) - 1, columns * (w + 1) - 1), np.nan)
    for channel in range(channels):
        row, column = divmod(channel, columns)
        mosaic[row * (h + 1):row * (h + 1) + h, column * (w + 1):column * (w + 1) + w] = scaled[channel]
    return mosaic


def feature_maps(image: np.ndarray, maps: Sequence[np.ndarray], layer_names: Sequence[str],
                 path: Path, title: str) -> None:
    """The paper's Figs. 5-7: the input image, then every channel of each conv layer's
    output, 8 to a row (channel 1 top left), each channel in its own colour scale; ``maps``
    holds one (channels, h, w) array per layer. One image per layer, not one axes per channel
    (dozens of axes took seconds per figure)."""
    columns = 8
    mosaics = [_mosaic(np.asarray(m, dtype=float), columns) for m in maps]
    heights = [1.4] + [1.1 * -(-len(m) // columns) for m in maps]
    fig, axes = plt.subplots(len(heights), 1, figsize=(columns * 1.1, sum(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    axes = axes[:, 0]
    for ax in axes:
        ax.axis("off")
    axes[0].imshow(image, cmap="gray_r")
    axes[0].set_title("input", fontsize=8)
    colours = plt.get_cmap("viridis").with_extremes(bad="white")
    for ax, mosaic, name, layer_maps in zip(axes[1:], mosaics, layer_names, maps, strict=True):
        ax.imshow(mosaic, cmap=colours, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{name}: channels 1-{len(layer_maps)}, 8 to a row", fontsize=8)
    fig.suptitle(title)
    _save(fig, path)


def training_curves(curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], path: Path,
                    ylabel: str, title: str) -> None:
    """Figs. 2-3: one line per variant (mean over seeds) with the seeds' min-max band.

    ``curves`` maps a label to (epochs, mean, (min, max) stacked as shape (2, epochs)).
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (epochs, mean, band) in curves.items():
        (line,) = ax.plot(epochs, mean, label=label)
        if band[0].shape == mean.shape and not np.allclose(band[0], band[1]):
            ax.fill_between(epochs, band[0], band[1], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("Epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
