"""What a long `make run` prints so that a person can follow it: which model of how many a
stage is at, and one line per epoch with the monitored test accuracy and an ETA.

DVC passes the stages' output through to the terminal or to a log file: the lines are
plain (no carriage returns) so that both read well; Keras' per-step bar, which does
rewrite its line, is asked for only when stdout is a terminal (``keras_verbosity``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

# The per-epoch record's keys shown on the epoch line, in this order, when present.
SHOWN = ("loss", "accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy")


def stage_label(stage: str, variants: Sequence[str], seeds: Sequence[int], variant: str,
                seed: int) -> str:
    """``[train 5/27] cnn2_bn seed 1``: the model's place in dvc.yaml's variant x seed matrix
    (variants outer, seeds inner)."""
    variants, seeds = list(variants), list(seeds)
    if variant not in variants or seed not in seeds:  # called outside the matrix (a test, a script)
        return f"[{stage}] {variant} seed {seed}"
    position = variants.index(variant) * len(seeds) + seeds.index(seed) + 1
    return f"[{stage} {position}/{len(variants) * len(seeds)}] {variant} seed {seed}"


def keras_verbosity() -> int:
    """Keras' per-step progress bar (1) at a terminal; nothing (0) in a log, where the epoch
    line is this module's alone (Keras' own would repeat it)."""
    return 1 if sys.stdout.isatty() else 0


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class EpochLine:
    """Prints one line per finished epoch: label, epoch k/n, the record's losses and
    accuracies (the test set's marked as monitored), time per epoch and the ETA of the
    remaining epochs (mean epoch time of this attempt, so a resumed run estimates anew);
    with ``seeds_after`` (seeds this stage trains after this one, as many epochs each), also
    the ETA of the stage at the same pace."""

    def __init__(self, label: str, epochs: int, first_epoch: int = 0, seeds_after: int = 0):
        self.label = label
        self.epochs = epochs
        self.first_epoch = first_epoch
        self.seeds_after = seeds_after
        self.started = time.perf_counter()

    def text(self, record: dict[str, float], now: float) -> str:
        epoch = int(record["epoch"])
        done = epoch - self.first_epoch
        per_epoch = (now - self.started) / max(done, 1)
        values = " ".join(f"{'monitored ' if key.startswith('test_') else ''}{key} {record[key]:.4f}"
                          for key in SHOWN if key in record)
        eta = f"ETA {duration(per_epoch * (self.epochs - epoch))}" if epoch < self.epochs else "done"
        if self.seeds_after:
            stage_left = per_epoch * (self.epochs - epoch + self.seeds_after * self.epochs)
            eta += (f"; the stage's {self.seeds_after} seed{'s' if self.seeds_after > 1 else ''} "
                    f"after it: ETA {duration(stage_left)}")
        return (f"{self.label} | epoch {epoch}/{self.epochs} | {values} | "
                f"{duration(per_epoch)}/epoch, {eta}")

    def __call__(self, record: dict[str, float]) -> None:
        print(self.text(record, time.perf_counter()), flush=True)
