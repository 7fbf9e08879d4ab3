"""params.yaml validation: every kind of bad value stops the run with the key named."""

from __future__ import annotations

import copy
import shlex

import pytest
import yaml

from fmnist.config import ConfigError, parse_params
from fmnist.params import load_params
from tests.conftest import REPO, real_params


def test_real_params_load_with_the_three_paper_variants():
    config = load_params(REPO / "params.yaml")
    assert list(config.variants)[:3] == ["cnn2", "cnn2_bn", "cnn2_bn_skip"]
    assert {"authors_cnn2", "authors_cnn2_bn", "authors_cnn2_bn_skip"} <= set(config.variants)
    assert config.variants["cnn2_bn_skip"].skip and config.variants["cnn2_bn_skip"].batch_norm
    assert not config.variants["cnn2"].batch_norm
    # a variant inherits the shared defaults it does not override
    assert config.variants["cnn2_bn"].filters == 32 and config.variants["cnn2_bn"].padding == "valid"


def _with(path: str, value, raw: dict | None = None) -> dict:
    raw = copy.deepcopy(raw or real_params())
    *parents, last = path.split(".")
    node = raw
    for key in parents:
        node = node[key]
    node[last] = value
    return raw


@pytest.mark.parametrize("path, value, named", [
    ("train.epochs", -1, "train.epochs"),
    ("train.epochs", "ten", "train.epochs"),
    ("train.batch_size", 0, "train.batch_size"),
    ("train.learning_rate", 0, "train.learning_rate"),
    ("train.seeds", [], "train.seeds"),
    ("train.seeds", [1, 1], "train.seeds"),
    ("train.monitor_test", "yes", "train.monitor_test"),
    ("train.backend", "numpy", "train.backend"),
    ("train.precision", "fp8", "train.precision"),
    ("data.source", "ftp-somewhere", "data.source"),
    ("data.validation_size", 60_000, "data.validation_size"),
    ("data.validation_size", -5, "data.validation_size"),
    ("data.npm_shasum", "abc", "data.npm_shasum"),
    ("data.mirrors", "http://one-string-not-a-list", "data.mirrors"),
    ("model_defaults.padding", "full", "variants.cnn2.padding"),
    ("model_defaults.dropout_rate", 1.5, "variants.cnn2.dropout_rate"),
    ("model_defaults.blocks", 9, "variants.cnn2.blocks"),
    ("model_defaults.filters", [32, 32, 32], "variants.cnn2.filters"),
    ("variants.cnn2_bn_skip.padding", "valid", "variants.cnn2_bn_skip.padding"),
    ("variants.cnn2.skip_projection", "magic", "variants.cnn2.skip_projection"),
    ("variants.cnn2.colour", "red", "variants.cnn2.colour"),
    ("analyse.error_variant", "cnn9", "analyse.error_variant"),
    ("analyse.paper_models", {"cnn2": "CNN3"}, "analyse.paper_models.cnn2"),
    ("analyse.comparisons", [{"claim": "x", "a": "cnn2"}], r"analyse.comparisons\[0\].b"),
    ("analyse.comparisons", [{"claim": "x", "a": "cnn2", "b": "cnn2_bn"},
                             {"claim": "y", "a": "cnn2", "b": "cnn2_bn"}], r"analyse.comparisons\[1\]"),
    ("model_defaults.padding", ["same"], "variants.cnn2.padding"),
    ("model_defaults.kernel_initializer", "magic", "variants.cnn2.kernel_initializer"),
    ("model_defaults.skip_activation", "never", "variants.cnn2.skip_activation"),
    ("analyse.feature_map_classes", ["Hat"], "analyse.feature_map_classes"),
    ("evaluate.class_names", ["a", "b"], "evaluate.class_names"),
    ("baseline.kernel", "rbff", "baseline.kernel"),
    ("baseline.C", -1, "baseline.C"),
    ("baseline.train_size", 70_000, "baseline.train_size"),
    ("baseline.n_jobs", 0, "baseline.n_jobs"),
    ("tracking.experiment", "  ", "tracking.experiment"),
    ("registry.alias", "latest", "registry.alias"),
    ("registry.alias", "v2", "registry.alias"),
    ("registry.model_prefix", "my models", "registry.model_prefix"),
    ("registry.champion_variant", "cnn9", "registry.champion_variant"),
    ("registry.champion_seed", 7, "registry.champion_seed"),
    ("registry.min_accuracy", 1.5, "registry.min_accuracy"),
])
def test_bad_values_name_the_key(path, value, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        parse_params(_with(path, value))


@pytest.mark.parametrize("path, value, allowed", [
    ("train.epochs", 10**20, "a whole number from 1 to 10000"),
    ("train.batch_size", 10**20, "a whole number from 1 to 60000"),
    ("train.step_epochs", 10**20, "a whole number from 1 to 10000"),
    ("train.seeds", [10**20], "a non-empty list of whole numbers from 0 to 4294967295"),
    ("data.split_seed", 2**32, "a whole number from 0 to 4294967295"),
    ("data.validation_size", 10**20, "a whole number from 0 to 59999 (smaller than the training set)"),
    ("baseline.train_size", 10**20, "a whole number from 10 to 60000"),
    ("baseline.seed", -1, "a whole number from 0 to 4294967295"),
    ("analyse.top_errors", 10**20, "a whole number from 1 to 10000"),
    ("model_defaults.blocks", 10**20, "a whole number from 1 to 64"),
    ("model_defaults.filters", 10**20, "whole numbers from 1 to 65536"),
    ("model_defaults.dense_units", 10**20, "a whole number from 1 to 65536"),
    ("model_defaults.kernel_size", 10**20, "a whole number from 1 to 28"),
    ("train.learning_rate", float("inf"), "a number > 0"),
])
def test_absurd_numbers_are_refused_naming_the_key_and_the_allowed_range(path, value, allowed):
    # 10**20 epochs passed once and failed in the middle of training (a TypeError from
    # TensorFlow's cosine schedule), after the stages before it had run
    key = path.replace("model_defaults.", "variants.cnn2.")
    with pytest.raises(ConfigError) as error:
        parse_params(_with(path, value))
    assert str(error.value) == f"params.yaml: {key} = {value!r} is invalid; allowed: {allowed}"


def test_a_removed_variant_skips_the_analyse_entries_naming_it_and_lists_every_choice_at_once():
    """Issue 33.4: the analyse lists need no edit (each skipped entry is a note); the two
    single choices that named it are both reported by the first check."""
    raw = real_params()
    for variant in ("authors_cnn2_bn_skip", "ablation_cnn2_same", "ablation_cnn2_bn_valid"):
        del raw["variants"][variant]
    with pytest.raises(ConfigError) as error:
        parse_params(raw)
    allowed = ", ".join(raw["variants"])
    assert str(error.value).splitlines() == [
        "params.yaml: 2 invalid references:",
        f"  analyse.error_variant = 'authors_cnn2_bn_skip' is invalid; allowed: {allowed}",
        f"  registry.champion_variant = 'authors_cnn2_bn_skip' is invalid; allowed: {allowed}"]
    raw["analyse"]["error_variant"] = raw["registry"]["champion_variant"] = "authors_cnn2_bn"
    config = parse_params(raw)
    assert "authors_cnn2_bn_skip" not in config.analyse.paper_models
    assert [c.claim for c in config.analyse.comparisons] == [
        c["claim"] for c in real_params()["analyse"]["comparisons"] if "ablation" not in c["a"] + c["b"]
        and "authors_cnn2_bn_skip" not in (c["a"], c["b"])]
    assert len(config.notes) == 6 and config.notes[0] == (
        "analyse.paper_models.authors_cnn2_bn_skip skipped: no such variant")
    assert "analyse.comparisons[4] (\"BN alone, both convs 'valid'\") skipped: no variant " \
           "ablation_cnn2_bn_valid" in config.notes


def test_unknown_keys_and_sections_are_rejected_with_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"unknown key train\.epoch;.*epochs"):
        parse_params(_with("train.epoch", 3))
    with pytest.raises(ConfigError, match="unknown section trian"):
        parse_params(_with("trian", {}))
    raw = real_params()
    del raw["train"]["epochs"]
    with pytest.raises(ConfigError, match=r"missing key train\.epochs"):
        parse_params(raw)


