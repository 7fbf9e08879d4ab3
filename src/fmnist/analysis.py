"""The analyse stage's computations: errors, confusions, feature maps, convergence, and
statistics over seeds set beside the paper's numbers. Drawing lives in plots, the
Markdown in report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from scipy import stats

from fmnist.data import to_inputs
from fmnist.evaluation import cross_entropy
from fmnist.models import feature_layer_names

# The paper's Tables I and II (test accuracy, %) and Table IV (its best model).
PAPER_BASELINES = {"SVC (C=10, rbf) [1]": 89.70, "EDEN [21]": 90.60}
PAPER_MODELS = {"CNN2": 91.17, "CNN2+BN": 92.22, "CNN2+BN+Skip": 92.54}  # analyse.paper_models maps
PAPER_TABLE_IV = {  # class label -> (precision, recall, F1)
    0: (0.88, 0.86, 0.87), 1: (0.99, 0.98, 0.99), 2: (0.90, 0.85, 0.88), 3: (0.92, 0.93, 0.92),
    4: (0.87, 0.88, 0.88), 5: (0.99, 0.99, 0.99), 6: (0.75, 0.80, 0.77), 7: (0.96, 0.97, 0.97),
    8: (0.99, 0.99, 0.99), 9: (0.98, 0.97, 0.97),
}
PAPER_TOP_ERRORS = [("Ankle boot", "Sneaker"), ("Sandal", "Ankle boot"), ("T-shirt/top", "Pullover"),
                    ("Dress", "Trouser"), ("Shirt", "Coat"), ("Ankle boot", "Sneaker")]
# "With Batch Normalization we were able to achieve the same loss function value after
# 10 epochs which was achieved after 40 epochs without" (section III-B).
PAPER_CONVERGENCE = {"reference_epoch": 40, "batch_norm_epoch": 10}


def top_errors(probabilities: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k misclassified examples with the highest cross-entropy, highest first."""
    losses = cross_entropy(probabilities, labels)
    wrong = np.flatnonzero(probabilities.argmax(axis=1) != labels)
    order = np.argsort(-losses[wrong], kind="stable")
    return wrong[order[:k]]


def confused_pairs(confusion: np.ndarray, class_names: Sequence[str], n: int = 6) -> list[dict]:
    """The n largest off-diagonal cells: (actual, predicted, count), largest first."""
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:n]
    pairs = []
    for index in flat:
        actual, predicted = np.unravel_index(index, off.shape)
        if off[actual, predicted] > 0:
            pairs.append({"actual": class_names[actual], "predicted": class_names[predicted],
                          "count": int(off[actual, predicted])})
    return pairs


def first_of_class(labels: np.ndarray, label: int) -> int:
    matches = np.flatnonzero(labels == label)
    if not len(matches):
        raise ValueError(f"the test set has no image of class {label}")
    return int(matches[0])


def feature_maps(model: keras.Model, image: np.ndarray) -> list[np.ndarray]:
    """Each conv block's activated output for one (28, 28) uint8 image, as (channels, h, w)."""
    names = feature_layer_names(model)
    probe = keras.Model(model.inputs[0], [model.get_layer(name).output for name in names])
    # a direct call, not predict(): no step function is compiled for one image
    outputs = probe(to_inputs(image[np.newaxis]), training=False)
    if not isinstance(outputs, list | tuple):
        outputs = [outputs]
    # (1, h, w, channels) -> (channels, h, w); float32 also for a model trained in bfloat16
    return [np.transpose(keras.ops.convert_to_numpy(output)[0].astype("float32"), (2, 0, 1))
            for output in outputs]


def first_epoch_at_or_below(losses: Sequence[float], level: float) -> int | None:
    """1-based epoch at which the loss first reaches ``level``; None if it never does."""
    for epoch, loss in enumerate(losses, start=1):
        if loss <= level:
            return epoch
    return None


