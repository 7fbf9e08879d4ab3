"""Small file helpers: checksums and atomic writes (temporary path, then rename).

A stage that fails half-way must leave no file that a later stage could mistake for a
finished output.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def file_digest(path: Path, algorithm: str = "md5") -> str:
    digest = hashlib.new(algorithm)
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tree_digest(paths: list[Path]) -> str:
    """One sha256 over the names and contents of ``paths`` (folders: every file inside, in
    name order): what a stage read, to tell later whether its inputs changed."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(f"{file.as_posix()}\0{file_digest(file, 'sha256')}\0".encode())
    return digest.hexdigest()[:16]


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """An output could not be written for want of disk space (or quota)."""

    def __init__(self, path: Path, error: OSError):
        # a DiskFullError of a file inside a folder being written: the folder's, same reason
        self.reason = getattr(error, "reason", None) or error.strerror or str(error)
        super().__init__(f"cannot write {path}: {self.reason}; free some space on its disk and "
                         "run `dvc repro` again")
        self.path = path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success rename it onto ``path``.

    Works for files and for directories (the caller creates whichever it needs). A full
    disk, while the caller writes or here, is a DiskFullError naming ``path`` (not the
    temporary path, nor a file inside a folder being written).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as error:
        if not _disk_full(error):
            raise
        raise DiskFullError(path, error) from error
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(target, path)
    except OSError as error:
        if not _disk_full(error):
            raise
        raise DiskFullError(path, error) from error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove(path: Path) -> None:
    """Delete a file or a folder."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _disk_full(error: OSError) -> bool:
    return isinstance(error, DiskFullError) or error.errno in DISK_FULL


def write_json(path: Path, payload: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# What to do about a damaged file that a stage wrote, where its reader knows no better: true of
# every output (DVC re-runs the stage that writes a missing one, and the train stage trains a
# seed again whose folder lacks a file); a file under models/ is restored faster by
# fmnist.paths.model_remedy's `dvc checkout`.
REMAKE_REMEDY = "delete it and run `dvc repro` to make it again"


class CorruptFileError(ValueError):
    """A file that an earlier stage wrote cannot be read (damaged or replaced)."""


def read_json(path: Path, what: str, remedy: str = REMAKE_REMEDY) -> Any:
    """Read a JSON file another stage wrote; a missing file names the stage to run, a damaged
    one (not JSON) is a CorruptFileError ending in ``remedy``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found ({what}); run `dvc repro` to produce it")
    try:
        return json.loads(path.read_text())
    except ValueError as error:  # json.JSONDecodeError, UnicodeDecodeError
        raise CorruptFileError(f"{path} cannot be read as JSON ({error_reason(error)}): it is damaged or "
                               f"was replaced; {remedy}") from error


def error_reason(error: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
