"""Fixtures that shrink the real pipeline: the real params.yaml with tiny settings, tiny
fabricated Fashion-MNIST-shaped IDX files, temporary MLflow stores and DVC repositories."""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from filelock import FileLock

from fmnist import cli, data  # cli first: it sets TensorFlow's log level before Keras loads
from fmnist.config import parse_params
from fmnist.idx import write_idx

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """One JAX compilation cache for the whole session (unless one is set): every JAX process
    the tests start, in any temporary repository, loads what an earlier one compiled, as the
    stages of one project do (``fmnist.device.jax_environment``). Made by the main process,
    before the xdist workers start (they inherit it), and removed at its end."""
    if hasattr(config, "workerinput") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    folder = tempfile.mkdtemp(prefix="fmnist-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))


@pytest.fixture(autouse=True)
def no_leaked_global_state():
    """Every test starts from the same process state, whatever ran before it on this CPU:
    Keras' global dtype policy (``precision: auto`` resolves to bfloat16 on AMX CPUs) and
    distribution, the environment, the working directory. A test (or the code it calls)
    that changes one and does not restore it fails here, and the state is restored so that
    later tests are not failed by it too."""
    import keras

    policy = keras.mixed_precision.global_policy().name
    distribution = keras.distribution.distribution()
    environment = dict(os.environ)
    cwd = os.getcwd()
    yield
    leaked = []
    if keras.mixed_precision.global_policy().name != policy:
        leaked.append(f"Keras' global dtype policy ({keras.mixed_precision.global_policy().name}, "
                      f"was {policy})")
        keras.mixed_precision.set_global_policy(policy)
    if keras.distribution.distribution() is not distribution:
        leaked.append("Keras' global distribution")
        keras.distribution.set_distribution(distribution)
    if os.getcwd() != cwd:
        leaked.append(f"the working directory ({os.getcwd()}, was {cwd})")
        os.chdir(cwd)
    changed = {key for key in set(environment) | set(os.environ)
               if environment.get(key) != os.environ.get(key)}
    if changed:
        os.environ.clear()
        os.environ.update(environment)
    # MLflow's set_tracking_uri exports the store, and fmnist.tracking.use_store sets MLflow's
    # HTTP bounds for a server store (every stage does): put back quietly; any other is a leak
    from fmnist.tracking import HTTP_DEFAULTS

    changed -= {"MLFLOW_TRACKING_URI", "_MLFLOW_TELEMETRY_SESSION_ID", "PYTEST_CURRENT_TEST", *HTTP_DEFAULTS}
    if changed:
        leaked.append(f"environment variables {sorted(changed)}")
    assert not leaked, "the test left global state changed: " + "; ".join(leaked)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A subprocess that timed out: the report shows what it was doing (its last output)."""
    report = yield
    error = call.excinfo.value if call.excinfo is not None else None
    if isinstance(error, subprocess.TimeoutExpired):
        for name, output in (("stdout", error.stdout), ("stderr", error.stderr)):
            if isinstance(output, bytes):
                output = output.decode(errors="replace")
            report.sections.append((f"last {name} of the timed-out {error.cmd!r}",
                                    (output or "(nothing)")[-3000:]))
    return report


# The test files that run pipelines, longest first (`make test` lists the slowest tests). `make
# test` spreads whole files over its workers (xdist's loadfile, without its default reorder
# by number of tests, which put these last): starting with the longest, the workers end
# together instead of one running test_compare alone at the end. test_benchmarks before
# test_faults: the first tests of test_compare and test_faults wait for the same built
# pipeline, so the three first files are not all waiting for one worker's build.
LONGEST_FIRST = ["test_team.py", "test_compare.py", "test_benchmarks.py", "test_faults.py",
                 "test_use.py", "test_pipeline.py", "test_search.py", "test_training.py",
                 "test_recipes.py", "test_device.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    missing = set(LONGEST_FIRST) - {path.name for path in Path(__file__).parent.glob("test_*.py")}
    assert not missing, f"tests/conftest.py's LONGEST_FIRST names no test file {sorted(missing)}"

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: a file's tests keep their order


TINY_TRAIN_PER_CLASS = 24
TINY_TEST_PER_CLASS = 6


def tiny_images(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images a model can tell apart: class c lights up row band c, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
    images = rng.integers(0, 60, size=(len(labels), 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        images[i, 2 + 2 * label: 4 + 2 * label, 4:24] = 250
    order = rng.permutation(len(labels))
    return images[order], labels[order]


def write_tiny_idx(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    x_train, y_train = tiny_images(TINY_TRAIN_PER_CLASS, seed=1)
    x_test, y_test = tiny_images(TINY_TEST_PER_CLASS, seed=2)
    write_idx(folder / data.TRAIN_IMAGES, x_train)
    write_idx(folder / data.TRAIN_LABELS, y_train)
    write_idx(folder / data.TEST_IMAGES, x_test)
    write_idx(folder / data.TEST_LABELS, y_test)
    return folder


def real_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def untimed(record: dict[str, float]) -> dict[str, float]:
    """An epoch record less what the clock gives."""
    return {key: value for key, value in record.items() if key not in ("epoch_seconds", "images_per_second")}


def shrink(raw: dict) -> dict:
    """The real params, made tiny: local data (the tiny files, see ``tiny_idx_dir`` and
    ``make_dvc_repo``), 2 epochs, small batches, one seed, no quality gate on the champion."""
    raw = copy.deepcopy(raw)
    raw["data"]["source"] = "local"
    raw["data"]["mirrors"] = ["http://127.0.0.1:9/unreachable"]
    raw["train"].update(epochs=2, batch_size=32, seeds=[0])
    raw["baseline"]["train_size"] = 100
    raw["registry"]["min_accuracy"] = 0.0  # two epochs on tiny data: any model may be the champion
    return raw


def only_variants(raw: dict, names: list[str]) -> dict:
    """``raw`` params with only the variants ``names``, and only the analyse settings that
    name them (params.yaml's comparisons name every shipped variant; beyond_paper ours)."""
    raw = copy.deepcopy(raw)
    raw["variants"] = {name: raw["variants"][name] for name in names}
    analyse = raw["analyse"]
    analyse["paper_models"] = {v: m for v, m in analyse["paper_models"].items() if v in names}
    analyse["beyond_paper"] = {v: n for v, n in analyse["beyond_paper"].items() if v in names}
    analyse["comparisons"] = [c for c in analyse["comparisons"] if c["a"] in names and c["b"] in names]
    if analyse["error_variant"] not in names:
        analyse["error_variant"] = names[-1]
    if raw["registry"]["champion_variant"] not in names:
        raw["registry"]["champion_variant"] = names[-1]
    return raw


@pytest.fixture
def tiny_idx_dir(tmp_path: Path) -> Path:
    return write_tiny_idx(tmp_path / "tiny_idx")


@pytest.fixture
def tiny_params() -> dict:
    return shrink(real_params())


@pytest.fixture
def tiny_config(tiny_params: dict):
    return parse_params(tiny_params)


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary project root: MLflow writes its SQLite store and artifacts there."""
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(root))
    return root


def venv_env() -> dict[str, str]:
    """Environment for subprocesses: this interpreter's bin first on PATH (python, dvc)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DVC_ROOT", None)
    env.update(cli.QUIET_TENSORFLOW)
    return env


def run(cmd: list[str], cwd: Path, check: bool = True, env: dict | None = None,
        timeout: float = 1200) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env or venv_env(),
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}"
                             f"\n{result.stderr[-5000:]}")
    return result


