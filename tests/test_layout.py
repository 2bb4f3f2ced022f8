"""Copies between the two kernel layouts (channels-first and channels-last memory):
the relayout kernel, and the layers that use it when the arrays of one call disagree."""
import numpy as np
import pytest

import fastnorm
from fastnorm import _layout
from fastnorm._kernels import kernels

from helpers import is_channels_last, make_input, num_threads

DTYPES = (np.float32, np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 5), (3, 17, 1031), (2, 1031, 17),
                                   (1, 8, 8), (2, 9, 1025), (1, 2048, 3), (0, 3, 4), (2, 0, 4)])
@pytest.mark.parametrize("threads", [1, 2])
def test_relayout_is_a_transpose_per_batch(dtype, shape, threads):
    src = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    dst = np.full((shape[0], shape[2], shape[1]), np.nan, dtype)
    kernels.relayout(src, dst, threads)
    np.testing.assert_array_equal(dst, src.transpose(0, 2, 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (3, 130, 9), (1, 3, 2, 4, 5)])
def test_contiguous_and_kernel_view_convert_between_layouts(dtype, shape):
    last = make_input(shape, dtype, "channels_last")
    first = _layout.contiguous(last)
    assert first.flags.c_contiguous
    np.testing.assert_array_equal(first, last)
    view = _layout.kernel_view(first, True)     # channels-first memory to channels-last rows
    np.testing.assert_array_equal(view, np.moveaxis(last, 1, -1).reshape(-1, shape[1], 1))


class _CountingKernels:
    """The kernels module, counting relayout calls."""

    def __init__(self):
        self.relayouts = 0

    def __getattr__(self, name):
        return getattr(kernels, name)

    def relayout(self, *args):
        self.relayouts += 1
        return kernels.relayout(*args)


@pytest.fixture
def counting(monkeypatch):
    counter = _CountingKernels()
    monkeypatch.setattr(_layout, "kernels", counter)
    return counter


def _other(layout):
    return "contiguous" if layout == "channels_last" else "channels_last"


LAYERS = [
    ("GroupNorm", lambda dtype: fastnorm.GroupNorm(3, 6, dtype=dtype), (2, 6, 5, 7)),
    ("BatchNorm2d", lambda dtype: fastnorm.BatchNorm2d(6, dtype=dtype), (3, 6, 5, 7)),
    ("InstanceNorm3d", lambda dtype: fastnorm.InstanceNorm3d(6, affine=True, dtype=dtype),
     (2, 6, 3, 4, 5)),
    ("LocalResponseNorm", lambda dtype: fastnorm.LocalResponseNorm(3), (2, 6, 5, 7)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name,make,shape", LAYERS, ids=[case[0] for case in LAYERS])
def test_gradient_in_the_other_layout(name, make, shape, layout, dtype, counting):
    x = make_input(shape, dtype, layout, seed=3)
    dy_same = make_input(shape, dtype, layout, seed=4)
    dy_other = np.empty_like(dy_same, order="C") if layout == "channels_last" else \
        np.moveaxis(np.empty_like(np.moveaxis(dy_same, 1, -1), order="C"), -1, 1)
    dy_other[...] = dy_same
    assert is_channels_last(dy_other) != (layout == "channels_last")
    same, other = make(dtype), make(dtype)
    same(x)
    other(x)
    dx_same = same.backward(dy_same)
    before = counting.relayouts
    with num_threads(2):
        dx_other = other.backward(dy_other)
    assert counting.relayouts == before + 1
    np.testing.assert_array_equal(dx_other, dx_same)
    assert is_channels_last(dx_other) == (layout == "channels_last")
    for key in same.grads:
        np.testing.assert_array_equal(other.grads[key], same.grads[key])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_out_in_the_other_layout(layout, dtype, counting):
    x = make_input((2, 6, 5, 7), dtype, layout, seed=5)
    expected = fastnorm.functional.group_norm(x, 3)
    out = make_input(x.shape, dtype, _other(layout), seed=6)
    before = counting.relayouts
    result = fastnorm.functional.group_norm(x, 3, out=out)
    assert result is out and counting.relayouts == before + 1
    np.testing.assert_array_equal(out, expected)
