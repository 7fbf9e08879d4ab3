"""The analyse stage: every table and figure of the paper, metrics/summary.json and a
Markdown report (reports/report.md) that sets our numbers beside the paper's."""

from __future__ import annotations

import base64
import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from markdown_it import MarkdownIt

from fmnist import analysis, paths, plots, tracking
from fmnist.config import Config
from fmnist.evaluation import MODEL_REMEDY, score
from fmnist.files import atomic_path, read_json, write_json, write_text
from fmnist.prepare import Dataset
from fmnist.training import load_model_file


@dataclass(frozen=True)
class TrainedRun:
    """What the train and evaluate stages left for one variant under one seed."""

    variant: str
    seed: int
    history: list[dict[str, float]]
    metrics: dict[str, Any]
    run_info: dict[str, Any]

    @property
    def name(self) -> str:
        return paths.run_name(self.variant, self.seed)


def load_runs(config: Config) -> list[TrainedRun]:
    runs = []
    for variant in config.variants:
        for seed in config.train.seeds:
            model_dir = paths.model_dir(variant, seed)
            runs.append(TrainedRun(
                variant, seed,
                history=read_json(model_dir / "history.json", "written by the train stage"),
                metrics=read_json(paths.metrics_file(variant, seed), "written by the evaluate stage"),
                run_info=read_json(model_dir / "run.json", "written by the train stage")))
    return runs


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def summarise(config: Config, runs: list[TrainedRun], baseline: dict[str, Any],
              data_info: dict[str, Any]) -> dict[str, Any]:
    """metrics/summary.json: per-variant spread over seeds, comparisons, the paper's numbers."""
    by_variant = {v: [r for r in runs if r.variant == v] for v in config.variants}
    variants = {}
    spreads = {}
    for variant, variant_runs in by_variant.items():
        spreads[variant] = analysis.Spread(tuple(r.metrics["test_accuracy"] for r in variant_runs))
        entry = {"test_accuracy": spreads[variant].as_json()}
        for key in ("macro_f1", "test_loss", "best_epoch_test_accuracy_selected_on_test"):
            if all(key in r.metrics for r in variant_runs):
                entry[key] = analysis.Spread(tuple(r.metrics[key] for r in variant_runs)).as_json()
        entry["parameters"] = variant_runs[0].run_info["parameters"]
        entry["batch_norm"] = config.variants[variant].batch_norm
        entry["train_seconds_mean"] = float(np.mean([r.run_info["train_seconds"] for r in variant_runs]))
        paper_model = config.analyse.paper_models.get(variant)
        if paper_model:
            entry["paper_model"] = paper_model
            entry["paper_test_accuracy"] = round(analysis.PAPER_MODELS[paper_model] / 100, 4)
        variants[variant] = entry
    names = list(config.variants)
    # the claims of analyse.comparisons, not every pair: a variant a user adds is compared only
    # when they list it there
    comparisons = {f"{c.b} - {c.a}": {"claim": c.claim, "a": c.a, "b": c.b, "paper": c.paper,
                                      "group": c.group, **analysis.compare(spreads[c.a], spreads[c.b])}
                   for c in config.analyse.comparisons}
    histories = {v: [r.history for r in rs] for v, rs in by_variant.items()}
    return {
        "data": {"source": data_info["source"], "canonical_split": data_info["canonical_split"],
                 "note": data_info["note"]},
        "seeds": list(config.train.seeds),
        "epochs": config.train.epochs,
        "variants": variants,
        "baseline": baseline,
        "comparisons": comparisons,
        "convergence": analysis.convergence(histories, names[0], config.analyse.loss_levels),
    }


def write_curves_csv(runs: list[TrainedRun], path: Path) -> None:
    """Long format, one row per run and epoch: DVC's by-run template draws Figs. 2-3."""
    keys = ["loss", "accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy"]
    present = [k for k in keys if any(k in record for r in runs for record in r.history)]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "variant", "seed", "epoch", *present])
        for run in runs:
            for record in run.history:
                writer.writerow([run.name, run.variant, run.seed, int(record["epoch"]),
                                 *(record.get(k, "") for k in present)])


