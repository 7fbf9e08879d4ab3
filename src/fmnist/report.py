"""reports/report.md: the analyse stage's analysis (records.Analysis) as Markdown, our numbers
beside the paper's. Rendering only: every number comes in the analysis; the prose and the
layout are the template templates/report.md.j2."""

from __future__ import annotations

import base64
import re
from dataclasses import asdict
from pathlib import Path

import jinja2
from markdown_it import MarkdownIt

from fmnist import paper
from fmnist.analysis import Claims, Judged, TrainedRun
from fmnist.config import Config
from fmnist.params import flatten
from fmnist.records import Analysis, Spread
from fmnist.results import pct


def verdict(judged: Judged, claim: str, paper_difference: float | None = None) -> str:
    """Plain words on whether a difference supports a claim that b beats a; with the paper's
    difference (points), whether our interval contains it."""
    contrast = judged.contrast
    difference = contrast.difference * 100
    word = judged.verdict
    if contrast.ci95 is None:
        return (f"{claim}: {word} (difference {difference:+.2f} points from fewer than two "
                "seeds per variant; add seeds in train.seeds)")
    low, high = (100 * v for v in contrast.ci95)
    word = {"not supported": "not supported: the difference is within seed noise",
            "contradicted": "contradicted (the other way round)"}.get(word, word)
    text = (f"{claim}: {word} (difference {difference:+.2f} points, 95% CI [{low:+.2f}, {high:+.2f}], "
            f"p = {contrast.p_value:.3f}")
    if paper_difference is not None:
        where = "inside" if low <= paper_difference <= high else "outside"
        text += f"; the paper's {paper_difference:+.2f} is {where} this interval"
    return text + ")"


def report_html(markdown_text: str, base: Path) -> str:
    """The report as one self-contained HTML page: every figure inlined as a data URI (the
    MLflow artifact viewer's iframe resolves no relative path), <details> kept as HTML."""
    body = MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown_text)

    def inline(match: re.Match) -> str:
        figure = Path(base) / match.group(1)
        if not figure.is_file():
            return match.group(0)
        data = base64.b64encode(figure.read_bytes()).decode("ascii")
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^":]+\.png)"', inline, body)
    style = ("body{font-family:sans-serif;max-width:60em;margin:1em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
             "img{max-width:100%}pre{background:#f6f6f6;padding:6px;overflow:auto}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Report</title>"
            f"<style>{style}</style></head><body>\n{body}</body></html>\n")


def _spread(entry: Spread) -> str:
    text = pct(entry.mean)
    if entry.std is not None:
        text += f" ± {100 * entry.std:.2f}"
    return text


def _ci(entry: Spread) -> str:
    return "-" if entry.ci95 is None else f"[{pct(entry.ci95[0])}, {pct(entry.ci95[1])}]"


def _claims(claims: Claims) -> list[str]:
    """The claims section's bullets from analysis.check_claims."""
    lines = []
    for judged in claims.comparisons:
        comparison = judged.contrast
        claim = (f"{comparison.claim} ({judged.name}"
                 + (f"; paper: {comparison.paper:+.2f} points)" if comparison.paper is not None else ")"))
        lines.append("- " + verdict(judged, claim, comparison.paper))
    if claims.factors:
        lines.append("- Which factor carries the gain (the ablation; each factor's change averaged "
                     "over the other factor's levels): " + "; ".join(
                         _factor(factor) for factor in claims.factors.values())
                     + ". " + _ablation_reading(claims.carried))
    convergence = claims.convergence
    if convergence is None:
        return lines + ["- Batch normalization converges ~4x faster (paper): cannot tell; the "
                        "check needs at least 40 epochs."]
    parts = []
    for entry in convergence.variants:
        per_seed = (" (per seed: " + ", ".join(str(e or "never") for e in entry.per_seed) + ")"
                    if len(entry.per_seed) > 1 else "")
        parts.append((f"{entry.variant} at epoch {entry.epoch}" if entry.epoch else f"{entry.variant} never")
                     + per_seed)
    low, high = convergence.factors or (None, None)
    word = {"cannot tell": "cannot tell (no batch-norm variant among the paper's rows)",
            "supported": f"supported ({low or 0:.1f}x or more faster)",
            "partly": (f"partly: faster, but only {low or 0:.1f}x to {high or 0:.1f}x "
                       "(the paper's rows with batch norm: mean curves and every seed), not ~4x"),
            "not supported": "not supported"}[convergence.verdict]
    check = convergence.check
    reference = check.reference_variant
    lines.append(f"- Batch normalization reaches in ~10 epochs the training loss CNN2 has after "
                 f"40 (paper, ~4x faster): {word}. {reference} has mean loss "
                 f"{check.loss:.4f} after epoch {check.reference_epoch}; the mean "
                 "curves reach it: " + "; ".join(parts) + ". Per seed, each run is set against the "
                 f"same seed's {reference} run.")
    return lines


