"""The shape of the code: dvc.yaml's deps are what each stage imports, a trained run's files
are named in one place, and no module reaches into training for data conversion."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from fmnist import paths
from tests.conftest import REPO

PACKAGE = REPO / "src" / "fmnist"


def _local_imports(file: Path) -> set[str]:
    """The fmnist modules ``file`` imports anywhere in it (a function's lazy import included)."""
    modules = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "fmnist":  # from fmnist import paths, tracking
                modules |= {alias.name for alias in node.names}
            elif node.module.startswith("fmnist."):
                modules.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[1] for alias in node.names
                        if alias.name.startswith("fmnist.")}
    return {module for module in modules if (PACKAGE / f"{module}.py").is_file()}


def imported_modules(script: Path) -> set[str]:
    """Every fmnist module ``script`` imports, directly or through other fmnist modules."""
    found: set[str] = set()
    todo = list(_local_imports(script))
    while todo:
        module = todo.pop()
        if module not in found:
            found.add(module)
            todo += _local_imports(PACKAGE / f"{module}.py")
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
    imported = {f"src/fmnist/{module}.py" for module in modules}
    imported |= {f"src/fmnist/templates/{name}" for module in modules  # what they render with
                 for name in re.findall(r'"([\w.-]+\.j2)"', (PACKAGE / f"{module}.py").read_text())}
    listed = {dep for dep in deps if dep.startswith("src/")}
    assert sorted(imported - listed) == [], f"{stage}: imported but not in dvc.yaml's deps"
    assert sorted(listed - imported) == [], f"{stage}: in dvc.yaml's deps but never imported"


def test_the_import_walk_follows_lazy_and_package_imports():
    # stages/train.py imports training inside main() (after choosing the backend), and
    # training imports jax_loop inside fit(): both must count, or the deps test could not fail
    modules = imported_modules(REPO / "stages" / "train.py")
    assert {"device", "paths", "training", "jax_loop", "models", "data", "tracking"} <= modules
    assert "report" not in modules and "baseline" not in modules


# A trained run's file names, and the words that build run names: spelled in paths.py only.
RUN_FILE_LITERALS = [paths.RunFiles(Path()).model.name, paths.RunFiles(Path()).history.name,
                     paths.RunFiles(Path()).history_csv.name, paths.RunFiles(Path()).architecture.name,
                     paths.CheckpointFiles(Path()).state.name,
                     "-seed{", "git_commit"]


def test_run_file_names_are_spelled_only_in_paths():
    files = sorted((REPO / "src" / "fmnist").glob("*.py")) + sorted((REPO / "stages").glob("*.py"))
    allowed = {REPO / "src" / "fmnist" / "paths.py": RUN_FILE_LITERALS,
               REPO / "src" / "fmnist" / "tracking.py": ["git_commit"]}  # the one tag's home
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
                 for file in [*PACKAGE.glob("*.py"), *(REPO / "stages").glob("*.py")]
                 if "training" in _local_imports(file)]
    assert sorted(importers) == ["src/fmnist/search.py", "stages/train.py"]


def test_config_knows_the_papers_models():
    from fmnist import config, paper

    assert config.PAPER_MODELS == tuple(paper.MODELS)


def test_a_run_infos_keys_are_spelled_only_in_the_records_module():
    """Stages and the report's template read a trained run's facts as attributes of
    fmnist.records.RunInfo, never by key (a renamed field would otherwise fail at run time)."""
    files = [*sorted(PACKAGE.glob("*.py")), *sorted((REPO / "stages").glob("*.py")),
             *sorted((PACKAGE / "templates").glob("*.j2"))]
    pattern = re.compile(r"run_info(\[|\.get\()|[\"']mlflow_run_id[\"']")
    offenders = [f"{file.relative_to(REPO)}: {match.group(0)}" for file in files
                 if file.name != "records.py" for match in pattern.finditer(file.read_text())]
    assert offenders == []
