"""RMSNorm and functional.rms_norm against the float64 reference and torch."""
import numpy as np
import pytest

import fastnorm as fn
from fastnorm import functional as F
from helpers import make_input, torch_or_skip
from rows_testing import (
    assert_bitwise_equal, assert_close, assert_rejected_unchanged, randomize_parameters,
    results_for_thread_counts, run_torch, torch_twin,
)
import reference as ref

DTYPES = (np.float32, np.float64)

CASES = [
    ((2, 3, 5), (5,)),
    ((4, 1), (1,)),
    ((13,), (13,)),
    ((3, 7, 11), (7, 11)),
    ((2, 3, 4, 5), (3, 4, 5)),
    ((5, 2, 97), (97,)),
    ((2, 4099), (4099,)),
]


def case_params():
    for shape, ns in CASES:
        layouts = ("contiguous", "strided") + (("channels_last",) if len(shape) >= 3 else ())
        for layout in layouts:
            for dtype in DTYPES:
                case_id = f"{'x'.join(map(str, shape))}-{len(ns)}d-{layout}-{np.dtype(dtype).name}"
                yield pytest.param(shape, ns, layout, dtype, id=case_id)


@pytest.mark.smoke
@pytest.mark.parametrize("shape, ns, layout, dtype", list(case_params()))
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("eps", [None, 1e-3])
def test_forward_backward_match_reference(shape, ns, layout, dtype, affine, eps):
    layer = fn.RMSNorm(ns, eps=eps, elementwise_affine=affine, dtype=dtype)
    randomize_parameters(layer)
    x = make_input(shape, dtype, layout, seed=3, mean=0.5, std=2.0)
    dy = make_input(shape, dtype, layout, seed=4)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, ref.rms_norm_forward(x, ns, layer.weight, eps), dtype, "y")
    dx = layer.backward(dy)
    gx, gw = ref.rms_norm_backward(x, dy, ns, layer.weight, eps)
    assert_close(dx, gx, dtype, "grad_input")
    if affine:
        assert set(layer.grads) == {"weight"}
        assert_close(layer.grads["weight"], gw, dtype, "grad_weight", scale=10)
    else:
        assert layer.grads == {}


