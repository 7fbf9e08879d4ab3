"""The docs build: `mkdocs build --strict` (mkdocs.yml at the root, docs_dir docs) with every
link, image and anchor validated, so a broken link, a missing image or a page left out of the
nav fails here; and every relative link of README.md points at a file that exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

# [text](target) and ![alt](target); the target up to a space or ")"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _build(tmp_path: Path, config: Path = REPO / "mkdocs.yml") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(config), "--site-dir", str(tmp_path / "site")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_the_docs_build_strictly_without_a_warning(tmp_path):
    result = _build(tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "WARNING" not in result.stderr + result.stdout
    for page in sorted((REPO / "docs").glob("*.md")):
        folder = tmp_path / "site" / ("" if page.stem == "index" else page.stem)
        assert (folder / "index.html").is_file(), page


def test_a_broken_anchor_or_image_fails_the_build(tmp_path):
    """The strict build's checks are on: a copy of the docs with a bad anchor and a missing
    image must fail (so the test above would catch them in the real pages)."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\n[x](#no-such-heading)\n\n![y](images/missing.png)\n")
    config = tmp_path / "mkdocs.yml"
    text = (REPO / "mkdocs.yml").read_text()
    text = re.sub(r"(?ms)^nav:\n(  - .*\n)+", "nav:\n  - Home: index.md\n", text)
    config.write_text(text)
    result = _build(tmp_path, config)
    output = result.stderr + result.stdout
    assert result.returncode != 0
    assert "no-such-heading" in output and "images/missing.png" in output


def test_every_relative_link_of_the_readme_exists():
    text = (REPO / "README.md").read_text()
    targets = [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    assert any(t.startswith("docs/") for t in targets), "the README links no docs page"
    for target in targets:
        path = target.split("#")[0]
        assert (REPO / path).exists(), f"README.md links {target}, which does not exist"


def test_the_readme_is_a_few_screens():
    assert len((REPO / "README.md").read_text().splitlines()) < 250


def test_the_screenshot_script_walks_the_mlflow_page_step_by_step():
    """docs/screenshots/shoot.mjs (`make screenshots`) follows docs/mlflow.md's "Step by step":
    a script step per numbered step of the page, with its bold title, in the same order."""
    page = (REPO / "docs" / "mlflow.md").read_text().split("\n## Step by step\n", 1)[1].split("\n## ", 1)[0]
    page_steps = re.findall(r"^(\d+)\. \*\*(.+?)\*\*", page, re.M)
    script = (REPO / "docs" / "screenshots" / "shoot.mjs").read_text()
    script_steps = re.findall(r'^  \["(\d+)\. (.+?)", async', script, re.M)
    assert len(page_steps) >= 5
    assert script_steps == page_steps
