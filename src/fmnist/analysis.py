"""The analyse stage's computations: errors, confusions, convergence, and
statistics over seeds set beside the paper's numbers; the summary they make up. Reading
and writing files lives in analyse, drawing in plots, the Markdown in report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from fmnist import paper, paths
from fmnist.config import Config
from fmnist.records import DataInfo, RunInfo


@dataclass(frozen=True)
class TrainedRun:
    """What the train and evaluate stages left for one variant under one seed."""

    variant: str
    seed: int
    history: list[dict[str, float]]
    metrics: dict[str, Any]
    run_info: RunInfo

    @property
    def name(self) -> str:
        return paths.run_name(self.variant, self.seed)


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


def contrast(terms: Sequence[tuple[float, Spread]]) -> dict[str, Any]:
    """sum(weight * mean) over independent sets of seeds, with a two-sided t-test and its 95%
    interval, Welch-Satterthwaite degrees of freedom (None with fewer than 2 seeds in a set)."""
    result: dict[str, Any] = {"difference": sum(w * s.mean for w, s in terms),
                              "test": "Welch t-test (two-sided)", "p_value": None, "ci95": None}
    if any(s.n < 2 for _, s in terms):
        return result
    variances = [(w**2 * s.std**2 / s.n, s.n) for w, s in terms]
    total = sum(v for v, _ in variances)
    if total == 0:
        return result
    se = math.sqrt(total)
    dof = total**2 / sum(v**2 / (n - 1) for v, n in variances)
    half = stats.t.ppf(0.975, dof) * se
    result["p_value"] = float(2 * stats.t.sf(abs(result["difference"]) / se, dof))
    result["ci95"] = [result["difference"] - half, result["difference"] + half]
    return result


def compare(a: Spread, b: Spread) -> dict[str, Any]:
    """b - a, with Welch's t-test and its 95% interval (None with fewer than 2 seeds each)."""
    return contrast([(-1.0, a), (1.0, b)])


def averaged_effect(pairs: Sequence[tuple[str, str]], spreads: dict[str, Spread]) -> dict[str, Any]:
    """The mean of b - a over an ablation factor's pairs (a factor's main effect in a 2 x 2
    design: its change averaged over the other factor's levels), as one contrast."""
    weights: dict[str, float] = {}
    for a, b in pairs:
        weights[a] = weights.get(a, 0.0) - 1 / len(pairs)
        weights[b] = weights.get(b, 0.0) + 1 / len(pairs)
    return contrast([(w, spreads[v]) for v, w in weights.items() if w])


def verdict_word(comparison: dict[str, Any]) -> str:
    """supported (the 95% interval of b - a is above 0), contradicted (below), not supported
    (it holds 0), or cannot tell (fewer than two seeds)."""
    if comparison["ci95"] is None:
        return "cannot tell"
    low, high = comparison["ci95"]
    return "supported" if low > 0 else "contradicted" if high < 0 else "not supported"


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
    reference_epoch = paper.CONVERGENCE["reference_epoch"]
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