@pytest.mark.parametrize("shape, ns", CASES[:5])
@pytest.mark.parametrize("eps", [None, 1e-4])
def test_matches_torch_module(shape, ns, eps):
    torch = torch_or_skip()
    layer = fn.RMSNorm(ns, eps=eps, dtype=np.float64)
    randomize_parameters(layer)
    module = torch_twin(torch, layer, torch.nn.RMSNorm, ns, eps=eps)
    x = make_input(shape, np.float64, seed=5, mean=-1.0, std=2.0)
    dy = make_input(shape, np.float64, seed=6)
    y, gx, grads = run_torch(torch, module, x, dy)
    np.testing.assert_allclose(layer(x), y, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(layer.backward(dy), gx, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(layer.grads["weight"], grads["weight"], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_eps_is_finfo_of_the_input_dtype(dtype):
    """eps=None: finfo(dtype).eps, which matters for tiny inputs (as in torch)."""
    x = make_input((3, 8), dtype, seed=7, std=1e-4)
    y = fn.RMSNorm(8, dtype=dtype)(x)
    eps = float(np.finfo(dtype).eps)
    assert_close(y, ref.rms_norm_forward(x, 8, None, eps), dtype)
    assert fn.RMSNorm(8).eps is None


def test_float32_matches_torch_float32_default_eps():
    torch = torch_or_skip()
    x = make_input((6, 33), np.float32, seed=8, std=1e-3)
    w = make_input((33,), np.float32, seed=9)
    expected = torch.nn.functional.rms_norm(torch.tensor(x), (33,), torch.tensor(w)).numpy()
    np.testing.assert_allclose(F.rms_norm(x, (33,), w), expected, rtol=1e-5, atol=1e-5)


def test_functional_forms_and_backward_entry_point():
    x = make_input((3, 4, 5), np.float64, seed=10)
    dy = make_input((3, 4, 5), np.float64, seed=11)
    w = make_input((4, 5), np.float64, seed=12)
    y, rstd = F.native_rms_norm(x, (4, 5), w, 1e-3)
    assert rstd.shape == (3,)
    np.testing.assert_allclose(F.rms_norm(x, [4, 5], w, 1e-3), y)
    np.testing.assert_allclose(y, ref.rms_norm_forward(x, (4, 5), w, 1e-3), atol=1e-12)
    np.testing.assert_allclose(rstd, 1 / np.sqrt((x.reshape(3, -1) ** 2).mean(axis=1) + 1e-3))
    gx, gw = F.rms_norm_backward(dy, x, (4, 5), rstd, w)
    egx, egw = ref.rms_norm_backward(x, dy, (4, 5), w, 1e-3)
    np.testing.assert_allclose(gx, egx, atol=1e-12)
    np.testing.assert_allclose(gw, egw, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hard_data_far_from_zero(dtype):
    x = make_input((8, 300), dtype, seed=14, mean=1e4, std=1.0)
    dy = make_input((8, 300), dtype, seed=15)
    layer = fn.RMSNorm(300, eps=1e-5, dtype=dtype)
    randomize_parameters(layer)
    y = layer(x)
    dx = layer.backward(dy)
    assert np.abs(y - ref.rms_norm_forward(x, 300, layer.weight, 1e-5)).max() <= 1e-5
    gx, gw = ref.rms_norm_backward(x, dy, 300, layer.weight, 1e-5)
    assert np.abs(dx - gx).max() <= 1e-5
    assert np.abs(layer.grads["weight"] - gw).max() <= 1e-5 * np.abs(gw).max() + 1e-5


@pytest.mark.parametrize("shape", [(1, 1024), (400, 300), (403, 500), (3, 8 * 4096 + 7),
                                   (70, 4097)])
def test_bitwise_identical_for_any_thread_count(shape):
    x = make_input(shape, np.float32, seed=16)
    dy = make_input(shape, np.float32, seed=17)
    layer = fn.RMSNorm(shape[-1])
    randomize_parameters(layer)

    def run():
        y = layer(x)
        return y, layer.backward(dy), layer.grads["weight"]

    assert_bitwise_equal(results_for_thread_counts(run))


def test_zero_row_gives_zeros_and_nan_stays_in_its_row():
    x = make_input((3, 10), np.float32, seed=18)
    x[0] = 0
    x[2, 1] = np.nan
    y = fn.RMSNorm(10)(x)
    assert np.array_equal(y[0], np.zeros(10, np.float32))
    assert np.isfinite(y[1]).all() and np.isnan(y[2]).all()


def test_empty_and_out():
    layer = fn.RMSNorm(4)
    assert layer(np.empty((0, 4), np.float32)).shape == (0, 4)
    assert layer.backward(np.empty((0, 4), np.float32)).shape == (0, 4)
    assert np.array_equal(layer.grads["weight"], np.zeros(4, np.float32))
    x = make_input((2, 4), np.float32)
    out = np.empty_like(x)
    assert layer(x, out=out) is out
    np.testing.assert_array_equal(out, layer(x))


@pytest.mark.parametrize("bad, error, match", [
    (np.zeros((2, 4, 6), np.float32), ValueError, r"dims \[2\] differ"),
    (np.zeros((5,), np.float32), ValueError, "at least 2 dims"),
    (np.zeros((2, 4, 5), np.float16), TypeError, "float32 or float64"),
    (np.zeros((2, 4, 5), np.float64), TypeError, "dtype"),
])
def test_bad_input_raises_before_any_state_change(bad, error, match):
    assert_rejected_unchanged(fn.RMSNorm((4, 5)), make_input((2, 4, 5), np.float32), bad, error,
                              match)


def test_constructor_and_state_dict():
    torch = torch_or_skip()
    with pytest.raises(ValueError, match="eps"):
        fn.RMSNorm(3, eps=-1.0)
    module = torch.nn.RMSNorm((2, 3))
    layer = fn.RMSNorm((2, 3))
    assert layer.state_dict().keys() == module.state_dict().keys()
    layer.load_state_dict({k: v.numpy() for k, v in module.state_dict().items()})
    assert layer.bias is None and fn.RMSNorm(3, elementwise_affine=False).parameters() == []