def analyse(config: Config, data: Dataset, data_info: dict[str, Any], baseline: dict[str, Any],
            out_dir: Path, report_file: Path, summary_file: Path) -> dict[str, Any]:
    """Compute and draw everything of the analyse stage; log it as an MLflow run."""
    runs = load_runs(config)
    class_names = config.evaluate.class_names
    summary = summarise(config, runs, baseline, data_info)
    first_seed = config.train.seeds[0]
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        write_curves_csv(runs, tmp / paths.CURVES.name)
        for key, label, file in (("loss", "Training loss", "training_loss.png"),
                                 ("test_accuracy", "Test accuracy (monitored only)", "test_accuracy.png")):
            if all(key in r.history[0] for r in runs):
                curves = {v: analysis.mean_curve([r.history for r in runs if r.variant == v], key)
                          for v in config.variants}
                plots.training_curves(curves, tmp / file, label,
                                      f"{label} per epoch (mean over seeds {list(config.train.seeds)})")
                summary.setdefault("curve_figures", []).append(file)
        # Error analysis (Fig. 8, Table III, Fig. 9) of the variant the paper analyses.
        error_run = paths.run_name(config.analyse.error_variant, first_seed)
        predictions = np.load(paths.predictions_file(config.analyse.error_variant, first_seed))
        evaluation = score(predictions["probabilities"], predictions["labels"], class_names)
        worst = analysis.top_errors(evaluation.probabilities, evaluation.labels,
                                    config.analyse.top_errors)
        errors = [{"index": int(i), "actual": class_names[evaluation.labels[i]],
                   "predicted": class_names[evaluation.predictions[i]],
                   "probability_predicted": float(evaluation.probabilities[i].max()),
                   "probability_actual": float(evaluation.probabilities[i, evaluation.labels[i]]),
                   "cross_entropy": float(analysis.cross_entropy(
                       evaluation.probabilities[i:i + 1], evaluation.labels[i:i + 1])[0])}
                  for i in worst]
        plots.error_grid(data.x_test[worst], [
            f"({chr(97 + n)}) predicted {e['predicted']} ({e['probability_predicted']:.2f})\n"
            f"actual {e['actual']} ({e['probability_actual']:.1e})" for n, e in enumerate(errors)],
            tmp / "top_errors.png", f"Highest cross-entropy errors: {error_run}")
        summary["error_analysis"] = {
            "run": error_run, "top_errors": errors,
            "confused_pairs": analysis.confused_pairs(evaluation.confusion, class_names),
            "per_class": {name: evaluation.report[name] for name in class_names}}
        # Feature maps (Figs. 5-7): both conv layers, every channel, for each variant.
        feature_figures = {}
        for variant in config.variants:
            model = load_model_file(paths.model_dir(variant, first_seed) / "model.keras", MODEL_REMEDY)
            for class_name in config.analyse.feature_map_classes:
                index = analysis.first_of_class(data.y_test, config.class_index(class_name))
                maps = analysis.feature_maps(model, data.x_test[index])
                file = f"feature_maps_{_slug(variant)}_{_slug(class_name)}.png"
                plots.feature_maps(data.x_test[index], maps,
                                   [f"conv{i + 1}" for i in range(len(maps))], tmp / file,
                                   f"{variant}: conv outputs for the first test {class_name} "
                                   f"(test image {index})")
                feature_figures.setdefault(variant, {})[class_name] = file
        summary["feature_maps"] = feature_figures
        write_json(tmp / "analysis.json", summary)
    write_text(report_file, markdown(config, summary, runs))
    metrics = compact(summary)
    write_json(summary_file, metrics)
    # Its own experiment: the summary numbers would otherwise fill the model runs' chart view
    # with one-bar charts and join every legend; there, each run is one pipeline execution.
    experiment_id = tracking.connect(tracking.analysis_experiment(config.tracking.experiment))
    with tracking.run(experiment_id, "analysis", {
            "kind": "analysis", "git_commit": tracking.git_commit(),
            "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
            "model_experiment": config.tracking.experiment}):
        tracking.log_metrics(_numeric_summary(metrics))
        tracking.log_artifacts(report_file, summary_file)
        tracking.log_html(report_html(report_file.read_text(), report_file.parent), "report.html")
        tracking.log_artifacts(out_dir, folder="analysis")
    return summary


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
            "macro_f1_mean": r(entry["macro_f1"]["mean"]),
            "paper_test_accuracy": entry.get("paper_test_accuracy"),
        }
    return {
        "canonical_split": summary["data"]["canonical_split"],
        "variants": variants,
        "baseline": {**{k: summary["baseline"][k] for k in ("test_accuracy", "macro_f1", "train_size")
                        if k in summary["baseline"]},
                     "paper_test_accuracy": round(next(
                         v for k, v in analysis.PAPER_BASELINES.items() if k.startswith("SVC")) / 100, 4)},
        "comparisons": {name: {"difference": r(c["difference"]),
                               "ci95_low": r(c["ci95"][0]) if c["ci95"] else None,
                               "ci95_high": r(c["ci95"][1]) if c["ci95"] else None,
                               "p_value": r(c["p_value"]), "test": c["test"], "claim": c["claim"]}
                        for name, c in summary["comparisons"].items()},
    }


