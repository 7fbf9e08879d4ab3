"""Every path the pipeline reads or writes, relative to the repository root.

dvc.yaml's deps and outs spell the same paths; the stages run with the repository root
as their working directory (DVC runs them there).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fmnist import records
from fmnist.files import remove

PARAMS = Path("params.yaml")
PIPELINE = Path("dvc.yaml")
# Written by the check_params stage when params.yaml is valid; every other stage depends on
# it, so DVC runs that check before any stage (and before deleting any output).
PARAMS_CHECKED = Path(".params_checked")

DATA_LOCAL = Path("data/local")  # data.source: local reads the four IDX files placed here

DATA_RAW = Path("data/raw")
SOURCE_INFO = DATA_RAW / records.SourceInfo.FILE
DATA_PREPARED = Path("data/prepared")
PREPARED_ARRAYS = DATA_PREPARED / "fashion_mnist.npz"
PREPARED_INFO = DATA_PREPARED / records.DataInfo.FILE

MODELS = Path("models")
CHECKPOINTS = Path(".checkpoints")  # resumable training state; not a DVC output (DVC deletes those)
# JAX's persistent compilation cache (and XLA's GPU autotune results), shared by every stage
# process and queue worker of the project (fmnist.device.jax_environment); safe to delete
JAX_CACHE = Path(".cache/jax")
PREDICTIONS = Path("predictions")
METRICS = Path("metrics")
REPORTS = Path("reports")
DATASET_FIGURE = REPORTS / "figures" / "dataset.png"
EVAL_REPORTS = REPORTS / "eval"
ANALYSIS = REPORTS / "analysis"
ANALYSIS_FILE = ANALYSIS / records.Analysis.FILE
REPORT = REPORTS / "report.md"
SUMMARY = METRICS / records.Summary.FILE
ACCURACY = METRICS / records.Accuracy.FILE  # mean test accuracy per variant: `dvc exp show`'s columns
BASELINE_METRICS = METRICS / records.BaselineMetrics.FILE
CURVES = ANALYSIS / "curves.csv"

MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"

# `python -m fmnist.search` (not a stage): its default Optuna storage, and per study the best
# trial as a variant block to paste into params.yaml and the optimization-history figure
SEARCH_DB = "search.db"
SEARCH_REPORTS = REPORTS / "search"


def search_files(study: str) -> dict[str, Path]:
    return {"variant": SEARCH_REPORTS / f"{study}.yaml", "history": SEARCH_REPORTS / f"{study}-history.png",
            "importance": SEARCH_REPORTS / f"{study}-importance.json"}


def run_name(variant: str, seed: int) -> str:
    """One trained model: a variant under one seed (also its MLflow run name)."""
    return f"{variant}-seed{seed}"


def stage_name(stage: str, variant: str) -> str:
    """A per-variant stage as dvc.yaml's foreach names it: ``train@cnn2`` (all its seeds)."""
    return f"{stage}@{variant}"


def seed_name(seed: int) -> str:
    """A seed's entry in a variant's folder of a per-variant stage: ``seed0`` (or ``seed0.json``)."""
    return f"seed{seed}"


