"""common.npy gives exactly Flower's conversion (np.save / np.load), only with the header kept per shape."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array

from common import npy as arrays

CASES = [np.arange(5, dtype=np.float64), np.arange(12.0).reshape(3, 4), np.array(2.5),
         np.zeros((0, 3)), np.arange(6, dtype=np.int64).reshape(2, 3), np.array([True, False]),
         np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.array([1.5, -np.inf, np.nan])]


@pytest.mark.parametrize("values", CASES, ids=lambda v: f"{v.dtype}{v.shape}")
def test_encode_is_flowers_array(values: np.ndarray) -> None:
    for _ in range(2):  # the second time from the kept header
        ours, flowers = arrays.encode(values), Array(values)
        assert (ours.dtype, ours.shape, ours.stype, ours.data) == (flowers.dtype, flowers.shape, flowers.stype,
                                                                  flowers.data)


@pytest.mark.parametrize("values", [*CASES, np.asfortranarray(np.arange(12.0).reshape(3, 4)),
                                    np.arange(10.0)[::2]], ids=lambda v: f"{v.dtype}{v.shape}{v.strides}")
def test_decode_is_np_load(values: np.ndarray) -> None:
    wire = Array(values)  # Flower's own bytes, whatever the memory order
    for _ in range(2):
        ours, flowers = arrays.decode(wire), wire.numpy()
        assert ours.dtype == flowers.dtype and ours.shape == flowers.shape
        assert ours.flags.c_contiguous == flowers.flags.c_contiguous
        assert ours.flags.f_contiguous == flowers.flags.f_contiguous
        assert ours.flags.writeable and np.array_equal(ours, flowers, equal_nan=True)
        assert ours.tobytes() == flowers.tobytes()
        ours[...] = 0  # a copy: the message's bytes stay as they were
        assert wire.numpy().tobytes() == flowers.tobytes()


def test_decode_refuses_what_np_load_refuses() -> None:
    good = Array(np.arange(4.0))
    short = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[:-8])  # a value cut off
    with pytest.raises(ValueError):
        short.numpy()
    with pytest.raises(ValueError):
        arrays.decode(short)
    pickled = Array(dtype="object", shape=(1,), stype=good.stype, data=b"\x80\x04N.")  # not .npy bytes: np.load's no
    with pytest.raises(ValueError):
        arrays.decode(pickled)
