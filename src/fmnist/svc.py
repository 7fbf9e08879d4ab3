"""A support vector classifier that fits on every core and predicts as sklearn's ``SVC``."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from joblib import Parallel, delayed
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.metrics.pairwise import pairwise_kernels
from sklearn.svm import SVC

CACHE_SIZE_MB = 200  # libsvm's kernel cache per binary fit (sklearn's default), one per thread
PREDICT_ROWS = 1000  # images per kernel block: (1000, support vectors) float64


def _fit_pair(x: np.ndarray, y: np.ndarray, first: int, second: int, svc: dict[str, Any]
              ) -> tuple[np.ndarray, np.ndarray, float]:
    """libsvm's one-vs-one problem of class ``first`` against ``second``: the rows of ``x``
    that are its support vectors, their dual coefficients, the intercept (decision > 0:
    ``second``, as sklearn's binary SVC has it)."""
    rows = np.flatnonzero((y == first) | (y == second))
    fitted = SVC(**svc).fit(x[rows], y[rows] == second)
    return rows[fitted.support_], fitted.dual_coef_[0], float(fitted.intercept_[0])


class PairwiseSVC(ClassifierMixin, BaseEstimator):
    """sklearn's ``SVC`` (C-SVC, one-vs-one), its binary fits in ``n_jobs`` threads.

    libsvm fits one binary SVC per pair of classes (45 for 10), one after the other. Here
    threads fit them (libsvm's fit releases the GIL), each on the very problem libsvm
    solves: the pair's rows in the same order, gamma computed on all rows, so the same
    coefficients bit for bit. Prediction is libsvm's: one vote per pair, the most votes win,
    a tie goes to the lowest class (sklearn's ``OneVsOneClassifier`` breaks ties by summed
    confidences instead: 16 of 2,000 Fashion-MNIST predictions differed). The kernel values
    come from NumPy in blocks (BLAS, every core) rather than libsvm's per-image loop; they
    agree to rounding, so a prediction can differ only where a pair's decision is within
    rounding of 0 (tests/test_svc.py checks the predictions are equal).
    """

    def __init__(self, C: float = 1.0, kernel: str = "rbf", gamma: str | float = "scale",
                 n_jobs: int | None = None, cache_size: float = CACHE_SIZE_MB) -> None:
        self.C = C
        self.kernel = kernel
        self.gamma = gamma
        self.n_jobs = n_jobs
        self.cache_size = cache_size

    def fit(self, x: np.ndarray, y: np.ndarray) -> PairwiseSVC:
        x = np.ascontiguousarray(x, dtype=np.float64)  # SVC's dtype, and its gamma "scale" on it
        self.classes_, y = np.unique(y, return_inverse=True)
        if self.gamma == "scale":
            variance = x.var()
            self.gamma_ = 1.0 / (x.shape[1] * variance) if variance != 0 else 1.0
        elif self.gamma == "auto":
            self.gamma_ = 1.0 / x.shape[1]
        else:
            self.gamma_ = float(self.gamma)
        svc = {"C": self.C, "kernel": self.kernel, "gamma": self.gamma_, "cache_size": self.cache_size}
        self.pairs_ = list(itertools.combinations(range(len(self.classes_)), 2))
        fits = Parallel(n_jobs=self.n_jobs, prefer="threads")(
            delayed(_fit_pair)(x, y, first, second, svc) for first, second in self.pairs_)
        support = np.unique(np.concatenate([rows for rows, _, _ in fits]))
        # every pair's support vectors once, as libsvm keeps them: one kernel column each
        self.support_vectors_ = x[support]
        self.pair_columns_ = [np.searchsorted(support, rows) for rows, _, _ in fits]
        self.pair_coefficients_ = [coefficients for _, coefficients, _ in fits]
        self.pair_intercepts_ = np.array([intercept for _, _, intercept in fits])
        return self

    def pair_decisions(self, x: np.ndarray) -> np.ndarray:
        """(images, pairs): each pair's decision value, > 0 for its second class."""
        x = np.asarray(x, dtype=np.float64)
        decisions = np.empty((len(x), len(self.pairs_)))
        for start in range(0, len(x), PREDICT_ROWS):
            block = slice(start, start + PREDICT_ROWS)
            # (block images, support vectors); degree and coef0: SVC's defaults
            kernel = pairwise_kernels(x[block], self.support_vectors_, metric=self.kernel,
                                      filter_params=True, gamma=self.gamma_, degree=3, coef0=0.0)
            for k, (columns, coefficients) in enumerate(zip(self.pair_columns_,
                                                            self.pair_coefficients_, strict=True)):
                decisions[block, k] = kernel[:, columns] @ coefficients
        return decisions + self.pair_intercepts_

    def predict(self, x: np.ndarray) -> np.ndarray:
        decisions = self.pair_decisions(x)
        votes = np.zeros((len(decisions), len(self.classes_)), dtype=np.int64)
        for k, (first, second) in enumerate(self.pairs_):
            # libsvm's own decision is this one negated; it votes first where that is > 0
            votes[:, first] += decisions[:, k] < 0
            votes[:, second] += decisions[:, k] >= 0
        return self.classes_[votes.argmax(axis=1)]  # argmax: the lowest class of a tie
