"""reports/report.md: the analyse stage's summary (see analysis) as Markdown, our numbers
beside the paper's. Rendering only: every number comes in the summary."""

from __future__ import annotations

from typing import Any

from fmnist import analysis
from fmnist.config import Config


def verdict(comparison: dict[str, Any], claim: str, paper_difference: float | None = None) -> str:
    """Plain words on whether a difference supports a claim that b beats a; with the paper's
    difference (points), whether our interval contains it."""
    difference = comparison["difference"] * 100
    word = analysis.verdict_word(comparison)
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


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _spread(entry: dict[str, Any]) -> str:
    text = _pct(entry["mean"])
    if entry["std"] is not None:
        text += f" ± {100 * entry['std']:.2f}"
    return text


def _ci(entry: dict[str, Any]) -> str:
    return "-" if entry["ci95"] is None else f"[{_pct(entry['ci95'][0])}, {_pct(entry['ci95'][1])}]"


def _claims(summary: dict[str, Any]) -> list[str]:
    lines = []
    groups: dict[str, list[str]] = {}
    for key, comparison in summary["comparisons"].items():
        paper = comparison["paper"]
        claim = (f"{comparison['claim']} ({key}"
                 + (f"; paper: {paper:+.2f} points)" if paper is not None else ")"))
        text = verdict(comparison, claim, paper)
        lines.append("- " + text)
        if comparison["group"]:
            groups.setdefault(comparison["group"], []).append(analysis.verdict_word(comparison))
    if groups:
        lines.append("- Which factor carries the gain (the ablation): " + "; ".join(
            f"{group}: {', '.join(words)}" for group, words in groups.items()) + ". "
            + _ablation_reading(groups))
    claim = analysis.convergence_claim(summary)
    if claim is None:
        return lines + ["- Batch normalization converges ~4x faster (paper): cannot tell; the "
                        "check needs at least 40 epochs."]
    check = summary["convergence"]["paper_check"]
    parts = []
    for entry in claim["variants"]:
        variant, epoch, seeds = entry["variant"], entry["epoch"], entry["per_seed"]
        per_seed = (" (per seed: " + ", ".join(str(e or "never") for e in seeds) + ")"
                    if len(seeds) > 1 else "")
        parts.append((f"{variant} at epoch {epoch}" if epoch else f"{variant} never") + per_seed)
    low, high = claim["factors"] or (None, None)
    word = {"cannot tell": "cannot tell (no batch-norm variant)",
            "supported": f"supported ({low or 0:.1f}x or more faster)",
            "partly": (f"partly: faster, but only {low or 0:.1f}x to {high or 0:.1f}x "
                       "(mean curves and every seed), not ~4x"),
            "not supported": "not supported"}[claim["verdict"]]
    lines.append(f"- Batch normalization reaches in ~10 epochs the training loss CNN2 has after "
                 f"40 (paper, ~4x faster): {word}. {check['reference_variant']} has mean loss "
                 f"{check['loss']:.4f} after epoch {check['reference_epoch']}; the mean curves reach it: "
                 + "; ".join(parts) + ". Per seed, each run is set against the same seed's "
                 f"{check['reference_variant']} run.")
    return lines


def _ablation_reading(groups: dict[str, list[str]]) -> str:
    """One sentence on the ablation: the factor whose every comparison is supported, if one."""
    carried = [g for g, words in groups.items() if all(w == "supported" for w in words)]
    if len(carried) == 1:
        return f"The gain is carried by {carried[0]}."
    if not carried:
        return "No factor is supported at every level: these seeds cannot attribute the gain."
    return "Each of " + ", ".join(carried) + " is supported on its own."