def summarise(config: Config, runs: list[TrainedRun], baseline: dict[str, Any],
              data_info: DataInfo) -> dict[str, Any]:
    """The analysis (reports/analysis/analysis.json; the analyse stage adds the error analysis
    and figures): per-variant spread over seeds, comparisons, convergence, the paper's numbers.
    Variants in the order of every table: the paper's rows (analyse.paper_models), then the
    others in params order."""
    paper_rows = config.analyse.paper_models
    order = [*paper_rows, *(v for v in config.variants if v not in paper_rows)]
    by_variant = {v: [r for r in runs if r.variant == v] for v in order}
    variants = {}
    spreads = {}
    for variant, variant_runs in by_variant.items():
        spreads[variant] = Spread(tuple(r.metrics["test_accuracy"] for r in variant_runs))
        entry = {"test_accuracy": spreads[variant].as_json()}
        for key in ("test_macro_f1", "test_loss", "best_epoch_test_accuracy_selected_on_test"):
            if all(key in r.metrics for r in variant_runs):
                entry[key] = Spread(tuple(r.metrics[key] for r in variant_runs)).as_json()
        entry["parameters"] = variant_runs[0].run_info.parameters
        entry["batch_norm"] = config.variants[variant].batch_norm
        entry["train_seconds_mean"] = float(np.mean([r.run_info.train_seconds for r in variant_runs]))
        paper_model = config.analyse.paper_models.get(variant)
        if paper_model:
            entry["paper_model"] = paper_model
            entry["paper_test_accuracy"] = round(paper.MODELS[paper_model] / 100, 4)
        variants[variant] = entry
    # the paper's CNN2 (the first variant that reproduces it) is what batch norm is set against
    reference = next((v for v, model in config.analyse.paper_models.items() if model == "CNN2"),
                     next(iter(config.variants)))
    # the claims of analyse.comparisons, not every pair: a variant a user adds is compared only
    # when they list it there
    comparisons = {f"{c.b} - {c.a}": {"claim": c.claim, "a": c.a, "b": c.b, "paper": c.paper,
                                      "group": c.group, **compare(spreads[c.a], spreads[c.b])}
                   for c in config.analyse.comparisons}
    # each ablation factor (the comparisons of one group) averaged over its levels
    pairs: dict[str, list[tuple[str, str]]] = {}
    for c in config.analyse.comparisons:
        if c.group:
            pairs.setdefault(c.group, []).append((c.a, c.b))
    factors = {group: averaged_effect(group_pairs, spreads) for group, group_pairs in pairs.items()}
    histories = {v: [r.history for r in rs] for v, rs in by_variant.items()}
    return {
        "data": {"source": data_info.source, "canonical_split": data_info.canonical_split,
                 "note": data_info.note},
        "seeds": list(config.train.seeds),
        "epochs": config.train.epochs,
        "variants": variants,
        "baseline": baseline,
        "comparisons": comparisons,
        "factors": factors,
        "convergence": convergence(histories, reference, config.analyse.loss_levels),
    }


PAPER_MODEL_TAG = "paper_model"


def paper_model_tag(config: Config, variant: str) -> str:
    """What a variant's MLflow runs stand for: the paper's model it reproduces
    (analyse.paper_models), else ours, beside or beyond the paper (analyse.beyond_paper)."""
    if variant in config.analyse.paper_models:
        return config.analyse.paper_models[variant]
    return "none: ours, beyond the paper" if variant in config.analyse.beyond_paper else "none: ours"


def error_analysis(errors: list[dict[str, Any]], confusion: np.ndarray, report: dict[str, Any],
                   class_names: tuple[str, ...], k: int, run: str) -> dict[str, Any]:
    """One run's k highest cross-entropy errors (``errors``: its misclassified images,
    highest first), most confused pairs and per-class scores (Fig. 8, Tables III and IV)."""
    return {"run": run, "top_errors": errors[:k],
            "confused_pairs": confused_pairs(confusion, class_names),
            "per_class": {name: report[name] for name in class_names}}


