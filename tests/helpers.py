"""Shared test helpers: inputs in every memory layout, tolerances, torch access."""
import contextlib

import numpy as np

import fastnorm

LAYOUTS = ("contiguous", "channels_last", "strided")

# Max abs error allowed against the float64 reference, per dtype.
TOLERANCE = {np.float32: 2e-5, np.float64: 1e-10}


def tolerance(dtype):
    return TOLERANCE[np.dtype(dtype).type]


def make_input(shape, dtype=np.float32, layout="contiguous", seed=0, mean=0.0, std=1.0):
    """Random data of `shape` whose memory is laid out as asked:
    contiguous (C order), channels_last ((N, *spatial, C) memory; needs ndim >= 3),
    or strided (a view with gaps, as a slice of a larger array)."""
    rng = np.random.default_rng(seed)
    if layout == "contiguous":
        return (rng.standard_normal(shape) * std + mean).astype(dtype)
    if layout == "channels_last":
        assert len(shape) >= 3
        last_shape = (shape[0],) + tuple(shape[2:]) + (shape[1],)
        last = (rng.standard_normal(last_shape) * std + mean).astype(dtype)
        return np.moveaxis(last, -1, 1)
    if layout == "strided":
        big_shape = tuple(shape[:-1]) + (2 * shape[-1],)
        big = (rng.standard_normal(big_shape) * std + mean).astype(dtype)
        return big[..., ::2]
    raise ValueError(layout)


def is_channels_last(a):
    return a.ndim >= 3 and np.moveaxis(a, 1, -1).flags.c_contiguous


@contextlib.contextmanager
def num_threads(n):
    """Run a block with fastnorm limited to n threads, restoring the limit after."""
    fastnorm.set_num_threads(n)
    try:
        yield
    finally:
        fastnorm._threads._reset_num_threads()


def torch_or_skip():
    import pytest

    return pytest.importorskip("torch")
