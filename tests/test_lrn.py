"""LocalResponseNorm and functional.local_response_norm(_backward).

Checked against the float64 NumPy reference (tests/reference.py) and against
torch 2.13 (forward and autograd backward), over float32/float64, odd and even
window sizes, size 1 and size > C, C = 1, channels-first/channels-last/strided
memory, extreme alpha/beta/k, and thread counts (bitwise).
"""
import os
import sys

import numpy as np
import pytest

import fastnorm as fn
from fastnorm.functional import local_response_norm, local_response_norm_backward

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402
from helpers import num_threads  # noqa: E402

DTYPES = [np.float32, np.float64]
# (shape, size): odd/even sizes, size 1, size > C, C = 1, 3-D/4-D/5-D, S = 1 (rows path)
CASES = [
    ((2, 7, 5), 3),
    ((2, 7, 5), 4),
    ((3, 1, 4, 4), 5),
    ((2, 13, 3, 4), 1),
    ((2, 13, 3, 4), 6),
    ((2, 6, 2, 3, 2), 5),
    ((5, 9, 1), 2),
    ((4, 6, 17), 11),
    ((2, 3, 530), 2),
]
COEFFS = [(1e-4, 0.75, 1.0), (0.5, 0.75, 0.3), (2.0, 1.3, 0.7), (30.0, 3.0, 2.0)]


def make(shape, dtype, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale).astype(dtype)


def forward_tol(dtype, beta=0.75):
    """A relative error in s grows by |beta| in s^-beta (and by |beta| + 1 in s^-(beta+1))."""
    return 1e-12 if dtype == np.float64 else 3e-7 * (1 + abs(beta))


def check_forward(y, x, size, alpha, beta, k):
    expected = ref.local_response_norm_forward(x, size, alpha, beta, k)
    rtol = forward_tol(x.dtype, beta)
    np.testing.assert_allclose(y, expected, rtol=rtol, atol=rtol * 1e-6 * np.abs(x).max())


