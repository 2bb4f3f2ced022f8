"""The float32 activation math of _activations.h against float64 references, on
both kernel builds: dense over |z| <= 100, over a sweep of float32 bit patterns
(huge values, subnormals, NaNs with either sign), and at the limits."""
import importlib
import math

import numpy as np
import pytest

from fastnorm import _ext_generic

CODES = {"silu": 2, "gelu": 3, "gelu_tanh": 4}
# max |error| / max(|exact|, 0.25): a few float32 ulp, or 1e-7 absolute near 0.
# gelu' is 5.5e-7 at worst (1.4e-7 absolute where Phi(z) + z pdf(z) cancels, z ~ -0.3)
TOL = {"silu": (4e-7, 4e-7), "gelu": (4e-7, 6e-7), "gelu_tanh": (4e-7, 4e-7)}


def _builds():
    builds = [pytest.param(_ext_generic, id="generic")]
    for name, runs_here in (("avx2", _ext_generic.cpu_has_avx2_fma),
                            ("avx512", _ext_generic.cpu_has_avx512)):
        try:
            module = importlib.import_module(f"fastnorm._ext_{name}")
        except ImportError:  # pragma: no cover - built without the variant
            continue
        mark = pytest.mark.skipif(not runs_here(), reason=f"the CPU cannot run {name}")
        builds.append(pytest.param(module, id=name, marks=mark))
    return builds


_erfc = np.vectorize(math.erfc, otypes=[np.float64])


def reference(name, z):
    """(act(z), act'(z)) in float64 for finite float32 z."""
    z = z.astype(np.float64)
    with np.errstate(all="ignore"):
        if name == "silu":
            s = 1.0 / (1.0 + np.exp(-z))
            return z * s, s * (1.0 + z * (1.0 - s))
        if name == "gelu":
            phi = 0.5 * _erfc(-z / math.sqrt(2.0))
            return z * phi, phi + z * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        k = math.sqrt(2.0 / math.pi)
        s = 1.0 / (1.0 + np.exp(-2.0 * k * (z + 0.044715 * z ** 3)))
        return z * s, s * (1.0 + 2.0 * z * (1.0 - s) * k * (1.0 + 3 * 0.044715 * z * z))


def run(ext, name, z, n_threads=1):
    y = np.empty_like(z)
    g = np.empty_like(z)
    ext.activation_forward(z, CODES[name], y, n_threads)
    ext.activation_backward(z, np.ones_like(z), CODES[name], g, n_threads)
    return y, g


def sweep():
    dense = np.linspace(-100.0, 100.0, 400_001, dtype=np.float32)
    bits = np.arange(0, 2 ** 32, 4099, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return np.concatenate([dense, bits])


@pytest.mark.parametrize("ext", _builds())
@pytest.mark.parametrize("name", sorted(CODES))
def test_float32_activation_within_a_few_ulp(ext, name):
    z = sweep()
    y, g = run(ext, name, z)
    finite = np.isfinite(z)
    assert np.isnan(y[~finite & np.isnan(z)]).all() and np.isnan(g[np.isnan(z)]).all()
    zf = z[finite]
    want_y, want_g = reference(name, zf)
    for got, want, tol in ((y[finite], want_y, TOL[name][0]), (g[finite], want_g, TOL[name][1])):
        assert np.isfinite(got).all()
        err = np.abs(got.astype(np.float64) - want) / np.maximum(np.abs(want), 0.25)
        assert err.max() <= tol, (name, err.max(), zf[err.argmax()])


@pytest.mark.parametrize("ext", _builds())
@pytest.mark.parametrize("name", sorted(CODES))
def test_float32_activation_limits_and_signed_zero(ext, name):
    big = np.finfo(np.float32).max
    tiny = np.float32(1e-45)  # subnormal: act(z) = z / 2 to working precision
    z = np.array([-np.inf, np.inf, -big, big, 0.0, -0.0, tiny, -tiny, np.nan, -np.nan], np.float32)
    y, g = run(ext, name, z)
    assert y[0] == 0 and y[1] == np.inf and y[2] == 0 and y[3] == big
    assert y[4] == 0 and not np.signbit(y[4]) and y[5] == 0 and np.signbit(y[5])
    assert abs(y[6]) <= tiny and abs(y[7]) <= tiny
    assert np.isnan(y[8:]).all() and np.isnan(g[8:]).all()
    assert abs(g[0]) < 1e-30 and g[1] == 1 and abs(g[2]) < 1e-30 and g[3] == 1
    assert (np.abs(g[4:8] - 0.5) <= 6e-8).all()  # one ulp


@pytest.mark.parametrize("name", sorted(CODES))
def test_activation_results_do_not_depend_on_threads(name):
    from fastnorm._kernels import kernels

    z = np.random.default_rng(0).standard_normal(50_000).astype(np.float32) * 8
    one = run(kernels, name, z, 1)
    two = run(kernels, name, z, 2)
    for a, b in zip(one, two):
        assert np.array_equal(a, b)