@dataclass(frozen=True)
class Spread:
    """A metric over seeds: mean, sample standard deviation and a 95% t-interval."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float | None:
        return float(np.std(self.values, ddof=1)) if self.n > 1 else None

    @property
    def ci95(self) -> tuple[float, float] | None:
        if self.n < 2:
            return None
        half = stats.t.ppf(0.975, self.n - 1) * self.std / math.sqrt(self.n)
        return (self.mean - half, self.mean + half)

    def as_json(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean, "std": self.std,
                "ci95": list(self.ci95) if self.ci95 else None, "values": list(self.values)}


def compare(a: Spread, b: Spread) -> dict[str, Any]:
    """b - a, with Welch's t-test and its 95% interval (None with fewer than 2 seeds each)."""
    result: dict[str, Any] = {"difference": b.mean - a.mean, "test": "Welch t-test (two-sided)",
                              "p_value": None, "ci95": None}
    if a.n < 2 or b.n < 2:
        return result
    va, vb = a.std**2 / a.n, b.std**2 / b.n
    se = math.sqrt(va + vb)
    if se == 0:
        return result
    dof = (va + vb) ** 2 / (va**2 / (a.n - 1) + vb**2 / (b.n - 1))
    half = stats.t.ppf(0.975, dof) * se
    result["p_value"] = float(2 * stats.t.sf(abs(result["difference"]) / se, dof))
    result["ci95"] = [result["difference"] - half, result["difference"] + half]
    return result


def verdict_word(comparison: dict[str, Any]) -> str:
    """supported (the 95% interval of b - a is above 0), contradicted (below), not supported
    (it holds 0), or cannot tell (fewer than two seeds)."""
    if comparison["ci95"] is None:
        return "cannot tell"
    low, high = comparison["ci95"]
    return "supported" if low > 0 else "contradicted" if high < 0 else "not supported"


def verdict(comparison: dict[str, Any], claim: str, paper_difference: float | None = None) -> str:
    """Plain words on whether a difference supports a claim that b beats a; with the paper's
    difference (points), whether our interval contains it."""
    difference = comparison["difference"] * 100
    word = verdict_word(comparison)
    if comparison["ci95"] is None:
        return (f"{claim}: {word} (difference {difference:+.2f} points from fewer than two "
                "seeds per variant; add seeds in train.seeds)")
    low, high = (100 * v for v in comparison["ci95"])
    word = {"not supported": "not supported: the difference is within seed noise",
            "contradicted": "contradicted (the other way round)"}.get(word, word)
    text = (f"{claim}: {word} (difference {difference:+.2f} points, 95% CI [{low:+.2f}, {high:+.2f}], "
            f"p = {comparison['p_value']:.3f}")
    if paper_difference is not None:
        where = "inside" if low <= paper_difference <= high else "outside"
        text += f"; the paper's {paper_difference:+.2f} is {where} this interval"
    return text + ")"


def mean_curve(histories: Sequence[Sequence[dict[str, float]]], key: str
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(epochs, mean over runs, (min, max)) of one history key, over the shortest history."""
    length = min(len(h) for h in histories)
    values = np.array([[record[key] for record in h[:length]] for h in histories], dtype=float)
    return np.arange(1, length + 1), values.mean(axis=0), np.stack([values.min(0), values.max(0)])


def convergence(histories: dict[str, list[list[dict[str, float]]]], reference_variant: str,
                levels: Sequence[float]) -> dict[str, Any]:
    """How fast each variant's training loss falls; ``histories`` lists each variant's runs
    in the same seed order.

    ``levels``: the first epoch each variant's mean curve reaches each given loss.
    ``paper_check``: the loss the reference variant's mean curve has after the paper's epoch
    40, and the first epoch at which every variant's mean curve reaches it (the paper: 10
    with batch norm); ``per_seed`` repeats the check within each seed (seed k's reference
    run against seed k's run of every variant), so its spread shows the seed noise.
    """
    curves = {name: mean_curve(runs, "loss")[1] for name, runs in histories.items()}
    result: dict[str, Any] = {
        "levels": {name: {str(level): first_epoch_at_or_below(curve, level) for level in levels}
                   for name, curve in curves.items()}}
    reference_epoch = PAPER_CONVERGENCE["reference_epoch"]
    reference = curves.get(reference_variant)
    if reference is not None and len(reference) >= reference_epoch:
        target = float(reference[reference_epoch - 1])
        per_seed = {name: [] for name in histories}
        for k, reference_run in enumerate(histories[reference_variant]):
            seed_target = reference_run[reference_epoch - 1]["loss"]
            for name, runs in histories.items():
                if k < len(runs):
                    per_seed[name].append(first_epoch_at_or_below(
                        [record["loss"] for record in runs[k]], seed_target))
        result["paper_check"] = {
            "reference_variant": reference_variant, "reference_epoch": reference_epoch,
            "loss": target,
            "first_epoch": {name: first_epoch_at_or_below(curve, target)
                            for name, curve in curves.items()},
            "per_seed": per_seed}
    return result