def mirrored_window_sum(a, size):
    """sum of a over channels c in [j - (size-1)//2, j + size//2], for every j."""
    C = a.shape[1]
    out = np.zeros_like(a)
    for j in range(C):
        out[:, j] = a[:, max(0, j - (size - 1) // 2):min(C, j + size // 2 + 1)].sum(axis=1)
    return out


def check_backward(dx, x, dy, size, alpha, beta, k):
    """dx_j = dy_j s_j^-beta - coef x_j sum t_c: the error is judged against the
    size of its parts, |dy_j s_j^-beta| + coef |x_j| sum |t_c|."""
    expected = ref.local_response_norm_backward(x, dy, size, alpha, beta, k)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    s = ref._lrn_scale(x64, size, alpha, k)
    abs_t = np.abs(dy64 * x64) * s ** (-beta - 1)
    magnitude = (np.abs(dy64) * s ** -beta
                 + 2 * alpha * abs(beta) / size * np.abs(x64) * mirrored_window_sum(abs_t, size))
    rtol = 1e-12 if x.dtype == np.float64 else 4e-7 * (1 + abs(beta))
    err = np.abs(dx.astype(np.float64) - expected)
    assert np.all(err <= rtol * magnitude + 1e-300), float(np.max(err / (magnitude + 1e-300)))


def channels_last(a):
    """Same values, memory (N, *spatial, C)."""
    last = np.ascontiguousarray(np.moveaxis(a, 1, -1))
    return np.moveaxis(last, -1, 1)


# ============================================================== reference

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,size", CASES)
def test_forward_backward_match_reference(shape, size, dtype):
    x = make(shape, dtype)
    dy = make(shape, dtype, seed=1, scale=1.0)
    for alpha, beta, k in COEFFS:
        y = local_response_norm(x, size, alpha, beta, k)
        assert y.shape == x.shape and y.dtype == x.dtype
        check_forward(y, x, size, alpha, beta, k)
        dx = local_response_norm_backward(dy, x, size, alpha, beta, k)
        assert dx.shape == x.shape and dx.dtype == x.dtype
        check_backward(dx, x, dy, size, alpha, beta, k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.75, -0.5])
def test_other_betas(beta, dtype):
    x = make((3, 8, 7), dtype)
    dy = make((3, 8, 7), dtype, seed=1)
    check_forward(local_response_norm(x, 3, 0.1, beta, 1.0), x, 3, 0.1, beta, 1.0)
    check_backward(local_response_norm_backward(dy, x, 3, 0.1, beta, 1.0), x, dy, 3, 0.1, beta, 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_neighbour_does_not_spoil_other_windows(dtype):
    """A running sum (add the entering square, subtract the leaving one) keeps
    the rounding error of a huge square after it left the window; window sums
    without subtraction stay exact for the small channels next to it."""
    x = np.full((1, 12, 3), 1e-3, dtype)
    x[0, 2] = 1e18 if dtype == np.float32 else 1e150
    y = local_response_norm(x, 3, 1.0, 0.75, 0.0)
    check_forward(y, x, 3, 1.0, 0.75, 0.0)
    np.testing.assert_allclose(y[0, 5:11], (1e-6) ** -0.75 * 1e-3, rtol=forward_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_reaches_exactly_its_windows(dtype):
    x = make((2, 10, 6), dtype)
    x[1, 4, 2] = np.nan
    size = 4  # window of c: [c - 2, c + 1], so channel 4 is in the windows of c = 3..6
    y = local_response_norm(x, size)
    bad = np.zeros(x.shape, bool)
    bad[1, 3:7, 2] = True
    assert np.array_equal(np.isnan(y), bad)
    dx = local_response_norm_backward(np.ones_like(x), x, size)
    assert not np.isnan(dx[0]).any() and not np.isnan(dx[1, :, :2]).any()


# =================================================================== torch

@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def torch_forward_backward(torch, x, dy, size, alpha, beta, k):
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.local_response_norm(tx, size, alpha, beta, k)
    ty.backward(torch.tensor(dy))
    return ty.detach().numpy(), tx.grad.numpy()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,size", [((2, 7, 5), 5), ((2, 7, 5), 2), ((3, 1, 4, 4), 3),
                                        ((2, 13, 3, 4), 4), ((2, 4, 2, 3, 2), 7), ((5, 9, 1), 1)])
@pytest.mark.parametrize("coeffs", [(1e-4, 0.75, 1.0), (2.0, 2.5, 0.5)])
def test_matches_torch(shape, size, coeffs, dtype, torch):
    alpha, beta, k = coeffs
    x = make(shape, dtype)
    dy = make(shape, dtype, seed=1, scale=1.0)
    y_t, dx_t = torch_forward_backward(torch, x, dy, size, alpha, beta, k)
    rtol = 1e-12 if dtype == np.float64 else 2e-5
    y = local_response_norm(x, size, alpha, beta, k)
    np.testing.assert_allclose(y, y_t, rtol=rtol, atol=rtol * 1e-3)
    dx = local_response_norm_backward(dy, x, size, alpha, beta, k)
    scale = np.abs(dx_t).max()
    np.testing.assert_allclose(dx, dx_t, rtol=rtol, atol=rtol * scale)


def test_layer_matches_torch_channels_last(torch):
    x = make((2, 6, 5, 4), np.float32)
    dy = make((2, 6, 5, 4), np.float32, seed=1)
    tx = torch.tensor(x).to(memory_format=torch.channels_last).requires_grad_()
    module = torch.nn.LocalResponseNorm(3, alpha=0.3, beta=0.75, k=0.5)
    ty = module(tx)
    ty.backward(torch.tensor(dy))
    layer = fn.LocalResponseNorm(3, alpha=0.3, beta=0.75, k=0.5)
    xl = channels_last(x)
    y = layer(xl)
    dx = layer.backward(channels_last(dy))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=2e-5, atol=1e-6)
    assert repr(layer) == repr(module)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [0.0, 1.0])
@pytest.mark.parametrize("beta", [0.75, 1.5])
def test_zero_infinite_and_nan_scales_like_torch(k, beta, dtype, torch):
    """s = 0 (k = 0, zero window), s = inf (inf or overflowing squares), NaN."""
    x = np.zeros((2, 5, 19), dtype)
    x[0, 1, 1] = 2.0
    x[0, 0, 3] = np.inf
    x[0, 3, 9] = np.nan
    x[1, 2, 5] = 1e20 if dtype == np.float32 else 1e160
    x[1, :, 10:] = 0.5
    y = local_response_norm(x, 3, 1e-4, beta, k)
    y_t = torch.nn.functional.local_response_norm(torch.tensor(x), 3, 1e-4, beta, k).numpy()
    np.testing.assert_allclose(y, y_t, rtol=1e-5, atol=0, equal_nan=True)
    if k > 0:  # an overflowing window (s = inf) has zero gradient, not inf * 0 = NaN
        dx = local_response_norm_backward(np.ones_like(x), x, 3, 1e-4, beta, k)
        assert np.isfinite(dx[1, :, 5]).all()


