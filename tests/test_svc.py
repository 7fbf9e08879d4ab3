"""PairwiseSVC: sklearn's SVC, its one-vs-one fits in parallel, with SVC's predictions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.svm import SVC

from fmnist.svc import PairwiseSVC


def overlapping_classes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """10 classes of 20-dim Gaussians whose means lie close: many points sit among another
    class's, so that predictions are far from perfect and votes tie."""
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(0).normal(0.0, 0.7, size=(10, 20))
    labels = rng.integers(0, 10, size=n)
    return means[labels] + rng.normal(size=(n, 20)), labels


@pytest.mark.parametrize(("kernel", "gamma"), [("rbf", "scale"), ("rbf", 0.02), ("poly", "auto"),
                                               ("linear", "scale"), ("sigmoid", "scale")])
def test_the_parallel_fit_predicts_as_svc(kernel, gamma):
    x, y = overlapping_classes(1200, seed=1)
    x_test, y_test = overlapping_classes(1000, seed=2)
    svc = SVC(C=10.0, kernel=kernel, gamma=gamma, decision_function_shape="ovo").fit(x, y)
    pairwise = PairwiseSVC(C=10.0, kernel=kernel, gamma=gamma, n_jobs=2).fit(x, y)
    # each pair's binary fit is libsvm's own (SVC's decision is the negative of ours)
    np.testing.assert_allclose(pairwise.pair_decisions(x_test), -svc.decision_function(x_test),
                               rtol=1e-9, atol=1e-9)
    expected = svc.predict(x_test)
    np.testing.assert_array_equal(pairwise.predict(x_test), expected)
    if kernel == "rbf":  # data where the tie-breaking and the mistakes matter
        assert 0.3 < np.mean(expected == y_test) < 0.9
        votes = np.stack([np.bincount(row, minlength=10) for row in _pair_winners(svc, x_test)])
        top_two = np.sort(votes, axis=1)[:, -2:]
        assert np.sum(top_two[:, 0] == top_two[:, 1]) >= 10  # ties, won by the lowest class


def _pair_winners(svc: SVC, x: np.ndarray) -> np.ndarray:
    """(images, pairs): the class each of libsvm's pairwise classifiers votes for."""
    pairs = [(i, j) for i in range(10) for j in range(i + 1, 10)]
    decisions = svc.decision_function(x)
    return np.array([[i if d > 0 else j for d, (i, j) in zip(row, pairs, strict=True)] for row in decisions])


def test_the_thread_count_changes_nothing():
    x, y = overlapping_classes(600, seed=3)
    labels = np.array(["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"])[y]  # any class labels
    one, every = (PairwiseSVC(C=10.0, n_jobs=n).fit(x, labels) for n in (1, -1))
    np.testing.assert_array_equal(one.predict(x), every.predict(x))
    np.testing.assert_array_equal(one.predict(x), SVC(C=10.0).fit(x, labels).predict(x))
