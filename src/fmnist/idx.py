"""The IDX format of the canonical (Fashion-)MNIST files, gzip-compressed or plain."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

_UBYTE = 0x08
GZIP_MAGIC = b"\x1f\x8b"
IDX_MAGIC = b"\x00\x00"  # then the data type and the number of dimensions


class IdxError(ValueError):
    """A file that is not a well-formed uint8 IDX file."""


def read_idx(path: Path) -> np.ndarray:
    """A uint8 IDX file, gzip-compressed or not: told by its first bytes, not by its name
    (a download may have lost the ``.gz``, or been unpacked and kept it)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw.startswith(GZIP_MAGIC):
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:  # a truncated or damaged gzip stream
        raise IdxError(f"{path}: cannot be read as IDX ({error})") from error
    if len(raw) < 4 or not raw.startswith(IDX_MAGIC):
        raise IdxError(f"{path}: cannot be read as IDX (neither gzip-compressed nor starting with "
                       "the IDX magic number)")
    if raw[2] != _UBYTE:
        raise IdxError(f"{path}: IDX data type 0x{raw[2]:02x}, expected 0x08 (unsigned byte)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape)) if shape else 0
    if len(raw) - header != expected:
        raise IdxError(f"{path}: header says shape {shape} ({expected} bytes) but the file holds "
                       f"{len(raw) - header} bytes of data")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as IDX; ``.gz`` paths are gzip-compressed with a fixed mtime
    so that the same array always gives the same bytes (and the same checksum)."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise IdxError(f"{path}: IDX writer takes uint8 arrays, got {array.dtype}")
    header = bytes([0, 0, _UBYTE, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    payload = header + array.tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        with path.open("wb") as raw_file, gzip.GzipFile(
                filename="", mode="wb", fileobj=raw_file, mtime=0) as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