def _factor(factor: Judged) -> str:
    """One ablation factor: its averaged effect with interval, and its verdict per level."""
    effect = factor.contrast
    text = f"{factor.name} {100 * effect.difference:+.2f} points"
    if effect.ci95 is not None:
        low, high = (100 * v for v in effect.ci95)
        text += f" (95% CI [{low:+.2f}, {high:+.2f}], p = {effect.p_value:.3f}: {factor.verdict})"
    return text + " - at each level: " + ", ".join(factor.levels)


def _ablation_reading(carried: list[str]) -> str:
    """One sentence on the ablation: the factor whose averaged effect is supported, if one."""
    if len(carried) == 1:
        return f"The gain is carried by {carried[0]}."
    if not carried:
        return ("No factor's averaged effect is supported without being reversed at a level: "
                "these seeds cannot attribute the gain.")
    return "Each of " + ", ".join(carried) + " is supported on its own."


def _beyond_paper(config: Config) -> dict[str, dict[str, str]]:
    """Each variant of ours, not the paper's (analyse.beyond_paper): what it changes against
    model_defaults and train's recipe, and how it was chosen."""
    defaults = flatten({**config.model_defaults, **asdict(config.train.recipe())})
    out = {}
    for variant, note in config.analyse.beyond_paper.items():
        own = flatten({**asdict(config.variant(variant)), **asdict(config.recipe(variant))})
        out[variant] = {"changed": ", ".join(f"{key} {value}" for key, value in own.items()
                                             if defaults.get(key) != value),
                        "note": note, "label_smoothing": config.recipe(variant).label_smoothing}
    return out


TEMPLATE = "report.md.j2"  # in src/fmnist/templates/: the report's prose and layout


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        autoescape=False)  # noqa: S701 (Markdown, not HTML)
    environment.filters.update(pct=pct, spread=_spread, ci=_ci, fmt=format)
    return environment


def markdown(config: Config, summary: Analysis, claims: Claims, runs: list[TrainedRun],
             architectures: dict[str, str]) -> str:
    """reports/report.md, top to bottom: data, Tables I-II, claims, Figs. 1-9, Tables III-IV.
    ``claims``: analysis.check_claims; ``runs``: analysis.TrainedRun of every run;
    ``architectures``: each variant's layer table (paths.RunFiles.architecture). Rows in the
    analysis' order (the paper's first: analysis.table_order)."""
    paper_rows = [v for v in summary.variants if v in config.analyse.paper_models]
    return _environment().get_template(TEMPLATE).render(
        data=summary.data, seeds=list(summary.seeds), epochs=summary.epochs,
        batch_size=config.train.batch_size, learning_rate=config.train.learning_rate,
        paper_baselines=paper.BASELINES, baseline=summary.baseline,
        variants=summary.variants, paper_rows=paper_rows, claims=_claims(claims),
        curve_figures=summary.curve_figures, loss_levels=config.analyse.loss_levels,
        convergence_levels=summary.convergence.levels,
        architectures={variant: architectures[variant] for variant in summary.variants},
        feature_maps=summary.feature_maps, errors=summary.error_analysis,
        paper_top_errors=paper.TOP_ERRORS, paper_table_iv=paper.TABLE_IV,
        class_names=config.evaluate.class_names, runs=runs, beyond_paper=_beyond_paper(config))