def test_local_source_is_not_checked_by_validation_and_a_directory_is_no_source(tmp_path):
    # Issue 12, item 3: a stage that does not read data/local/ must not fail without it
    # (the download stage checks the folder); an arbitrary directory is not a DVC
    # dependency, so it is no longer a source.
    assert parse_params(_with("data.source", "local")).data.source == "local"
    with pytest.raises(ConfigError, match=r"data\.source.*data/local/"):
        parse_params(_with("data.source", str(tmp_path)))


def test_a_new_variant_is_only_an_edit_of_params():
    raw = _with("variants.wide3", {"blocks": 3, "filters": 64, "padding": "same"})
    spec = parse_params(raw).variant("wide3")
    assert spec.block_filters == (64, 64, 64) and spec.dense_units == 128
    with pytest.raises(ValueError, match="unknown variant 'nope'.*cnn2, cnn2_bn"):
        parse_params(raw).variant("nope")


@pytest.mark.parametrize("name", ["cnn2.v2", "cnn 2", "-cnn2", "cnn2/v2"])
def test_a_variant_name_dvc_cannot_take_is_refused_with_the_allowed_characters(name):
    # dvc.yaml lists `variants.${key}`: DVC would read `variants.cnn2.v2` as key v2 of cnn2
    raw = real_params()
    raw["variants"][name] = {}
    with pytest.raises(ConfigError) as error:
        parse_params(raw)
    assert str(error.value) == (f"params.yaml: variants = {name!r} is invalid; allowed: variant names of "
                                "letters, digits, '_', '-' (they name folders, stages and DVC's params keys, "
                                "which DVC splits at '.')")
    raw["search"]["study"] = name
    del raw["variants"][name]
    with pytest.raises(ConfigError, match="search.study"):  # the study names the variant it writes
        parse_params(raw)
    assert "cnn2_v2-1" in parse_params(_with("variants.cnn2_v2-1", {})).variants


def test_make_small_sets_valid_params_on_every_variant():
    """`make small`'s overrides (the Makefile's SMALL) on the real params.yaml pass the
    check_params stage's validation, and shrink only the epochs, the seeds and the SVC."""
    (line,) = [line for line in (REPO / "Makefile").read_text().splitlines() if line.startswith("SMALL :=")]
    words = shlex.split(line.removeprefix("SMALL :="))
    raw = real_params()
    assert words[::2] == ["-S"] * (len(words) // 2)
    for setting in words[1::2]:
        key, value = setting.split("=", 1)
        *parents, last = key.split(".")
        section = raw
        for parent in parents:
            section = section[parent]
        assert last in section, key  # an existing key: no typo that DVC would add silently
        section[last] = yaml.safe_load(value)
    config = parse_params(raw)
    assert config.train.epochs == 2 and list(config.train.seeds) == [0]
    assert config.baseline.train_size == 10000
    assert list(config.variants) == list(real_params()["variants"])  # every variant
