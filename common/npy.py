"""Flower Arrays to and from numpy without re-parsing the .npy header of every array (both sides).

Flower carries an array as the bytes ``np.save`` writes (a short text header, then the values); ``Array.numpy()``
runs ``np.load``, which parses that header with ``ast`` (a compile per array), and ``Array(ndarray)`` runs
``np.save``. A site answers every round with the same few shapes (a batch of 47 folds: ~140 arrays each way), and
the coordinator of 48 leave-one-site-out folds reads ~39,000 arrays with a handful of distinct headers; so the
header is parsed or written once per distinct header and kept. The bytes and arrays are exactly Flower's
(tests/test_npy.py compares them); anything unusual (another serialisation, a header version or dtype this does not
handle) goes through Flower's own conversion.
"""

from __future__ import annotations

import functools
from io import BytesIO

import numpy as np
from flwr.app import Array

MAGIC = b"\x93NUMPY"
NUMPY = "numpy.ndarray"  # flwr's SType.NUMPY


@functools.lru_cache(maxsize=1024)
def _read_header(prefix: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int] | None:
    """(shape, fortran order, dtype, element count) of a .npy header, parsed by numpy's own reader; None when it
    is one this module leaves to ``np.load`` (object dtype: refused there without pickle; empty data)."""
    fp = BytesIO(prefix)
    major, _ = np.lib.format.read_magic(fp)
    read = {1: np.lib.format.read_array_header_1_0, 2: np.lib.format.read_array_header_2_0}.get(major)
    if read is None:
        return None
    shape, fortran, dtype = read(fp)
    count = int(np.prod(shape, dtype=np.int64))
    if dtype.hasobject or dtype.itemsize == 0 or count == 0:
        return None
    return tuple(int(n) for n in shape), bool(fortran), dtype, count


def decode(array: Array) -> np.ndarray:
    """``array.numpy()``: the same values, dtype, shape and memory order, writable, without np.load's header parse."""
    data = array.data
    if array.stype != NUMPY or not data.startswith(MAGIC) or len(data) < 12:
        return array.numpy()
    end = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
    header = _read_header(data[:end]) if data[6] in (1, 2) else None
    if header is None:
        return array.numpy()
    shape, fortran, dtype, count = header
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=end).copy()  # a copy, writable as np.load's
    return flat.reshape(shape[::-1]).transpose() if fortran else flat.reshape(shape)


def decode_all(record: object) -> dict[str, np.ndarray]:
    """Every array of an ArrayRecord, decoded (``{k: v.numpy() for k, v in record.items()}``)."""
    return {key: decode(value) for key, value in record.items()}  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=1024)
def _header_for(dtype: np.dtype, shape: tuple[int, ...]) -> tuple[bytes, str] | None:
    """The header ``np.save`` writes before a C-ordered array of this dtype and shape, and the dtype's name as
    Flower gives it (``str(dtype)`` is itself slow); None: leave it to np.save."""
    if dtype.hasobject:
        return None
    probe = np.zeros(shape, dtype=dtype)
    buffer = BytesIO()
    np.save(buffer, probe, allow_pickle=False)
    data = buffer.getvalue()
    return data[:len(data) - probe.nbytes], str(dtype)


def encode(values: np.ndarray) -> Array:
    """``Array(values)`` for a C-contiguous array (the bytes np.save writes), the header written once per shape."""
    if not values.flags.c_contiguous:
        return Array(values)
    kept = _header_for(values.dtype, values.shape)
    if kept is None:
        return Array(values)
    header, dtype = kept
    return Array(dtype=dtype, shape=values.shape, stype=NUMPY, data=header + values.tobytes())