def make_dvc_repo(dest: Path, params: dict, local_data: Path | None = None) -> Path:
    """A temporary git + DVC repository holding this project's pipeline and ``params``;
    the files of ``local_data`` go to its data/local/, force-added to git (the project's
    .gitignore ignores them) as docs/pipeline.md advises for queued experiments."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in ("dvc.yaml", "stages", "src", "plot_templates", "data/local/README.md"):
        source = REPO / item
        if source.is_dir():
            shutil.copytree(source, dest / item, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            (dest / item).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, dest / item)
    if local_data is not None:
        for file in local_data.iterdir():
            shutil.copy(file, dest / "data" / "local" / file.name)
    shutil.copy(REPO / ".gitignore", dest / ".gitignore")
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], dest)
    run(["git", "config", "user.email", "test@example.com"], dest)
    run(["git", "config", "user.name", "test"], dest)
    run(["dvc", "init", "-q"], dest)
    run(["dvc", "config", "core.analytics", "false"], dest)
    run(["git", "add", "-A"], dest)
    if local_data is not None:  # tiny: committed, so that `dvc exp run --queue` copies have them
        run(["git", "add", "-f", "data/local"], dest)
    run(["git", "commit", "-qm", "pipeline"], dest)
    return dest


def copy_repo(source: Path, dest: Path) -> Path:
    """A copy of a built repository (git, DVC cache, models, MLflow store) that is its own:
    the store's absolute artifact locations are moved from ``source`` to ``dest``."""
    shutil.copytree(source, dest, symlinks=True)
    db = dest / "mlflow.db"
    if db.exists():
        old, new = str(source), str(dest)
        with sqlite3.connect(db) as store:
            for (table,) in store.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
                for column in store.execute(f"PRAGMA table_info('{table}')").fetchall():
                    if column[2].upper().startswith(("TEXT", "VARCHAR")):
                        name = column[1]
                        store.execute(f'UPDATE "{table}" SET "{name}" = replace("{name}", ?, ?) '
                                      f'WHERE instr("{name}", ?) > 0', (old, new, old))
    return dest


# The tiny pipeline most end-to-end tests start from: one variant of ours and the authors'
# exact model (analyse.paper_models; the shipped champion), one seed, 2 epochs.
BUILT_VARIANTS = ["cnn2", "authors_cnn2_bn_skip"]


@dataclasses.dataclass(frozen=True)
class Built:
    repo: Path  # never changed by a test: each takes its own copy (``built_copy``)
    params: dict
    output: str  # what its first run, `python -m fmnist.repro` (as `make run`), printed


@pytest.fixture(scope="session")
def built_pipeline(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Built:
    """``BUILT_VARIANTS``' tiny pipeline after its first run: built once per test session,
    under pytest-xdist once for all its workers (the first builds, the others wait)."""
    params = only_variants(shrink(real_params()), BUILT_VARIANTS)
    if worker_id == "master":  # no xdist
        root = tmp_path_factory.mktemp("built")
    else:
        root = tmp_path_factory.getbasetemp().parent / "built"
    output = root / "first-run.txt"
    with FileLock(str(root) + ".lock"):
        if not output.exists():
            root.mkdir(exist_ok=True)
            repo = make_dvc_repo(root / "repo", params, local_data=write_tiny_idx(root / "tiny_idx"))
            output.write_text(run([sys.executable, "-m", "fmnist.repro"], repo).stdout)
    return Built(root / "repo", params, output.read_text())


def built_copy(built: Built, dest: Path) -> Path:
    """A repository of its own, as ``built`` left it (its first run not committed)."""
    return copy_repo(built.repo, dest)


@pytest.fixture
def dvc_repo(tmp_path: Path, tiny_params: dict, tiny_idx_dir: Path) -> Path:
    return make_dvc_repo(tmp_path / "repo", tiny_params, local_data=tiny_idx_dir)