def test_large_input_like_small_ones():
    """Large inputs are cut into tasks and rows differently from small ones
    (whole channel planes, prefetching); every element still gets exactly the
    arithmetic of a small call."""
    x = make((4, 16, 256, 257), np.float32)
    dy = make(x.shape, np.float32, seed=1)
    y = local_response_norm(x, 5)
    assert np.array_equal(y[1:2], local_response_norm(x[1:2], 5))
    dx = local_response_norm_backward(dy, x, 5)
    assert np.array_equal(dx[2:3], local_response_norm_backward(dy[2:3], x[2:3], 5))


@pytest.mark.parametrize("offset", [0, 1, 3, 6])
def test_streamed_output_like_plain(offset):
    """A float32 output (y, and the backward's dx) of STREAM_BYTES (16 MiB) and
    more is written with non-temporal stores, realigned in registers to every
    row's 32-byte boundaries (the rows of odd planes start at every offset), with
    plain stores at the rows' ends; one sample alone is small and written plainly.
    The values must be the same bit for bit, wherever out starts, and the
    NaN/inf clean-up must find them in a streamed row."""
    x = make((10, 16, 151, 181), np.float32)
    x[3, 7, 40, 11] = np.nan
    x[5, 2, 100, 3] = np.inf
    assert x.nbytes >= 16 << 20
    out = np.empty(x.size + 8, np.float32)[offset:offset + x.size].reshape(x.shape)
    local_response_norm(x, 5, out=out)
    dy = np.empty(x.size + 8, np.float32)[offset:offset + x.size].reshape(x.shape)
    dy[...] = make(x.shape, np.float32, seed=1)
    dx = local_response_norm_backward(dy, x, 5)
    for n in range(x.shape[0]):
        assert np.array_equal(out[n:n + 1], local_response_norm(x[n:n + 1], 5), equal_nan=True)
        assert np.array_equal(dx[n:n + 1], local_response_norm_backward(dy[n:n + 1], x[n:n + 1], 5),
                              equal_nan=True)


# ================================================================= layouts

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 7, 9), (3, 5, 4, 6), (2, 6, 3, 2, 4), (70, 3, 5, 5)])
def test_channels_last_in_place_and_kept(shape, dtype):
    x = make(shape, dtype)
    dy = make(shape, dtype, seed=1)
    xl, dyl = channels_last(x), channels_last(dy)
    assert not xl.flags.c_contiguous
    y = local_response_norm(xl, 4, 0.2, 0.75, 1.0)
    assert np.moveaxis(y, 1, -1).flags.c_contiguous
    np.testing.assert_allclose(y, local_response_norm(x, 4, 0.2, 0.75, 1.0),
                               rtol=forward_tol(dtype), atol=0)
    dx = local_response_norm_backward(dyl, xl, 4, 0.2, 0.75, 1.0)
    assert np.moveaxis(dx, 1, -1).flags.c_contiguous
    check_backward(dx, x, dy, 4, 0.2, 0.75, 1.0)


@pytest.mark.parametrize("dtype,size,beta", [(np.float32, 11, 0.75), (np.float32, 5, 0.6),
                                             (np.float64, 5, 0.75), (np.float64, 11, 0.75),
                                             (np.float32, 5, 0.75), (np.float32, 4, 0.75),
                                             (np.float32, 1, 0.75), (np.float32, 8, 0.75)])
def test_channels_last_bitwise_like_channels_first(dtype, size, beta):
    """Both layouts give every element exactly the same arithmetic. Float32 with beta =
    0.75 and size <= 8 takes the direct route: rows of channels in L1 for channels-last
    memory, strips of 8 positions walked down the channels for channels-first memory
    (40 x 41 positions: whole strips and a partial one). Otherwise channels-last rows go
    through transposed tiles, several per task (the next one prefetched while one is
    computed), a partial one at the end, into channels-first's van Herk blocks."""
    x = make((8, 13, 40, 41), dtype)
    dy = make(x.shape, dtype, seed=1)
    assert np.array_equal(local_response_norm(channels_last(x), size, 1e-4, beta),
                          local_response_norm(x, size, 1e-4, beta))
    assert np.array_equal(
        local_response_norm_backward(channels_last(dy), channels_last(x), size, 1e-4, beta),
        local_response_norm_backward(dy, x, size, 1e-4, beta))


