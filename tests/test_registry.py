"""The registry's alias moves only on purpose: experiments register tagged versions and leave
it; the committed pipeline or `python -m fmnist.registry promote` moves it through the gate.
On a temporary MLflow store, with runs made as the train stage makes them (no training)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from fmnist import cli, paths, registry, tracking
from fmnist.config import parse_params
from fmnist.records import RunInfo
from tests.conftest import REPO, only_variants, real_params, run, shrink, venv_env

VARIANTS = ["cnn2", "cnn2_bn"]


def _write_params(root: Path, raw: dict) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def _commit(root: Path, message: str) -> None:
    run(["git", "add", "params.yaml"], root)
    run(["git", "commit", "-qm", message], root)


def _train(root: Path, raw: dict, variant: str, seed: int, epochs: list[dict[str, float]]) -> str:
    """What the train stage leaves of a model: an MLflow run (its epochs, a logged model named
    as the run) and models/<variant>/seed<k>/run.json. Returns the run id."""
    name = paths.run_name(variant, seed)
    experiment_id = tracking.connect(raw["tracking"]["experiment"], root)
    with tracking.run(experiment_id, name, {"variant": variant, "seed": str(seed)}) as run_id:
        for epoch, record in enumerate(epochs, start=1):
            tracking.log_epoch({"epoch": epoch, **record})
        mlflow.create_external_model(name=name)  # register_version finds the logged model by name
    files = paths.run_files(variant, seed)
    (root / files.folder).mkdir(parents=True, exist_ok=True)
    RunInfo(mlflow_run_id=run_id, keras_backend="tensorflow", precision="float32", device="cpu",
            train_seconds=1.0, epochs=len(epochs), parameters=1, canonical_split=False,
            data_source="local", class_names=tuple(raw["evaluate"]["class_names"])).write(
        root / files.run_info)
    return run_id


@pytest.fixture
def trained(mlflow_store: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict]:
    """A committed git project (params.yaml: two variants, champion cnn2_bn seed 0, gate 0.9)
    whose two models are trained, not yet registered."""
    monkeypatch.chdir(mlflow_store)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    raw = only_variants(shrink(real_params()), VARIANTS)
    raw["registry"].update(champion_variant="cnn2_bn", champion_seed=0, min_accuracy=0.9)
    _write_params(mlflow_store, raw)
    run(["git", "init", "-q"], mlflow_store)
    run(["git", "config", "user.email", "test@example.com"], mlflow_store)
    run(["git", "config", "user.name", "test"], mlflow_store)
    _commit(mlflow_store, "params")
    for variant in VARIANTS:
        _train(mlflow_store, raw, variant, 0, [{"accuracy": 0.8}, {"accuracy": 0.95}])
    return mlflow_store, raw


@pytest.fixture
def project(trained: tuple[Path, dict]) -> tuple[Path, dict]:
    """``trained``, its two models registered by the committed pipeline."""
    root, raw = trained
    _, moved = registry.register_models(parse_params(raw))
    assert moved.startswith("@champion: nothing -> fashion-mnist-cnn2_bn version 1 (final-epoch training")
    return root, raw


def test_the_register_stage_prints_its_own_lines_only(trained):
    """MLflow's own messages for each new version ("Successfully registered model ...",
    "Created version ...", the run's logged model found by name) are not in the stage's log:
    its own line per version says the same."""
    root, _ = trained
    env = {key: value for key, value in venv_env().items() if key not in cli.QUIET_TENSORFLOW}
    result = subprocess.run([sys.executable, str(REPO / "stages" / "register.py")], cwd=root,
                            env={**env, "DVC_ROOT": str(root)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=300)
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines() == [
        "cnn2-seed0: fashion-mnist-cnn2 version 1", "cnn2_bn-seed0: fashion-mnist-cnn2_bn version 1",
        "@champion: nothing -> fashion-mnist-cnn2_bn version 1 (final-epoch training accuracy (no "
        "validation split) 0.9500 >= registry.min_accuracy 0.9)",
        "Use: models:/fashion-mnist-cnn2_bn@champion"]


def _champion(raw: dict) -> tuple[str, str]:
    found = tracking.alias_version("champion", "fashion-mnist-")
    return found["model"], found["version"]


def test_experiments_register_tagged_versions_and_leave_the_champion(project, monkeypatch):
    root, committed = project
    for name, key, value in (("exp-fast", "epochs", 4), ("exp-slow", "learning_rate", 0.0002)):
        monkeypatch.setenv("DVC_EXP_NAME", name)  # as `dvc exp run -S train.<key>=<value>` sets it
        raw = {**committed, "train": {**committed["train"], key: value}}
        _write_params(root, raw)
        for variant in VARIANTS:
            _train(root, raw, variant, 0, [{"accuracy": 0.97}])
        registered, alias = registry.register_models(parse_params(raw))
        assert alias.startswith(f"@champion stays at fashion-mnist-cnn2_bn version 1: experiment {name} ")
        assert _champion(raw) == ("fashion-mnist-cnn2_bn", "1")
        version = tracking.model_version("fashion-mnist-cnn2_bn", registered["cnn2_bn-seed0"]["version"])
        assert version["tags"]["dvc_exp_name"] == name
        assert version["tags"]["params_changed"] == f"train.{key}={value}"
        assert version["tags"]["workspace_committed"] == "false"
    first, second, third = (tracking.model_version("fashion-mnist-cnn2", v)["tags"] for v in "123")
    # one commit, three models: what tells them apart is the experiment and its params
    assert first["git_commit"] == second["git_commit"] == third["git_commit"] != "unknown"
    assert (first["dvc_exp_name"], first["params_changed"], first["workspace_committed"]) == ("", "", "true")
    assert [second["dvc_exp_name"], third["dvc_exp_name"]] == ["exp-fast", "exp-slow"]


def test_promotion_moves_the_champion_through_the_gate_and_the_pipeline_respects_it(project):
    root, raw = project
    config = parse_params(raw)
    # a weak model (version 2), and a good one with a validation split (version 3)
    for epochs in ([{"accuracy": 0.99, "val_accuracy": 0.5}], [{"accuracy": 0.5, "val_accuracy": 0.93}]):
        _train(root, raw, "cnn2", 0, epochs)
        registry.register_models(config)
    with pytest.raises(registry.PromotionError, match=(
            r"fashion-mnist-cnn2 version 2 fails the gate: final-epoch validation accuracy 0\.5000 < "
            r"registry\.min_accuracy 0\.9")):
        registry.promote(config, "cnn2", version="2")
    assert _champion(raw) == ("fashion-mnist-cnn2_bn", "1")
    refused = subprocess.run([sys.executable, "-m", "fmnist.registry", "promote", "cnn2", "--version", "2"],
                             cwd=root, env={**venv_env(), "DVC_ROOT": str(root)}, capture_output=True,
                             text=True)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith("ERROR: fashion-mnist-cnn2 version 2 fails the gate")

    moved = registry.promote(config, "cnn2")  # the model in models/cnn2/seed0: version 3
    assert moved == ("@champion: fashion-mnist-cnn2_bn version 1 -> fashion-mnist-cnn2 version 3 "
                     "(final-epoch validation accuracy 0.9300 >= registry.min_accuracy 0.9)")
    assert _champion(raw) == ("fashion-mnist-cnn2", "3")
    assert registry.champion_uri(config) == "models:/fashion-mnist-cnn2@champion"
    # the committed pipeline leaves a champion promoted by hand while params.yaml's choice stands
    _, alias = registry.register_models(config)
    assert alias.startswith("@champion stays at fashion-mnist-cnn2 version 3, promoted by hand")

    # a new choice in params.yaml moves it, once committed
    raw["train"]["seeds"] = [0, 1]
    raw["registry"]["champion_seed"] = 1
    for variant in VARIANTS:
        _train(root, raw, variant, 1, [{"accuracy": 0.96}])
    _write_params(root, raw)
    with pytest.raises(registry.PromotionError, match=(
            r"^@champion would move from fashion-mnist-cnn2 version 3 to fashion-mnist-cnn2_bn version 2 "
            r"\(params.yaml's cnn2_bn-seed1\), but params.yaml, dvc.yaml, src/ or stages/ have "
            r"uncommitted changes: commit them")):
        registry.register_models(parse_params(raw))
    _commit(root, "champion: cnn2_bn seed 1")
    _, moved = registry.register_models(parse_params(raw))
    assert moved.startswith("@champion: fashion-mnist-cnn2 version 3 -> fashion-mnist-cnn2_bn version 2 (")
