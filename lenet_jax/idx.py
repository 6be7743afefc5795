"""The IDX file format of MNIST and its relatives: reading (checked) and writing.

An IDX file is a magic number 0x0000 TT D (TT the element type, D the number of
dimensions), D big-endian uint32 sizes, then the data. Every fault is a DataError that
names the file.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from lenet_jax.errors import DataError

IDX_TYPES = {0x08: np.dtype(np.uint8), 0x0C: np.dtype(">i4")}
"""The element types read here: unsigned bytes (MNIST) and big-endian int32 (QMNIST labels)."""

MAX_DECOMPRESSED = 1 << 30
"""The most a gzipped IDX file may expand to (QMNIST's largest file is 47 MB)."""


def _gunzip(raw: bytes, where: Path) -> bytes:
    """Decompress gzip data, refusing corrupt data and anything that would expand past
    ``MAX_DECOMPRESSED``."""
    if raw[:2] != b"\x1f\x8b":
        raise DataError(f"{where}: named .gz but is not gzip data")
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(raw, MAX_DECOMPRESSED)
        if inflater.unconsumed_tail:
            raise DataError(f"{where}: expands to more than {MAX_DECOMPRESSED >> 20} MB, more than any IDX data set")
        if not inflater.eof:
            raise DataError(f"{where}: corrupt gzip data (the stream ends early)")
    except zlib.error as e:
        raise DataError(f"{where}: corrupt gzip data ({e})") from None
    return out


def read_bytes(path: Path) -> bytes:
    """The content of an IDX file, decompressed when its name ends in .gz."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    return _gunzip(raw, path) if path.suffix == ".gz" else raw


def parse_idx(data: bytes, where: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes into an array; the declared sizes are checked against the length
    of the data before anything is allocated."""
    if len(data) < 4:
        raise DataError(f"{where}: too short for an IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0 or data[2] not in IDX_TYPES:
        raise DataError(f"{where}: bad IDX magic {data[:4].hex()} (expected 000008xx unsigned bytes or 00000Cxx int32)")
    dtype = IDX_TYPES[data[2]]
    ndim = data[3]
    if ndim == 0:
        raise DataError(f"{where}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{where}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(shape) * dtype.itemsize  # Python integers: no overflow for absurd sizes
    body = len(data) - header
    if body != expected:
        kind = "truncated" if body < expected else "has trailing bytes"
        raise DataError(f"{where}: {kind}: header says {shape} = {expected:,} bytes, file holds {body:,}")
    return np.frombuffer(data, dtype, math.prod(shape), header).reshape(shape)


def read_idx(path: Path | str) -> np.ndarray:
    """The array in the IDX file at ``path`` (gzipped when it ends in .gz)."""
    path = Path(path)
    return parse_idx(read_bytes(path), str(path))


def write_idx(path: Path | str, array: np.ndarray) -> Path:
    """Write ``array`` (uint8, or int32 written big-endian) as an IDX file, gzipped when
    ``path`` ends in .gz."""
    path = Path(path)
    array = np.asarray(array)
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(">i4"): 0x0C}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, IDX_TYPES[code]).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path