@pytest.mark.parametrize("spatial", [(5, 7), (3, 9)])
@pytest.mark.parametrize("C", [1, 3, 8, 13, 17, 96])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6, 7, 8])
def test_direct_route(size, C, spatial):
    """float32 with beta = 0.75 and size <= 8 (the direct route): channels-last rows are
    computed on the rows themselves (window sums of neighbouring channels in a
    zero-padded scratch row, eight rows per pass), channels-first memory in strips of 8
    positions walked down the channels: channel counts below, at and between whole
    vectors, odd and even windows, partial row groups (3 * 5 * 7 rows) and partial strips
    (35 and 27 positions). Within float rounding of the reference, and the same bits in
    both layouts."""
    x = make((3, C) + spatial, np.float32)
    dy = make(x.shape, np.float32, seed=1, scale=1.0)
    for alpha, k in ((1e-4, 1.0), (2.0, 0.5)):
        y = local_response_norm(channels_last(x), size, alpha, 0.75, k)
        assert np.moveaxis(y, 1, -1).flags.c_contiguous
        check_forward(y, x, size, alpha, 0.75, k)
        y_first = local_response_norm(x, size, alpha, 0.75, k)
        check_forward(y_first, x, size, alpha, 0.75, k)
        assert np.array_equal(y, y_first)
        dx = local_response_norm_backward(channels_last(dy), channels_last(x), size, alpha,
                                          0.75, k)
        check_backward(dx, x, dy, size, alpha, 0.75, k)
        dx_first = local_response_norm_backward(dy, x, size, alpha, 0.75, k)
        check_backward(dx_first, x, dy, size, alpha, 0.75, k)
        assert np.array_equal(dx, dx_first)


@pytest.mark.parametrize("layout", ["first", "last"])
def test_nan_inf_and_zero_scales_in_either_layout(layout, torch):
    """The direct channels-last route's special values (NaN windows, s = 0 with k = 0,
    s = inf) match channels-first memory and torch."""
    x = np.zeros((2, 13, 19), np.float32)
    x[0, 1, 1] = 2.0
    x[0, 0, 3] = np.inf
    x[0, 12, 4] = np.inf
    x[0, 3, 9] = np.nan
    x[1, 2, 5] = 1e20
    x[1, :, 10:] = 0.5
    dy = np.ones_like(x)
    if layout == "last":  # (N, C, L) memory as (N, L, C): rows of 13 channels
        x = np.ascontiguousarray(x.transpose(0, 2, 1)).transpose(0, 2, 1)
        dy = np.ascontiguousarray(dy.transpose(0, 2, 1)).transpose(0, 2, 1)
    for k in (0.0, 1.0):
        y = local_response_norm(x, 3, 1e-4, 0.75, k)
        y_t = torch.nn.functional.local_response_norm(torch.tensor(np.ascontiguousarray(x)), 3,
                                                      1e-4, 0.75, k).numpy()
        np.testing.assert_allclose(y, y_t, rtol=1e-5, atol=0, equal_nan=True)
        dx = local_response_norm_backward(dy, x, 3, 1e-4, 0.75, k)
        dx_first = local_response_norm_backward(np.ascontiguousarray(dy), np.ascontiguousarray(x),
                                                3, 1e-4, 0.75, k)
        assert np.array_equal(dx, dx_first, equal_nan=True)
        assert np.array_equal(y, local_response_norm(np.ascontiguousarray(x), 3, 1e-4, 0.75, k),
                              equal_nan=True)
        if k > 0:  # an overflowing window (s = inf) has zero gradient, not inf * 0 = NaN
            assert np.isfinite(dx[1, :, 5]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_and_readonly_inputs(dtype):
    base = make((4, 6, 10, 8), dtype)
    x = base[::2, :, 1::3, ::2]
    assert not x.flags.c_contiguous
    dy = make(x.shape, dtype, seed=1)[:, :, :, :]
    x.flags.writeable = False
    y = local_response_norm(x, 3)
    assert y.flags.c_contiguous
    check_forward(y, x, 3, 1e-4, 0.75, 1.0)
    check_backward(local_response_norm_backward(dy[..., ::1], x, 3), x, dy, 3, 1e-4, 0.75, 1.0)


def test_out_argument():
    x = make((2, 5, 3, 4), np.float32)
    out = np.empty_like(x)
    assert local_response_norm(x, 3, out=out) is out
    np.testing.assert_array_equal(out, local_response_norm(x, 3))
    out_last = channels_last(np.empty_like(x))
    assert local_response_norm(channels_last(x), 3, out=out_last) is out_last
    np.testing.assert_array_equal(out_last, out)
    strided_out = np.empty((2, 5, 3, 8), np.float32)[..., ::2]
    assert local_response_norm(x, 3, out=strided_out) is strided_out
    np.testing.assert_array_equal(strided_out, out)


def test_empty_batch():
    x = np.empty((0, 4, 3, 3), np.float32)
    y = local_response_norm(x, 3)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert local_response_norm_backward(y, x, 3).shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["first", "last"])
