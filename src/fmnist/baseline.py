"""The baseline stage: the paper's Table I support vector classifier (RBF kernel, C=10),
on pixels scaled to zero mean and unit variance as the Fashion-MNIST benchmark did."""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fmnist import tracking
from fmnist.config import BaselineConfig
from fmnist.data import Dataset, split_stratified
from fmnist.records import BaselineMetrics, DataInfo
from fmnist.scoring import score, tracked_results
from fmnist.svc import PairwiseSVC


def train_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Indices of a stratified, seeded subset of ``size`` training images (all when size >= n)."""
    if size >= len(labels):
        return np.arange(len(labels))
    kept, _ = split_stratified(labels, 1 - size / len(labels), seed)
    return np.sort(kept)


def run_baseline(config: BaselineConfig, data: Dataset, class_names: tuple[str, ...],
                 experiment: str, data_info: DataInfo) -> BaselineMetrics:
    """Fit and score the SVC as its own MLflow run (its Duration covers the fit); return the
    metrics of metrics/baseline.json."""
    subset = train_subset(data.y_train, config.train_size, config.seed)
    x_train = data.x_train[subset].reshape(len(subset), -1).astype("float32")
    x_test = data.x_test.reshape(len(data.x_test), -1).astype("float32")
    # sklearn's SVC, its fit over every core (n_jobs), with the same predictions
    classifier = make_pipeline(StandardScaler(), PairwiseSVC(C=config.C, kernel=config.kernel,
                                                             gamma=config.gamma, n_jobs=config.n_jobs))
    experiment_id = tracking.connect(experiment)
    tags = {"kind": "baseline", "variant": "svc", "data_source": data_info.source,
            "canonical_split": str(data_info.canonical_split)}
    with tracking.run(experiment_id, "svc-baseline", tags):
        tracking.log_params({"svc.kernel": config.kernel, "svc.C": config.C, "svc.gamma": config.gamma,
                             "svc.train_size": len(subset), "svc.seed": config.seed,
                             "svc.scaling": "standard", "svc.n_jobs": config.n_jobs})
        tracking.log_dataset("fashion-mnist-train", data.x_train[subset], data.y_train[subset], "training",
                             data_info)
        tracking.log_dataset("fashion-mnist-test", data.x_test, data.y_test, "testing", data_info)
        started = time.perf_counter()
        classifier.fit(x_train, data.y_train[subset])
        fit_seconds = time.perf_counter() - started
        started = time.perf_counter()
        predictions = classifier.predict(x_test)
        predict_seconds = time.perf_counter() - started
        one_hot = np.eye(len(class_names), dtype="float32")[predictions]
        metrics = BaselineMetrics(**asdict(score(one_hot, data.y_test, class_names).scores),
                                  train_seconds=round(fit_seconds, 1),
                                  predict_seconds=round(predict_seconds, 1), train_size=int(len(subset)))
        tracking.log_results(tracked_results(metrics))
    return metrics