def convergence_claim(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The paper's "batch norm converges ~4x faster" against our runs (None with fewer epochs
    than the check needs): the variants of the paper's claims, each one's first epoch
    at the reference's loss, and how many times faster the batch-norm ones among the paper's
    rows (analyse.paper_models) are (mean curves and every seed); ``verdict``: supported (3x
    or more), partly (faster), not supported, or cannot tell (no batch-norm paper row)."""
    check = summary["convergence"].get("paper_check")
    if not check:
        return None
    reference = check["reference_epoch"]
    # the variants params.yaml sets beside the paper (analyse.paper_models, analyse.comparisons);
    # a variant a user adds to `variants` alone is not part of the paper's claims
    claimed = ({v for v, entry in summary["variants"].items() if "paper_model" in entry}
               | {c[side] for c in summary["comparisons"].values() for side in ("a", "b")})
    variants, factors = [], []
    for variant, epoch in check["first_epoch"].items():
        if variant == check["reference_variant"] or variant not in claimed:
            continue
        seeds = check.get("per_seed", {}).get(variant, [])
        variants.append({"variant": variant, "epoch": epoch, "per_seed": seeds})
        entry = summary["variants"][variant]
        if entry["batch_norm"] and "paper_model" in entry:
            factors.append(reference / epoch if epoch else 0.0)
            factors += [reference / e if e else 0.0 for e in seeds]
    if not factors:
        verdict = "cannot tell"
    elif min(factors) >= 3:
        verdict = "supported"
    elif min(factors) > 1:
        verdict = "partly"
    else:
        verdict = "not supported"
    return {"verdict": verdict, "factors": (min(factors), max(factors)) if factors else None,
            "variants": variants, "reference_variant": check["reference_variant"],
            "reference_epoch": reference, "loss": check["loss"]}


def check_claims(summary: dict[str, Any]) -> dict[str, Any]:
    """Each claim's verdict: the comparisons of analyse.comparisons (``verdict``: see
    verdict_word); per ablation factor (a comparisons ``group``), its verdict at each level of
    the other factor and its averaged effect's (``factors``); ``carried``: the factors whose
    averaged effect is supported and reversed at no level; the convergence claim (None when
    the runs are too short)."""
    comparisons = [{"key": key, **comparison, "verdict": verdict_word(comparison)}
                   for key, comparison in summary["comparisons"].items()]
    factors: dict[str, dict[str, Any]] = {
        group: {**effect, "verdict": verdict_word(effect), "levels": []}
        for group, effect in summary.get("factors", {}).items()}
    for comparison in comparisons:
        if comparison["group"]:
            factors[comparison["group"]]["levels"].append(comparison["verdict"])
    carried = [group for group, factor in factors.items()
               if factor["verdict"] == "supported" and "contradicted" not in factor["levels"]]
    return {"comparisons": comparisons, "factors": factors, "carried": carried,
            "convergence": convergence_claim(summary)}


def compact(summary: dict[str, Any]) -> dict[str, Any]:
    """metrics/summary.json: the numbers `dvc metrics show` and `dvc exp show` compare
    (the full analysis is reports/analysis/analysis.json)."""
    def r(value: float | None) -> float | None:  # 6 decimals: 0.0001 % of accuracy
        return None if value is None else round(float(value), 6)

    variants = {}
    for variant, entry in summary["variants"].items():
        accuracy = entry["test_accuracy"]
        variants[variant] = {
            "seeds": accuracy["n"], "test_accuracy_mean": r(accuracy["mean"]),
            "test_accuracy_std": r(accuracy["std"]),
            "test_accuracy_ci95_low": r(accuracy["ci95"][0]) if accuracy["ci95"] else None,
            "test_accuracy_ci95_high": r(accuracy["ci95"][1]) if accuracy["ci95"] else None,
            "test_macro_f1_mean": r(entry["test_macro_f1"]["mean"]),
            "paper_test_accuracy": entry.get("paper_test_accuracy"),
        }
    return {
        "canonical_split": summary["data"]["canonical_split"],
        "variants": variants,
        "baseline": {**{k: summary["baseline"][k] for k in ("test_accuracy", "test_macro_f1", "train_size")
                        if k in summary["baseline"]},
                     "paper_test_accuracy": round(next(
                         v for k, v in paper.BASELINES.items() if k.startswith("SVC")) / 100, 4)},
        "comparisons": {name: {"difference": r(c["difference"]),
                               "ci95_low": r(c["ci95"][0]) if c["ci95"] else None,
                               "ci95_high": r(c["ci95"][1]) if c["ci95"] else None,
                               "p_value": r(c["p_value"]), "test": c["test"], "claim": c["claim"]}
                        for name, c in summary["comparisons"].items()},
    }


def numeric_summary(metrics: dict[str, Any]) -> dict[str, float]:
    """The compact summary's numbers, flattened for MLflow."""
    flat = {}
    for variant, entry in metrics["variants"].items():
        flat.update({f"{variant}.{key}": value for key, value in entry.items()
                     if isinstance(value, float) and key != "seeds"})  # a count is no metric
    if "test_accuracy" in metrics["baseline"]:
        flat["baseline.test_accuracy"] = metrics["baseline"]["test_accuracy"]
    return flat