def markdown(config: Config, summary: dict[str, Any], runs: list[analysis.TrainedRun],
             architectures: dict[str, str]) -> str:
    """reports/report.md, top to bottom: data, Tables I-II, claims, Figs. 1-9, Tables III-IV.
    ``architectures``: each variant's layer table (paths.RunFiles.architecture)."""
    data = summary["data"]
    seeds = summary["seeds"]
    out = ["# Fashion-MNIST CNNs: our reproduction beside the paper", ""]
    out += [f"Data: **{data['source']}**; canonical train/test split: **{data['canonical_split']}**. ",
            "" if data["canonical_split"] else f"> **Caveat:** {data['note']}.", "",
            f"Seeds: {seeds}; epochs: {summary['epochs']}; batch size {config.train.batch_size}; "
            f"Adam, learning rate {config.train.learning_rate}.", "",
            "![Fig. 1: examples per class](figures/dataset.png)", ""]
    out += ["## Tables I and II: test accuracy (%)", "",
            "Ours is the model after the last epoch (nothing is selected on the test set), mean ± "
            "standard deviation over seeds with a 95% t-interval. The paper's numbers were most "
            "likely the best epoch as seen on the test set; the last column gives that kind of "
            "number for our runs, **selected on the test set, which flatters**.", "",
            "| Model | Paper | Ours (final epoch) | 95% CI | Best epoch, selected on test |",
            "|---|---|---|---|---|"]
    for name, value in analysis.PAPER_BASELINES.items():
        ours = "-"
        if name.startswith("SVC") and "test_accuracy" in summary["baseline"]:
            b = summary["baseline"]
            ours = f"{_pct(b['test_accuracy'])} (SVC on {b['train_size']} training images)"
        out.append(f"| {name} | {value:.2f} | {ours} | - | - |")
    for variant, entry in summary["variants"].items():
        paper = entry.get("paper_test_accuracy")
        best = entry.get("best_epoch_test_accuracy_selected_on_test")
        model = f"{entry['paper_model']}; " if "paper_model" in entry else ""
        out.append(f"| {variant} ({model}{entry['parameters']:,} parameters) | {_pct(paper)} | "
                   f"{_spread(entry['test_accuracy'])} | {_ci(entry['test_accuracy'])} | "
                   f"{_spread(best) if best else '-'} |")
    out += ["", "## The paper's claims, checked", ""] + _claims(summary) + [""]
    out += ["## Figs. 2-3: training curves", "",
            *(f"![{file}](analysis/{file})\n" for file in summary.get("curve_figures", [])),
            "First epoch at which the mean training loss reaches each level:", "",
            "| Variant | " + " | ".join(f"loss ≤ {lvl}" for lvl in config.analyse.loss_levels) + " |",
            "|---|" + "---|" * len(config.analyse.loss_levels)]
    for variant, levels in summary["convergence"]["levels"].items():
        out.append(f"| {variant} | " + " | ".join(str(e or "never") for e in levels.values()) + " |")
    out += ["", "## Fig. 4: model architectures", ""]
    for variant in config.variants:
        text = architectures[variant]
        out += [f"<details><summary>{variant}</summary>", "", "```", text.rstrip(), "```", "",
                "</details>", ""]
    out += ["## Figs. 5-7: feature maps of both conv layers", ""]
    for variant, figures in summary["feature_maps"].items():
        for class_name, file in figures.items():
            out += [f"![{variant}, {class_name}](analysis/{file})", ""]
    errors = summary["error_analysis"]
    out += [f"## Fig. 8 and Table III: highest cross-entropy errors ({errors['run']})", "",
            "![Fig. 8](analysis/top_errors.png)", "",
            "| Image | Predicted | Actual | p(predicted) | p(actual) | Paper (predicted / actual) |",
            "|---|---|---|---|---|---|"]
    for n, error in enumerate(errors["top_errors"]):
        paper = analysis.PAPER_TOP_ERRORS[n] if n < len(analysis.PAPER_TOP_ERRORS) else ("-", "-")
        out.append(f"| ({chr(97 + n)}) test #{error['index']} | {error['predicted']} | {error['actual']} | "
                   f"{error['probability_predicted']:.3f} | {error['probability_actual']:.1e} | "
                   f"{paper[0]} / {paper[1]} |")
    if not errors["top_errors"]:
        out.append("| - | no misclassified test image | | | | |")
    out += ["", "Most confused pairs (actual → predicted):", ""]
    out += [f"- {p['actual']} → {p['predicted']}: {p['count']}" for p in errors["confused_pairs"]]
    out += ["", f"## Table IV: per-class precision, recall and F1 ({errors['run']})", "",
            "| Class | Label | Precision (paper) | Recall (paper) | F1 (paper) | Support |",
            "|---|---|---|---|---|---|"]
    for label, name in enumerate(config.evaluate.class_names):
        ours = errors["per_class"][name]
        paper = analysis.PAPER_TABLE_IV[label]
        out.append(f"| {name} | {label} | {ours['precision']:.2f} ({paper[0]:.2f}) | "
                   f"{ours['recall']:.2f} ({paper[1]:.2f}) | {ours['f1-score']:.2f} ({paper[2]:.2f}) | "
                   f"{int(ours['support'])} |")
    out += ["", "## Fig. 9: confusion matrix", "",
            f"![Fig. 9](eval/{errors['run']}/confusion_matrix.png)", "",
            "## Every run", "",
            "| Run | Test accuracy | Macro F1 | Epochs | Train time (s) | Device (backend, precision) |",
            "|---|---|---|---|---|---|"]
    for run in runs:
        out.append(f"| {run.name} | {_pct(run.metrics['test_accuracy'])} | "
                   f"{run.metrics['macro_f1']:.4f} | {run.metrics['epochs']} | "
                   f"{run.run_info['train_seconds']:.0f} | {run.run_info['device']} "
                   f"({run.run_info['keras_backend']}, {run.run_info.get('precision', 'float32')}) |")
    return "\n".join(out) + "\n"
