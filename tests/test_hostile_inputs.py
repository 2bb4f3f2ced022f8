"""Inputs the layers must survive: huge and tiny values, NaN and inf, constant data,
read-only, unaligned and Fortran-ordered buffers."""
import numpy as np
import pytest

import fastnorm as fn
import fastnorm.functional as F
import reference as R
from helpers import tolerance

DTYPES = (np.float32, np.float64)


def channels_last(x):
    """The same values as x (N, C, *) in channels-last memory."""
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)


def forward_cases(x):
    """(name, fastnorm output, float64 reference) for every statistics layer on x (N, 3, 50)."""
    x4 = channels_last(x.reshape(x.shape[0], 3, 5, 10))
    return [
        ("batch_norm", F.batch_norm(x, None, None, training=True),
         R.batch_norm_forward(x, None, None, 1e-5).y),
        ("batch_norm_nhwc", F.batch_norm(x4, None, None, training=True),
         R.batch_norm_forward(x4, None, None, 1e-5).y),
        ("layer_norm", F.layer_norm(x, (50,)), R.layer_norm_forward(x, (50,))),
        ("rms_norm", F.rms_norm(x, (50,), eps=1e-5), R.rms_norm_forward(x, (50,), eps=1e-5)),
        ("group_norm", F.group_norm(x, 3), R.group_norm_forward(x, 3)),
        ("group_norm_nhwc", F.group_norm(x4, 3), R.group_norm_forward(x4, 3)),
        ("instance_norm", F.instance_norm(x), R.instance_norm_forward(x).y),
    ]


@pytest.mark.parametrize("dtype,magnitude", [(np.float32, 1e20), (np.float32, 1e30),
                                             (np.float32, 3e38), (np.float64, 1e160),
                                             (np.float64, 1e200)])
def test_values_near_float_max_do_not_overflow_the_variance(dtype, magnitude):
    """Regression: float32 blocks summed in float32 overflowed once |x - mean| > 1.8e19,
    so finite data got y = 0 or NaN; float64 data above 1e154 got NaN (inf - inf)."""
    x = (np.random.default_rng(0).uniform(-1, 1, (4, 3, 50)) * magnitude).astype(dtype)
    with np.errstate(over="ignore"):   # the reference's own squares may overflow (1e200)
        for name, got, want in forward_cases(x):
            assert np.isfinite(got).all(), name
            np.testing.assert_allclose(got, want, atol=4 * tolerance(dtype), err_msg=name)


def test_overflow_keeps_statistics_and_running_stats_consistent():
    x = (np.random.default_rng(1).uniform(-1, 1, (8, 2, 30)) * 1e30).astype(np.float32)
    rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    with np.errstate(over="ignore"):
        y, mean, invstd = F.native_batch_norm(x, None, None, rm, rv, True, 1.0, 1e-5)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(invstd, 1 / x64.std(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(rm, x64.mean(axis=(0, 2)), rtol=1e-6)
    assert np.isinf(rv).all()   # a variance near 3e59 is beyond float32, as in torch's buffer
    _, mean, rstd = F.native_layer_norm(x, (30,))
    np.testing.assert_allclose(rstd, 1 / x64.std(axis=2), rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_stay_in_their_unit(dtype):
    x = np.random.default_rng(2).standard_normal((4, 6, 20)).astype(dtype)
    x[1, 2, 3], x[2, 4, 0] = np.nan, np.inf
    y = F.batch_norm(x, None, None, training=True)
    bad = ~np.isfinite(y)
    assert bad[:, [2, 4]].all() and not bad[:, [0, 1, 3, 5]].any()
    y = F.group_norm(x, 3)   # groups of channels {0,1}, {2,3}, {4,5}
    assert np.isnan(y[1, 2:4]).all() and np.isnan(y[2, 4:6]).all()
    assert np.isfinite(np.delete(y.reshape(12, -1), [1 * 3 + 1, 2 * 3 + 2], axis=0)).all()
    y = F.layer_norm(x, (20,))
    assert np.isnan(y[1, 2]).all() and np.isnan(y[2, 4]).all()
    assert np.isfinite(y).sum() == y.size - 40
    y = F.local_response_norm(x, 3)   # a window of channels, at one position only
    with np.errstate(invalid="ignore"):
        want = R.local_response_norm_forward(x, 3)
    assert np.array_equal(np.isfinite(y), np.isfinite(want))
    assert np.isfinite(y).sum() == y.size - 4   # NaN: 3 channels; inf: its own (inf/inf)


@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_input_gives_exactly_beta(dtype):
    bias = np.array([1.5, -2.0, 0.25, 7.0], dtype)
    for value in (0.0, 3.3, -1e4 - 0.1, np.finfo(dtype).tiny / 8):   # the last one subnormal
        x = np.full((3, 4, 11), value, dtype)
        expected = np.broadcast_to(bias[None, :, None], x.shape)
        assert np.array_equal(F.batch_norm(x, None, None, None, bias, training=True), expected)
        assert np.array_equal(F.batch_norm(channels_last(x.reshape(3, 4, 11, 1)), None, None,
                                           None, bias, training=True)[..., 0], expected)
        assert np.array_equal(F.group_norm(x, 2, None, bias), expected)
        assert np.array_equal(F.instance_norm(x, bias=bias), expected)
        y = F.layer_norm(x, (11,), None, np.full(11, bias[0]))
        assert np.array_equal(y, np.full_like(y, bias[0]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_subnormal_inputs_match_the_reference(dtype):
    tiny = np.finfo(dtype).tiny
    x = (np.random.default_rng(3).standard_normal((4, 3, 50)) * tiny * 1e-3).astype(dtype)
    assert (np.abs(x[x != 0]) < tiny).all()
    for name, got, want in forward_cases(x):
        assert np.isfinite(got).all(), name
        # eps dominates a subnormal variance: the output is (x - mean) / sqrt(eps), tiny
        np.testing.assert_allclose(got, want, atol=1e-30, err_msg=name)


def unaligned(x):
    """x's values in memory starting one byte past an allocation (misaligned), read-only."""
    raw = bytes(1) + x.tobytes()
    return np.frombuffer(raw, dtype=x.dtype, offset=1).reshape(x.shape)


@pytest.mark.parametrize("dtype", DTYPES)
def test_read_only_unaligned_and_fortran_buffers(dtype):
    x = np.random.default_rng(4).standard_normal((5, 4, 6, 7)).astype(dtype)
    variants = {"unaligned": unaligned(x), "fortran": np.asfortranarray(x)}
    ro = x.copy()
    ro.flags.writeable = False
    variants["read_only"] = ro
    assert not variants["unaligned"].flags.aligned and not variants["unaligned"].flags.writeable
    layers = [fn.BatchNorm2d(4, dtype=dtype), fn.GroupNorm(2, 4, dtype=dtype),
              fn.LayerNorm((6, 7), dtype=dtype), fn.RMSNorm(7, dtype=dtype),
              fn.InstanceNorm2d(4, dtype=dtype), fn.LocalResponseNorm(3)]
    dy = np.random.default_rng(5).standard_normal(x.shape).astype(dtype)
    for layer in layers:
        want_y, want_dx = layer(x), layer.backward(dy)
        for name, v in variants.items():
            before = v.copy()
            got_y = layer(v)
            got_dx = layer.backward(unaligned(dy) if name == "unaligned" else dy)
            np.testing.assert_allclose(got_y, want_y, atol=tolerance(dtype), err_msg=name)
            np.testing.assert_allclose(got_dx, want_dx, atol=tolerance(dtype), err_msg=name)
            assert np.array_equal(v, before)