@dataclass(frozen=True)
class RunFiles:
    """The files the train stage leaves for one trained model, in ``folder``
    (models/<variant>/seed<k>/, in the train stage's DVC output models/<variant>); every
    stage reads them through here."""

    folder: Path

    @property
    def model(self) -> Path:
        return self.folder / "model.keras"

    @property
    def test_probabilities(self) -> Path:
        """The final model's class probabilities on the test set, (n, 10) float32 (.npy): what
        the evaluate stage scores, so that it loads no model (and imports no Keras)."""
        return self.folder / "test_probabilities.npy"

    @property
    def feature_maps(self) -> Path:
        """Each conv block's output for the first test image of every class (fmnist.feature_maps):
        what the analyse stage draws as Figs. 5-7, so that it loads no model (and imports no Keras)."""
        return self.folder / "feature_maps.npz"

    @property
    def history(self) -> Path:
        """One record per epoch: training loss/accuracy, monitored test metrics, timing."""
        return self.folder / "history.json"

    @property
    def history_csv(self) -> Path:
        return self.folder / "history.csv"

    @property
    def architecture(self) -> Path:
        """The model's layer table (the paper's Fig. 4), as models.summary_text writes it."""
        return self.folder / "summary.txt"

    @property
    def run_info(self) -> Path:
        """MLflow run id, backend, precision, device, training time, parameter count."""
        return self.folder / records.RunInfo.FILE

    @property
    def remedy(self) -> str:
        """What to do when a file here is missing or damaged (``model_remedy``)."""
        return model_remedy(self.folder)

    def read_run_info(self, what: str = "") -> records.RunInfo:
        """The run record; ``what`` says where it comes from (default: the train stage). A
        missing or damaged record is an error that says how to restore it (``remedy``)."""
        return records.RunInfo.read(self.run_info, what, self.remedy)


@dataclass(frozen=True)
class CheckpointFiles:
    """Resumable training state of one run, in ``folder`` (.checkpoints/<run name>/)."""

    folder: Path

    @property
    def model(self) -> Path:
        """The model after the last completed epoch, with its optimizer state."""
        return self.folder / RunFiles(self.folder).model.name

    @property
    def state(self) -> Path:
        return self.folder / "state.json"


@dataclass(frozen=True)
class RunRecord:
    """What the evaluate stage keeps of one trained model in git, in ``folder``
    (reports/eval/<variant>/seed<k>/, not cached): its test-set results, and copies of the train
    stage's history, run facts and layer table. The analyse stage reads these (and the
    metrics files; from models/ only the first seed's RunFiles.feature_maps, whose figures it
    keeps where that file is absent), so the report can be made again where DVC's cache of
    models is gone."""

    folder: Path

    @property
    def history(self) -> Path:
        return self.folder / RunFiles(self.folder).history.name

    @property
    def run_info(self) -> Path:
        return self.folder / RunFiles(self.folder).run_info.name

    @property
    def architecture(self) -> Path:
        return self.folder / RunFiles(self.folder).architecture.name

    @property
    def classification_report(self) -> Path:
        """The per-class precision, recall, F1 and support (Table IV), to scikit-learn's definitions
        and format (computed in numpy by fmnist.scoring), as JSON."""
        return self.folder / "classification_report.json"

    @property
    def classification_table(self) -> Path:
        return self.folder / "classification_report.md"

    @property
    def confusion_matrix(self) -> Path:
        """10 x 10 counts, rows actual, columns predicted."""
        return self.folder / "confusion_matrix.csv"

    @property
    def confusion_figure(self) -> Path:
        return self.folder / "confusion_matrix.png"

    @property
    def errors(self) -> Path:
        """Every misclassified test image, highest cross-entropy first (Fig. 8, Table III)."""
        return self.folder / "errors.csv"


