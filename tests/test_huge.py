"""Tensors of more than 2**31 elements: 64-bit indexing end to end.

Each test needs two float32 arrays of about 8.6 GB; they run only with
FASTNORM_HUGE=1 and enough free memory, one at a time:

    FASTNORM_HUGE=1 python -m pytest -m slow tests/test_huge.py

Inputs follow a pattern whose statistics are known in closed form (+-1 about a
per-channel level, alternating along the last axis), so checking costs a few
strided reads instead of a float64 reference of the whole array.
"""
import os

import numpy as np
import pytest

import fastnorm as fn
import fastnorm.functional as F

BIG = 2**31 + 2**20            # elements per array: past the int32 range
NEEDED = 2 * BIG * 4 + 2**30   # input and output, float32, plus a margin


def available_bytes():
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("FASTNORM_HUGE") != "1", reason="set FASTNORM_HUGE=1"),
    pytest.mark.skipif(available_bytes() < NEEDED,
                       reason=f"needs {NEEDED / 2**30:.0f} GiB of free memory"),
]


def fill_alternating(x, levels):
    """x[..., c, ...] = levels[c] + 1 at even and - 1 at odd positions of the last
    axis, channels on axis 1 (broadcast levels)."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    level = np.asarray(levels, np.float32).reshape(shape)
    x[..., 0::2] = level + 1
    x[..., 1::2] = level - 1


def assert_close(actual, expected, what):
    np.testing.assert_allclose(actual, expected, rtol=2e-6, atol=2e-6, err_msg=what)


def corners(a):
    """Values at the first and the last positions of every channel (cheap to read)."""
    return np.stack([a[:1, :, ..., :2], a[-1:, :, ..., -2:]])


def check_batchnorm_forward_backward(x):
    """BatchNorm1d(2) on fill_alternating(x, [3, -5]): running mean, output and input
    gradient (dy = x) against their closed forms, at both ends of the array."""
    fill_alternating(x, [3.0, -5.0])
    layer = fn.BatchNorm1d(2)
    y = layer(x, out=np.empty_like(x))
    assert_close(layer.running_mean, [0.3, -0.5], "running_mean")
    scale = 1 / np.sqrt(1 + 1e-5)
    expected = np.broadcast_to(np.array([scale, -scale], np.float32), (2, 1, 2, 2))
    assert_close(corners(y), expected, "output")
    del y
    dx = layer.backward(x)   # dy = x: dx = (x - mean) * eps * invstd**3, in closed form
    step = 1e-5 * scale**3   # ~1e-5 left after cancelling terms of ~4: float32 rounding
    expected = np.broadcast_to(np.array([step, -step]), (2, 1, 2, 2))
    np.testing.assert_allclose(corners(dx), expected, atol=1e-6, err_msg="grad_input")


def test_batchnorm_nchw_over_2_31_elements():
    # two long runs per sample (the segments strategy): flat offsets of sample 1 exceed 2**31
    check_batchnorm_forward_backward(np.empty((2, 2, BIG // 4), np.float32))


def test_batchnorm_sample_order_over_2_31_elements():
    # many samples of short runs (the runs strategy): sample offsets past 2**31
    runs = 4096
    check_batchnorm_forward_backward(np.empty((BIG // (2 * runs) + 1, 2, runs), np.float32))


def test_batchnorm_channels_last_over_2_31_elements():
    channels = 4
    memory = np.empty((2, BIG // (2 * channels), channels), np.float32)   # (N, W, C)
    levels = np.array([1.0, 2.0, -3.0, 10.0], np.float32)
    memory[:, 0::2, :] = levels + 1
    memory[:, 1::2, :] = levels - 1
    x = np.moveaxis(memory, -1, 1)                  # (N, C, W) view of channels-last memory
    layer = fn.BatchNorm1d(channels)
    y = layer(x, out=np.moveaxis(np.empty_like(memory), -1, 1))
    assert not y.flags.c_contiguous and np.moveaxis(y, 1, -1).flags.c_contiguous
    assert_close(layer.running_mean, 0.1 * levels, "running_mean")
    scale = 1 / np.sqrt(1 + 1e-5)
    assert_close(y[-1, :, -2:], np.broadcast_to(np.array([scale, -scale]), (4, 2)), "output")
    assert_close(y[0, :, :2], np.broadcast_to(np.array([scale, -scale]), (4, 2)), "output")


def test_layernorm_over_2_31_elements():
    # rows of 2**16: a single 2**31-row would also need weight and bias of that size
    x = np.empty((2**15 + 16, 2**16), np.float32)
    fill_alternating(x, [-4.0])
    y, mean, rstd = F.native_layer_norm(x, (2**16,), out=np.empty_like(x))
    assert_close(mean[[0, -1]], [-4.0, -4.0], "mean")
    assert_close(rstd[[0, -1]], [1 / np.sqrt(1 + 1e-5)] * 2, "rstd")
    scale = 1 / np.sqrt(1 + 1e-5)
    assert_close(y[-1, -4:], [scale, -scale] * 2, "output tail")
    assert_close(y[0, :4], [scale, -scale] * 2, "output head")


def test_groupnorm_over_2_31_elements():
    x = np.empty((2, 4, BIG // 8), np.float32)      # groups of 2 channels: 2**29 values each
    fill_alternating(x, [0.0, 1.0, 2.0, 3.0])
    layer = fn.GroupNorm(2, 4)
    y = layer(x, out=np.empty_like(x))
    # group g holds levels 2g and 2g+1: mean 2g + 0.5, variance 1 + 0.25
    scale = 1 / np.sqrt(1.25 + 1e-5)
    expected = np.array([[0.5, -1.5], [1.5, -0.5]] * 2) * scale   # channel c, positions 0/1
    assert_close(y[-1, :, :2], expected, "output")
    assert_close(y[-1, :, -2:], expected, "output tail")
    mean, rstd = layer._saved[1], layer._saved[2]
    assert_close(mean, [[0.5, 2.5]] * 2, "group means")
    assert_close(rstd, np.full((2, 2), scale), "group rstd")
