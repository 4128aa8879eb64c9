"""common.npy.as_numpy reads a Flower Array exactly as Flower's own Array.numpy() does (np.load)."""

import numpy as np
from flwr.app import Array

from common.npy import as_numpy


def test_as_numpy_equals_flowers_own_reading_value_for_value():
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(4,)), rng.normal(size=(3, 3)), np.arange(5), np.zeros((0, 3)), np.array(2.5),
              rng.normal(size=(2, 3)).astype(np.float32), np.asfortranarray(rng.normal(size=(3, 4))),
              np.array([True, False]), np.array([np.nan, -np.inf, 1e-300]), rng.normal(size=(200, 200))]
    for x in arrays:
        a = Array(x)
        ours, flowers = as_numpy(a), a.numpy()
        assert (ours.dtype, ours.shape) == (flowers.dtype, flowers.shape)
        assert ours.tobytes() == flowers.tobytes()
        ours[...] = 0  # writable, like np.load's, and a copy: the message's bytes stay as they were
        assert a.numpy().tobytes() == flowers.tobytes()


def test_unusual_bytes_go_to_np_load():
    x = np.arange(6.0)
    a = Array(x)
    short = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data[:-8])  # cut short: np.load's own error
    try:
        as_numpy(short)
    except ValueError as exc:
        assert "cannot reshape" in str(exc) or "EOF" in str(exc) or "read" in str(exc)
    else:
        raise AssertionError("a short buffer was read")
