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
