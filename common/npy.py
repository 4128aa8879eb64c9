"""Reading a Flower ``Array`` (``.npy`` bytes) without re-parsing its header every time.

Flower's ``Array.numpy()`` is ``np.load``, which parses the ``.npy`` header with ``ast.literal_eval`` (a Python
compile) on every call. The coordinator of 48 leave-one-site-out folds reads about 39,000 arrays (each fold's sites'
moments, cross-products, gradients and Hessians), all with a handful of distinct headers: under cProfile that parse
took about two thirds of the fold threads' own CPU outside Flower. ``as_numpy`` parses each distinct header once
(numpy's own reader, cached) and reads the values with ``np.frombuffer``: the same array, value for value.
Anything unusual (another serialisation, a Fortran-ordered or object array, a short buffer) goes to ``np.load``.
"""

from __future__ import annotations

import io
from functools import lru_cache
from math import prod

import numpy as np
from flwr.app import Array

MAGIC = b"\x93NUMPY"


@lru_cache(maxsize=256)
def _header(major: int, header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of one ``.npy`` header, by numpy's own reader."""
    size = len(header).to_bytes(2 if major == 1 else 4, "little")
    stream = io.BytesIO(MAGIC + bytes([major, 0]) + size + header)
    stream.seek(8)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read(stream)


def as_numpy(array: Array) -> np.ndarray:
    """``array.numpy()``, the header parsed once per distinct header (a writable copy, as ``np.load`` gives)."""
    data = array.data
    if array.stype != "numpy.ndarray" or data[:6] != MAGIC or data[6] not in (1, 2, 3):
        return array.numpy()
    start = 10 if data[6] == 1 else 12
    length = int.from_bytes(data[8:start], "little")
    shape, fortran, dtype = _header(1 if data[6] == 1 else 2, bytes(data[start:start + length]))
    count = prod(shape)
    if fortran or dtype.hasobject or len(data) < start + length + count * dtype.itemsize:
        return array.numpy()
    return np.frombuffer(data, dtype=dtype, count=count, offset=start + length).reshape(shape).copy()
