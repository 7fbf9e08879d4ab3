"""The analyse stage's computations: errors, confusions, convergence, and
statistics over seeds set beside the paper's numbers; the summary they make up. Reading
and writing files lives in analyse, drawing in plots, the Markdown in report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from fmnist import paper, paths
from fmnist.config import Config
from fmnist.records import (
    Analysis,
    BaselineMetrics,
    BaselineSummary,
    Comparison,
    ComparisonSummary,
    ConfusedPair,
    Contrast,
    Convergence,
    DataFacts,
    DataInfo,
    ErrorAnalysis,
    Misclassified,
    PaperCheck,
    RunInfo,
    RunMetrics,
    Spread,
    Summary,
    VariantResult,
    VariantSummary,
)


@dataclass(frozen=True)
class TrainedRun:
    """What the train and evaluate stages left for one variant under one seed."""

    variant: str
    seed: int
    history: list[dict[str, float]]
    metrics: RunMetrics
    run_info: RunInfo

    @property
    def name(self) -> str:
        return paths.run_name(self.variant, self.seed)


def confused_pairs(confusion: np.ndarray, class_names: Sequence[str], n: int = 6) -> list[ConfusedPair]:
    """The n largest off-diagonal cells (rows actual, columns predicted), largest first."""
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:n]
    pairs = []
    for index in flat:
        actual, predicted = np.unravel_index(index, off.shape)
        if off[actual, predicted] > 0:
            pairs.append(ConfusedPair(actual=class_names[actual], predicted=class_names[predicted],
                                      count=int(off[actual, predicted])))
    return pairs


def first_epoch_at_or_below(losses: Sequence[float], level: float) -> int | None:
    """1-based epoch at which the loss first reaches ``level``; None if it never does."""
    for epoch, loss in enumerate(losses, start=1):
        if loss <= level:
            return epoch
    return None


def spread(values: Sequence[float]) -> Spread:
    """A metric over seeds: mean, sample standard deviation and a 95% t-interval."""
    values = tuple(values)
    n, mean = len(values), float(np.mean(values))
    if n < 2:
        return Spread(n=n, mean=mean, std=None, ci95=None, values=values)
    std = float(np.std(values, ddof=1))
    half = stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)
    return Spread(n=n, mean=mean, std=std, ci95=(mean - half, mean + half), values=values)


WELCH = "Welch t-test (two-sided)"


def contrast(terms: Sequence[tuple[float, Spread]]) -> Contrast:
    """sum(weight * mean) over independent sets of seeds, with a two-sided t-test and its 95%
    interval, Welch-Satterthwaite degrees of freedom (None with fewer than 2 seeds in a set)."""
    difference = sum(w * s.mean for w, s in terms)
    untested = Contrast(difference=difference, test=WELCH, p_value=None, ci95=None)
    if any(s.n < 2 for _, s in terms):
        return untested
    variances = [(w**2 * s.std**2 / s.n, s.n) for w, s in terms]
    total = sum(v for v, _ in variances)
    if total == 0:
        return untested
    se = math.sqrt(total)
    dof = total**2 / sum(v**2 / (n - 1) for v, n in variances)
    half = stats.t.ppf(0.975, dof) * se
    return Contrast(difference=difference, test=WELCH,
                    p_value=float(2 * stats.t.sf(abs(difference) / se, dof)),
                    ci95=(difference - half, difference + half))


def compare(a: Spread, b: Spread) -> Contrast:
    """b - a, with Welch's t-test and its 95% interval (None with fewer than 2 seeds each)."""
    return contrast([(-1.0, a), (1.0, b)])


def averaged_effect(pairs: Sequence[tuple[str, str]], spreads: dict[str, Spread]) -> Contrast:
    """The mean of b - a over an ablation factor's pairs (a factor's main effect in a 2 x 2
    design: its change averaged over the other factor's levels), as one contrast."""
    weights: dict[str, float] = {}
    for a, b in pairs:
        weights[a] = weights.get(a, 0.0) - 1 / len(pairs)
        weights[b] = weights.get(b, 0.0) + 1 / len(pairs)
    return contrast([(w, spreads[v]) for v, w in weights.items() if w])