@pytest.mark.parametrize("beta", [0.75, 0.6])
def test_bitwise_equal_for_any_thread_count(dtype, layout, beta):
    # over 3 * 32768 values, so that threads_for() really hands out 3 threads
    shape = (3, 7, 80, 60) if layout == "first" else (9, 7, 40, 40)
    x = make(shape, dtype)
    dy = make(shape, dtype, seed=1)
    if layout == "last":
        x, dy = channels_last(x), channels_last(dy)
    results = []
    for n in (1, 2, 3):
        with num_threads(n):
            results.append((local_response_norm(x, 5, 0.1, beta, 1.0),
                            local_response_norm_backward(dy, x, 5, 0.1, beta, 1.0)))
    for y, dx in results[1:]:
        assert np.array_equal(y, results[0][0])
        assert np.array_equal(dx, results[0][1])


# ================================================================== errors

def test_input_errors():
    x = make((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="at least 3 dimensions.*2-D"):
        local_response_norm(x[0], 3)
    with pytest.raises(TypeError, match="float32 or float64.*int64"):
        local_response_norm(np.ones((2, 3, 4), np.int64), 3)
    with pytest.raises(TypeError, match="numpy.ndarray"):
        local_response_norm([[[1.0]]], 3)
    with pytest.raises(ValueError, match="size must be at least 1.*0"):
        local_response_norm(x, 0)
    with pytest.raises(TypeError, match="size must be an int"):
        local_response_norm(x, 2.5)
    with pytest.raises(TypeError, match="alpha must be a real number"):
        local_response_norm(x, 3, alpha="big")
    with pytest.raises(ValueError, match="shape"):
        local_response_norm(x, 3, out=np.empty((2, 3, 5), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        local_response_norm(x, 3, out=np.empty_like(x, dtype=np.float64))
    with pytest.raises(ValueError, match="grad_output.*shape"):
        local_response_norm_backward(np.ones((2, 3, 5), np.float32), x, 3)
    with pytest.raises(TypeError, match="grad_output has dtype float64"):
        local_response_norm_backward(x.astype(np.float64), x, 3)


def test_layer_construction_and_state():
    with pytest.raises(ValueError, match="size"):
        fn.LocalResponseNorm(0)
    with pytest.raises(TypeError, match="size"):
        fn.LocalResponseNorm(None)
    layer = fn.LocalResponseNorm(4, alpha=0.5, beta=1.5, k=2.0)
    assert (layer.size, layer.alpha, layer.beta, layer.k) == (4, 0.5, 1.5, 2.0)
    assert layer.parameters() == [] and list(layer.named_parameters()) == []
    assert layer.state_dict() == {}
    layer.load_state_dict({})
    assert layer.training and not hasattr(layer, "dtype")
    assert layer.eval() is layer and not layer.training


def test_layer_forward_backward_and_rejected_calls():
    layer = fn.LocalResponseNorm(3, alpha=0.2)
    with pytest.raises(RuntimeError, match="before any forward"):
        layer.backward(np.ones((1, 2, 3), np.float32))
    x = make((2, 5, 6), np.float64)
    dy = make((2, 5, 6), np.float64, seed=1)
    y = layer(x)
    check_forward(y, x, 3, 0.2, 0.75, 1.0)
    # rejected calls change nothing: backward still refers to x
    with pytest.raises(ValueError):
        layer(x[0])
    with pytest.raises(TypeError):
        layer(x.astype(np.int32))
    with pytest.raises(ValueError):
        layer.backward(dy[:, :4])
    dx = layer.backward(dy)
    check_backward(dx, x, dy, 3, 0.2, 0.75, 1.0)
    assert layer.grads == {}
    # a strided input is copied once and kept for backward
    xs = make((2, 5, 12), np.float64)[:, :, ::2]
    layer(xs)
    check_backward(layer.backward(dy), xs, dy, 3, 0.2, 0.75, 1.0)