def _numeric_summary(metrics: dict[str, Any]) -> dict[str, float]:
    """The compact summary's numbers, flattened for MLflow."""
    flat = {}
    for variant, entry in metrics["variants"].items():
        flat.update({f"{variant}.{key}": value for key, value in entry.items()
                     if isinstance(value, float) and key != "seeds"})  # a count is no metric
    if "test_accuracy" in metrics["baseline"]:
        flat["baseline.test_accuracy"] = metrics["baseline"]["test_accuracy"]
    return flat


# --- Markdown -----------------------------------------------------------------------------

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
        text = analysis.verdict(comparison, claim, paper)
        lines.append("- " + text)
        if comparison["group"]:
            groups.setdefault(comparison["group"], []).append(analysis.verdict_word(comparison))
    if groups:
        lines.append("- Which factor carries the gain (the ablation): " + "; ".join(
            f"{group}: {', '.join(words)}" for group, words in groups.items()) + ". "
            + _ablation_reading(groups))
    check = summary["convergence"].get("paper_check")
    if not check:
        return lines + ["- Batch normalization converges ~4x faster (paper): cannot tell; the "
                        "check needs at least 40 epochs."]
    reference = check["reference_epoch"]
    parts, factors = [], []
    for variant, epoch in check["first_epoch"].items():
        if variant == check["reference_variant"]:
            continue
        seeds = check.get("per_seed", {}).get(variant, [])
        per_seed = (" (per seed: " + ", ".join(str(e or "never") for e in seeds) + ")"
                    if len(seeds) > 1 else "")
        parts.append((f"{variant} at epoch {epoch}" if epoch else f"{variant} never") + per_seed)
        if summary["variants"][variant]["batch_norm"]:
            factors.append(reference / epoch if epoch else 0.0)
            factors += [reference / e if e else 0.0 for e in seeds]
    if not factors:
        word = "cannot tell (no batch-norm variant)"
    elif min(factors) >= 3:
        word = f"supported ({min(factors):.1f}x or more faster)"
    elif min(factors) > 1:
        word = (f"partly: faster, but only {min(factors):.1f}x to {max(factors):.1f}x "
                "(mean curves and every seed), not ~4x")
    else:
        word = "not supported"
    lines.append(f"- Batch normalization reaches in ~10 epochs the training loss CNN2 has after "
                 f"40 (paper, ~4x faster): {word}. {check['reference_variant']} has mean loss "
                 f"{check['loss']:.4f} after epoch {reference}; the mean curves reach it: "
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


def markdown(config: Config, summary: dict[str, Any], runs: list[TrainedRun]) -> str:
    """reports/report.md, top to bottom: data, Tables I-II, claims, Figs. 1-9, Tables III-IV."""
    data = summary["data"]
    seeds = summary["seeds"]
    first = seeds[0]
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
        text = (paths.model_dir(variant, first) / "summary.txt").read_text()
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