def verdict_word(contrast: Contrast | Comparison) -> str:
    """supported (the 95% interval of b - a is above 0), contradicted (below), not supported
    (it holds 0), or cannot tell (fewer than two seeds)."""
    if contrast.ci95 is None:
        return "cannot tell"
    low, high = contrast.ci95
    return "supported" if low > 0 else "contradicted" if high < 0 else "not supported"


def mean_curve(histories: Sequence[Sequence[dict[str, float]]], key: str
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(epochs, mean over runs, (min, max)) of one history key, over the shortest history."""
    length = min(len(h) for h in histories)
    values = np.array([[record[key] for record in h[:length]] for h in histories], dtype=float)
    return np.arange(1, length + 1), values.mean(axis=0), np.stack([values.min(0), values.max(0)])


def convergence(histories: dict[str, list[list[dict[str, float]]]], reference_variant: str,
                levels: Sequence[float]) -> Convergence:
    """How fast each variant's training loss falls; ``histories`` lists each variant's runs
    in the same seed order.

    ``levels``: the first epoch each variant's mean curve reaches each given loss.
    ``paper_check``: the loss the reference variant's mean curve has after the paper's epoch
    40, and the first epoch at which every variant's mean curve reaches it (the paper: 10
    with batch norm); ``per_seed`` repeats the check within each seed (seed k's reference
    run against seed k's run of every variant), so its spread shows the seed noise.
    """
    curves = {name: mean_curve(runs, "loss")[1] for name, runs in histories.items()}
    first_at_level = {name: {str(level): first_epoch_at_or_below(curve, level) for level in levels}
                      for name, curve in curves.items()}
    reference_epoch = paper.CONVERGENCE_REFERENCE_EPOCH
    reference = curves.get(reference_variant)
    if reference is None or len(reference) < reference_epoch:
        return Convergence(levels=first_at_level)
    target = float(reference[reference_epoch - 1])
    per_seed: dict[str, list[int | None]] = {name: [] for name in histories}
    for k, reference_run in enumerate(histories[reference_variant]):
        seed_target = reference_run[reference_epoch - 1]["loss"]
        for name, runs in histories.items():
            if k < len(runs):
                per_seed[name].append(first_epoch_at_or_below(
                    [record["loss"] for record in runs[k]], seed_target))
    return Convergence(levels=first_at_level, paper_check=PaperCheck(
        reference_variant=reference_variant, reference_epoch=reference_epoch, loss=target,
        first_epoch={name: first_epoch_at_or_below(curve, target) for name, curve in curves.items()},
        per_seed={name: tuple(epochs) for name, epochs in per_seed.items()}))


def table_order(config: Config) -> list[str]:
    """The variants in the order of every table: the paper's rows (analyse.paper_models),
    then the others in params order."""
    paper_rows = config.analyse.paper_models
    return [*paper_rows, *(v for v in config.variants if v not in paper_rows)]


def summarise(config: Config, runs: list[TrainedRun], baseline: BaselineMetrics,
              data_info: DataInfo) -> Analysis:
    """The analysis (the analyse stage adds the error analysis and figures): per-variant spread
    over seeds, comparisons, convergence, the paper's numbers; variants in table_order."""
    by_variant = {v: [r for r in runs if r.variant == v] for v in table_order(config)}
    variants = {}
    spreads = {}
    for variant, variant_runs in by_variant.items():
        spreads[variant] = spread([r.metrics.test_accuracy for r in variant_runs])
        selected = [r.metrics.best_epoch_test_accuracy_selected_on_test for r in variant_runs]
        paper_model = config.analyse.paper_models.get(variant)
        variants[variant] = VariantResult(
            test_accuracy=spreads[variant],
            test_macro_f1=spread([r.metrics.test_macro_f1 for r in variant_runs]),
            test_loss=spread([r.metrics.test_loss for r in variant_runs]),
            best_epoch_test_accuracy_selected_on_test=None if None in selected else spread(selected),
            parameters=variant_runs[0].run_info.parameters,
            batch_norm=config.variants[variant].batch_norm,
            train_seconds_mean=float(np.mean([r.run_info.train_seconds for r in variant_runs])),
            paper_model=paper_model,
            paper_test_accuracy=round(paper.MODELS[paper_model] / 100, 4) if paper_model else None)
    # the paper's CNN2 (the first variant that reproduces it) is what batch norm is set against
    reference = next((v for v, model in config.analyse.paper_models.items() if model == "CNN2"),
                     next(iter(config.variants)))
    # the claims of analyse.comparisons, not every pair: a variant a user adds is compared only
    # when they list it there
    comparisons = {f"{c.b} - {c.a}": Comparison(claim=c.claim, a=c.a, b=c.b, paper=c.paper, group=c.group,
                                                **asdict(compare(spreads[c.a], spreads[c.b])))
                   for c in config.analyse.comparisons}
    # each ablation factor (the comparisons of one group) averaged over its levels
    pairs: dict[str, list[tuple[str, str]]] = {}
    for c in config.analyse.comparisons:
        if c.group:
            pairs.setdefault(c.group, []).append((c.a, c.b))
    histories = {v: [r.history for r in rs] for v, rs in by_variant.items()}
    return Analysis(
        data=DataFacts(source=data_info.source, canonical_split=data_info.canonical_split,
                       note=data_info.note),
        seeds=tuple(config.train.seeds),
        epochs=config.train.epochs,
        variants=variants,
        baseline=baseline,
        comparisons=comparisons,
        factors={group: averaged_effect(group_pairs, spreads) for group, group_pairs in pairs.items()},
        convergence=convergence(histories, reference, config.analyse.loss_levels),
    )


PAPER_MODEL_TAG = "paper_model"


def paper_model_tag(config: Config, variant: str) -> str:
    """What a variant's MLflow runs stand for: the paper's model it reproduces
    (analyse.paper_models), else ours, beside or beyond the paper (analyse.beyond_paper)."""
    if variant in config.analyse.paper_models:
        return config.analyse.paper_models[variant]
    return "none: ours, beyond the paper" if variant in config.analyse.beyond_paper else "none: ours"


def error_analysis(errors: list[Misclassified], confusion: np.ndarray, report: dict[str, Any],
                   class_names: tuple[str, ...], k: int, run: str) -> ErrorAnalysis:
    """One run's k highest cross-entropy errors (``errors``: its misclassified images,
    highest first), most confused pairs and per-class scores (Fig. 8, Tables III and IV;
    ``report``: scikit-learn's classification report)."""
    return ErrorAnalysis(run=run, top_errors=tuple(errors[:k]),
                         confused_pairs=tuple(confused_pairs(confusion, class_names)),
                         per_class={name: report[name] for name in class_names})


@dataclass(frozen=True)
class Judged:
    """A comparison or an ablation factor (``name``), with its verdict_word; a factor also with
    the verdicts of its comparisons, one per level of the other factor."""

    name: str
    contrast: Contrast | Comparison
    verdict: str
    levels: tuple[str, ...] = ()


@dataclass(frozen=True)
class VariantSpeed:
    """The first epoch a variant reaches the reference's loss (mean curves; each seed's)."""

    variant: str
    epoch: int | None
    per_seed: tuple[int | None, ...]


@dataclass(frozen=True)
class ConvergenceClaim:
    """The paper's "batch norm converges ~4x faster" against our runs; ``factors``: the
    slowest and fastest speed-up of the paper's batch-norm rows (None when none is there)."""

    verdict: str
    factors: tuple[float, float] | None
    variants: list[VariantSpeed]
    check: PaperCheck


@dataclass(frozen=True)
class Claims:
    """Every claim's verdict (check_claims); ``carried``: the factors whose averaged effect is
    supported and reversed at no level."""

    comparisons: list[Judged]
    factors: dict[str, Judged]
    carried: list[str]
    convergence: ConvergenceClaim | None


def convergence_claim(summary: Analysis) -> ConvergenceClaim | None:
    """The paper's "batch norm converges ~4x faster" against our runs (None with fewer epochs
    than the check needs): the variants of the paper's claims, each one's first epoch
    at the reference's loss, and how many times faster the batch-norm ones among the paper's
    rows (analyse.paper_models) are (mean curves and every seed); ``verdict``: supported (3x
    or more), partly (faster), not supported, or cannot tell (no batch-norm paper row)."""
    check = summary.convergence.paper_check
    if not check:
        return None
    reference = check.reference_epoch
    # the variants params.yaml sets beside the paper (analyse.paper_models, analyse.comparisons);
    # a variant a user adds to `variants` alone is not part of the paper's claims
    claimed = ({v for v, entry in summary.variants.items() if entry.paper_model}
               | {side for c in summary.comparisons.values() for side in (c.a, c.b)})
    variants, factors = [], []
    for variant, epoch in check.first_epoch.items():
        if variant == check.reference_variant or variant not in claimed:
            continue
        seeds = check.per_seed.get(variant, ())
        variants.append(VariantSpeed(variant, epoch, seeds))
        entry = summary.variants[variant]
        if entry.batch_norm and entry.paper_model:
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
    return ConvergenceClaim(verdict=verdict, factors=(min(factors), max(factors)) if factors else None,
                            variants=variants, check=check)


def check_claims(summary: Analysis) -> Claims:
    """Each claim's verdict: the comparisons of analyse.comparisons (see verdict_word); per
    ablation factor (a comparisons ``group``), its verdict at each level of the other factor
    and its averaged effect's; the convergence claim (None when the runs are too short)."""
    comparisons = [Judged(name, comparison, verdict_word(comparison))
                   for name, comparison in summary.comparisons.items()]
    factors = {group: Judged(group, effect, verdict_word(effect),
                             tuple(c.verdict for c in comparisons if c.contrast.group == group))
               for group, effect in summary.factors.items()}
    carried = [group for group, factor in factors.items()
               if factor.verdict == "supported" and "contradicted" not in factor.levels]
    return Claims(comparisons=comparisons, factors=factors, carried=carried,
                  convergence=convergence_claim(summary))


def compact(summary: Analysis) -> Summary:
    """metrics/summary.json: the numbers `dvc metrics show` and `dvc exp show` compare
    (the full analysis is reports/analysis/analysis.json)."""
    def r(value: float | None) -> float | None:  # 6 decimals: 0.0001 % of accuracy
        return None if value is None else round(float(value), 6)

    variants = {}
    for variant, entry in summary.variants.items():
        accuracy = entry.test_accuracy
        low, high = accuracy.ci95 or (None, None)
        variants[variant] = VariantSummary(
            seeds=accuracy.n, test_accuracy_mean=r(accuracy.mean), test_accuracy_std=r(accuracy.std),
            test_accuracy_ci95_low=r(low), test_accuracy_ci95_high=r(high),
            test_macro_f1_mean=r(entry.test_macro_f1.mean), paper_test_accuracy=entry.paper_test_accuracy)
    svc = next(v for k, v in paper.BASELINES.items() if k.startswith("SVC"))
    comparisons = {}
    for name, c in summary.comparisons.items():
        low, high = c.ci95 or (None, None)
        comparisons[name] = ComparisonSummary(difference=r(c.difference), ci95_low=r(low), ci95_high=r(high),
                                              p_value=r(c.p_value), test=c.test, claim=c.claim)
    return Summary(
        canonical_split=summary.data.canonical_split,
        variants=variants,
        baseline=BaselineSummary(test_accuracy=summary.baseline.test_accuracy,
                                 test_macro_f1=summary.baseline.test_macro_f1,
                                 train_size=summary.baseline.train_size,
                                 paper_test_accuracy=round(svc / 100, 4)),
        comparisons=comparisons,
    )


def numeric_summary(summary: Summary) -> dict[str, float]:
    """The summary's numbers, flattened for MLflow (a count, like seeds, is no metric)."""
    flat = {f"{variant}.{key}": value for variant, entry in summary.variants.items()
            for key, value in asdict(entry).items() if isinstance(value, float)}
    flat["baseline.test_accuracy"] = summary.baseline.test_accuracy
    return flat