def feature_maps_figure(analysis_dir: Path, variant: str, seed: int, class_name: str) -> Path:
    """Figs. 5-7 for the first test image of a class, drawn by the analyse stage from the first
    seed's RunFiles.feature_maps: ``analysis_dir``/feature_maps/<run name>_<class>.png
    (reports/analysis/...)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", class_name).strip("_").lower()
    return Path(analysis_dir) / "feature_maps" / f"{run_name(variant, seed)}_{slug}.png"


# The per-variant stages' outputs (dvc.yaml's `outs`: one folder per variant, a file or
# folder per seed inside): train -> models/<variant>/seed<k>/, evaluate -> the rest.
def variant_outputs(variant: str) -> dict[str, Path]:
    return {"models": MODELS / variant, "predictions": PREDICTIONS / variant,
            "records": EVAL_REPORTS / variant, "metrics": METRICS / "runs" / variant,
            "confusion": REPORTS / "confusion" / variant}


def model_dir(variant: str, seed: int) -> Path:
    return variant_outputs(variant)["models"] / seed_name(seed)


def run_files(variant: str, seed: int) -> RunFiles:
    return RunFiles(model_dir(variant, seed))


# What to do about a seed's model folder, models/<variant>/seed<k>/ (in messages that cannot
# name it, these words). Its variant's folder is a `persist: true` output: `dvc repro` does not
# restore it from DVC's cache but re-runs train@<variant>, which keeps every seed whose files
# exist and whose fingerprint matches (fmnist.training), a damaged file or a lost MLflow run
# included; a missing file trains the seed again.
SEED_FOLDER = MODELS / "<variant>" / "seed<k>"


def retrain_remedy(folder: Path = SEED_FOLDER) -> str:
    """How to train the seed of ``folder`` (models/<variant>/seed<k>/) again: new files, a new
    MLflow run."""
    return f"delete {folder} and run `dvc repro` to train it again"


def model_remedy(folder: Path = SEED_FOLDER) -> str:
    """What to do when a file in the seed's folder ``folder`` (models/<variant>/seed<k>/) is
    missing or damaged: restore the variant's folder from DVC's cache (a second), or train the
    seed again."""
    return (f"restore it with `dvc checkout {Path(folder).parent}` (from DVC's cache), or "
            f"{retrain_remedy(folder)}")


def checkpoint_dir(variant: str, seed: int) -> Path:
    return CHECKPOINTS / run_name(variant, seed)


def metrics_file(variant: str, seed: int) -> Path:
    """A trained model's records.RunMetrics."""
    return variant_outputs(variant)["metrics"] / f"{seed_name(seed)}.json"


def run_record(variant: str, seed: int) -> RunRecord:
    return RunRecord(variant_outputs(variant)["records"] / seed_name(seed))


def confusion_csv(variant: str, seed: int) -> Path:
    """(actual, predicted) per test image, for DVC's confusion plot template."""
    return variant_outputs(variant)["confusion"] / f"{seed_name(seed)}.csv"


def predictions_file(variant: str, seed: int) -> Path:
    return variant_outputs(variant)["predictions"] / f"{seed_name(seed)}.npz"


def stale_seed_entries(folder: Path, seeds: list[int]) -> list[Path]:
    """The entries (``seed<k>`` or ``seed<k>.<ext>``) of a per-variant output folder whose
    seed is not in ``seeds``: a seed removed from train.seeds, for its stage to delete."""
    if not folder.is_dir():
        return []
    kept = {seed_name(seed) for seed in seeds}
    return sorted(entry for entry in folder.iterdir()
                  if re.fullmatch(r"seed\d+(\.\w+)?", entry.name) and entry.name.split(".")[0] not in kept)


def remove_stale_seeds(folders: Iterable[Path], seeds: list[int]) -> None:
    """Delete, saying so, the entries of per-variant output folders whose seed is no longer in
    train.seeds (``stale_seed_entries``)."""
    for folder in folders:
        for entry in stale_seed_entries(folder, seeds):
            print(f"Removing {entry}: its seed is no longer in train.seeds")
            remove(entry)


def stage_deps(stage: str) -> list[Path]:
    """The files and folders dvc.yaml lists as a stage's deps (templated ones left out): what
    DVC re-runs it for, and so what a stage that keeps some earlier outputs must compare."""
    import yaml

    definition = yaml.safe_load(PIPELINE.read_text())["stages"][stage]
    deps = definition.get("do", definition).get("deps", [])
    names = [dep if isinstance(dep, str) else next(iter(dep)) for dep in deps]
    return [Path(name) for name in names if "${" not in name]


def project_root() -> Path:
    """The repository whose stores (MLflow) we write to.

    ``dvc exp run --queue`` runs stages in a temporary copy; DVC sets DVC_ROOT to the
    repository it was started from, so runs still land in the main project's store.
    """
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
