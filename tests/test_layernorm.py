"""LayerNorm and functional.layer_norm against the float64 reference and torch."""
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

# (input shape, normalized_shape): 1, 2 and 3 normalized dims, 1s and primes
CASES = [
    ((2, 3, 5), (5,)),
    ((4, 1), (1,)),
    ((13,), (13,)),
    ((3, 7, 11), (7, 11)),
    ((2, 3, 4, 5), (3, 4, 5)),
    ((1, 1, 1), (1, 1)),
    ((5, 2, 97), (97,)),
    ((2, 4099), (4099,)),          # rows longer than one unit
]


def layouts_for(shape):
    return ("contiguous", "strided") + (("channels_last",) if len(shape) >= 3 else ())


def case_params():
    for shape, ns in CASES:
        for layout in layouts_for(shape):
            for dtype in DTYPES:
                case_id = f"{'x'.join(map(str, shape))}-{len(ns)}d-{layout}-{np.dtype(dtype).name}"
                yield pytest.param(shape, ns, layout, dtype, id=case_id)


@pytest.mark.smoke
@pytest.mark.parametrize("shape, ns, layout, dtype", list(case_params()))
@pytest.mark.parametrize("affine, bias", [(True, True), (True, False), (False, False)])
def test_forward_backward_match_reference(shape, ns, layout, dtype, affine, bias):
    layer = fn.LayerNorm(ns, elementwise_affine=affine, bias=bias, dtype=dtype)
    randomize_parameters(layer)
    x = make_input(shape, dtype, layout, seed=3, mean=2.0, std=3.0)
    dy = make_input(shape, dtype, layout, seed=4)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, ref.layer_norm_forward(x, ns, layer.weight, layer.bias, layer.eps), dtype, "y")
    dx = layer.backward(dy)
    gx, gw, gb = ref.layer_norm_backward(x, dy, ns, layer.weight, layer.eps)
    assert_close(dx, gx, dtype, "grad_input")
    assert set(layer.grads) == {name for name, _ in layer.named_parameters()}
    if affine:
        assert_close(layer.grads["weight"], gw, dtype, "grad_weight", scale=10)
        assert layer.grads["weight"].shape == ns and layer.grads["weight"].dtype == dtype
    if bias:
        assert_close(layer.grads["bias"], gb, dtype, "grad_bias", scale=10)


@pytest.mark.parametrize("shape, ns", CASES[:5])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_torch_module(shape, ns, bias):
    torch = torch_or_skip()
    layer = fn.LayerNorm(ns, eps=1e-4, bias=bias, dtype=np.float64)
    randomize_parameters(layer)
    module = torch_twin(torch, layer, torch.nn.LayerNorm, ns, eps=1e-4, bias=bias)
    x = make_input(shape, np.float64, seed=5, mean=-1.0, std=2.0)
    dy = make_input(shape, np.float64, seed=6)
    y, gx, grads = run_torch(torch, module, x, dy)
    np.testing.assert_allclose(layer(x), y, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(layer.backward(dy), gx, rtol=1e-10, atol=1e-10)
    for name, grad in grads.items():
        np.testing.assert_allclose(layer.grads[name], grad, rtol=1e-10, atol=1e-10)


def test_float32_matches_torch_float32():
    torch = torch_or_skip()
    x = make_input((6, 33), np.float32, seed=7)
    w = make_input((33,), np.float32, seed=8)
    b = make_input((33,), np.float32, seed=9)
    expected = torch.nn.functional.layer_norm(torch.tensor(x), (33,), torch.tensor(w),
                                              torch.tensor(b)).numpy()
    np.testing.assert_allclose(F.layer_norm(x, (33,), w, b), expected, rtol=1e-5, atol=1e-5)


def test_functional_forms_and_backward_entry_point():
    x = make_input((3, 4, 5), np.float64, seed=10)
    dy = make_input((3, 4, 5), np.float64, seed=11)
    w = make_input((4, 5), np.float64, seed=12)
    b = make_input((4, 5), np.float64, seed=13)
    y, mean, rstd = F.native_layer_norm(x, [4, 5], w, b, 1e-3)
    assert mean.shape == rstd.shape == (3,) and mean.dtype == np.float64
    np.testing.assert_allclose(F.layer_norm(x, (4, 5), w, b, 1e-3), y)
    np.testing.assert_allclose(y, ref.layer_norm_forward(x, (4, 5), w, b, 1e-3), atol=1e-12)
    np.testing.assert_allclose(mean, x.reshape(3, -1).mean(axis=1), atol=1e-14)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(x.reshape(3, -1).var(axis=1) + 1e-3), atol=1e-12)
    got = F.layer_norm_backward(dy, x, (4, 5), mean, rstd, w)
    for a, e in zip(got, ref.layer_norm_backward(x, dy, (4, 5), w, 1e-3)):
        np.testing.assert_allclose(a, e, atol=1e-12)
    # an int (or any sequence) as normalized_shape, no parameters
    np.testing.assert_allclose(F.layer_norm(x, 5), ref.layer_norm_forward(x, 5), atol=1e-12)
    np.testing.assert_allclose(F.layer_norm(x, np.array([4, 5])),
                               ref.layer_norm_forward(x, (4, 5)), atol=1e-12)
    with pytest.raises(TypeError, match="normalized_shape"):
        F.layer_norm(x, 5.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hard_data_far_from_zero(dtype):
    """Mean 1e4, std 1: within 1e-5 of the float64 reference, forward and backward."""
    x = make_input((8, 300), dtype, seed=14, mean=1e4, std=1.0)
    dy = make_input((8, 300), dtype, seed=15)
    layer = fn.LayerNorm(300, dtype=dtype)
    randomize_parameters(layer)
    y = layer(x)
    dx = layer.backward(dy)
    assert np.abs(y - ref.layer_norm_forward(x, 300, layer.weight, layer.bias)).max() <= 1e-5
    gx, gw, gb = ref.layer_norm_backward(x, dy, 300, layer.weight)
    assert np.abs(dx - gx).max() <= 1e-5
    assert np.abs(layer.grads["weight"] - gw).max() <= 1e-5 * np.abs(gw).max() + 1e-5
    assert np.abs(layer.grads["bias"] - gb).max() <= 1e-5 * np.abs(gb).max() + 1e-5


# at least 3 * 32768 values, so that 3 threads are really used (see threads_for)
@pytest.mark.parametrize("shape", [(1, 1024), (400, 300), (403, 500), (3, 8 * 4096 + 7),
                                   (1, 25 * 4096 + 3), (70, 4097)])
def test_bitwise_identical_for_any_thread_count(shape):
    """By-row and by-unit strategies, row blocks of the weight gradient, rows dx'ed one by
    one (300, 500: see row_by_row in _rows.pxi; blocks of any row count, so the partials'
    groups end mid-block) or in groups: same bits."""
    x = make_input(shape, np.float32, seed=16, mean=3.0)
    dy = make_input(shape, np.float32, seed=17)
    layer = fn.LayerNorm(shape[-1])
    randomize_parameters(layer)

    def run():
        y = layer(x)
        dx = layer.backward(dy)
        return y, dx, layer.grads["weight"], layer.grads["bias"]

    assert_bitwise_equal(results_for_thread_counts(run))


def test_nan_poisons_only_its_row():
    x = make_input((4, 10), np.float32, seed=18)
    x[2, 3] = np.nan
    y = fn.LayerNorm(10)(x)
    assert np.isnan(y[2]).all() and np.isfinite(np.delete(y, 2, axis=0)).all()


def test_constant_row_gives_bias():
    layer = fn.LayerNorm(6)
    layer.bias[...] = np.arange(6)
    y = layer(np.full((2, 6), 7.5, np.float32))
    assert np.array_equal(y, np.broadcast_to(layer.bias, (2, 6)))


def test_out_argument_and_read_only_input():
    x = make_input((3, 8), np.float32, seed=19)
    x.flags.writeable = False
    expected = fn.LayerNorm(8)(x)
    out = np.empty_like(x)
    assert fn.LayerNorm(8)(x, out=out) is out
    np.testing.assert_array_equal(out, expected)
    strided_out = np.empty((3, 16), np.float32)[:, ::2]
    assert F.layer_norm(x, 8, out=strided_out) is strided_out
    np.testing.assert_array_equal(strided_out, expected)


def test_empty_batch():
    layer = fn.LayerNorm((2, 3))
    x = np.empty((0, 2, 3), np.float32)
    y = layer(x)
    assert y.shape == (0, 2, 3)
    dx = layer.backward(np.empty((0, 2, 3), np.float32))
    assert dx.shape == (0, 2, 3)
    assert np.array_equal(layer.grads["weight"], np.zeros((2, 3), np.float32))


BAD_INPUTS = [
    ("trailing shape", lambda: np.zeros((2, 4, 6), np.float32), ValueError, r"dims \[2\] differ"),
    ("rank", lambda: np.zeros((5,), np.float32), ValueError, "at least 2 dims"),
    ("int dtype", lambda: np.zeros((2, 4, 5), np.int32), TypeError, "float32 or float64"),
    ("dtype mismatch", lambda: np.zeros((2, 4, 5), np.float64), TypeError,
     "float32.*float64|float64.*float32"),
    ("not an array", lambda: [[0.0] * 5] * 4, TypeError, "numpy.ndarray"),
]


@pytest.mark.parametrize("name, make, error, match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_before_any_state_change(name, make, error, match):
    assert_rejected_unchanged(fn.LayerNorm((4, 5)), make_input((2, 4, 5), np.float32), make(),
                              error, match)


def test_bad_arguments():
    x = make_input((2, 5), np.float32)
    with pytest.raises(ValueError, match="out must have"):
        fn.LayerNorm(5)(x, out=np.empty((2, 4), np.float32))
    with pytest.raises(ValueError, match="weight must have shape"):
        F.layer_norm(x, 5, weight=np.ones(4, np.float32))
    with pytest.raises(ValueError, match="eps"):
        fn.LayerNorm(5, eps=-1)
    with pytest.raises(RuntimeError, match="before any forward"):
        fn.LayerNorm(5).backward(x)
    layer = fn.LayerNorm(5)
    layer(x)
    with pytest.raises(ValueError, match="grad_output must have"):
        layer.backward(np.zeros((3, 5), np.float32))
    with pytest.raises(TypeError, match="grad_output"):
        layer.backward(np.zeros((2, 5), np.float64))
    with pytest.raises(ValueError, match="rstd"):
        F.layer_norm_backward(x, x, 5, np.zeros(2), np.zeros(3))


def test_state_dict_round_trip_with_torch():
    torch = torch_or_skip()
    module = torch.nn.LayerNorm((3, 4))
    with torch.no_grad():
        module.weight.uniform_()
        module.bias.uniform_()
    layer = fn.LayerNorm((3, 4))
    layer.load_state_dict({k: v.numpy() for k, v in module.state_dict().items()})
    assert layer.state_dict().keys() == module.state_dict().keys()
    for name, value in layer.state_dict().items():
        assert np.array_equal(value, module.state_dict()[name].numpy())
    assert fn.LayerNorm(3, bias=False).state_dict().keys() == {"weight"}
    assert fn.LayerNorm(3, elementwise_affine=False).state_dict() == {}


@pytest.mark.parametrize("shape", [(4100, 1024), (4100, 1028), (16400, 256), (32300, 130),
                                   (65600, 64)])
def test_large_output_written_with_streaming_stores_is_bitwise_the_same(shape):
    """Outputs of 16 MiB and more take the non-temporal store path: same values. Rows of
    1028 or 130 floats end in part of a vector and start at any alignment (those of 130
    stay plain: shorter than STREAM_SPLIT_RUN_BYTES, not whole lines); rows of 64
    (shorter than STREAM_ROW_BYTES) stay plain."""
    x = make_input(shape, np.float32, seed=20)
    layer = fn.LayerNorm(shape[1])
    randomize_parameters(layer)
    big = layer(x)
    assert np.array_equal(big[:7], layer(x[:7]))
    assert np.array_equal(big[-5:], layer(x[-5:]))


@pytest.mark.parametrize("dtype, shape", [(np.float32, (4100, 768)), (np.float32, (6100, 520)),
                                          (np.float64, (3100, 520)), (np.float64, (1600, 1031))])
@pytest.mark.parametrize("offset", [1, 3])
def test_streamed_output_into_misaligned_out_is_bitwise_the_same(dtype, shape, offset):
    """An out= that starts off a cache line (here 1 or 3 values off) still takes the
    streamed path for rows of 2 KiB and more (STREAM_SPLIT_RUN_BYTES), streaming only
    each row's whole lines: the same values as a few rows alone, written plainly."""
    x = make_input(shape, dtype, seed=21)
    layer = fn.LayerNorm(shape[1], dtype=dtype)
    randomize_parameters(layer)
    flat = np.empty(x.size + 64, dtype)
    skip = (-flat.__array_interface__["data"][0] % 64) // flat.itemsize + offset
    out = flat[skip:skip + x.size].reshape(shape)
    assert layer(x, out=out) is out
    assert np.array_equal(out[:7], layer(x[:7]))
    assert np.array_equal(out[1000:1013], layer(x[1000:1013]))
    assert np.array_equal(out[-5:], layer(x[-5:]))


@pytest.mark.parametrize("cls", [fn.LayerNorm, fn.RMSNorm])
def test_streamed_short_row_backward_is_bitwise_the_plain_one(cls):
    """A dx of 10 MiB and more in rows of 64 floats (one line of 256 bytes each) is
    streamed when it starts on a line, as the layers' large outputs do; a few rows alone
    are written plainly: same dx, and their weight gradients from the same sums."""
    x = make_input((41000, 64), np.float32, seed=24, mean=5.0)
    dy = make_input((41000, 64), np.float32, seed=25)
    layer = cls(64)
    randomize_parameters(layer)
    layer(x)
    dx = layer.backward(dy)
    assert dx.__array_interface__["data"][0] % 64 == 0
    for part in (slice(0, 8), slice(16, 37), slice(40992, None)):
        small = cls(64)
        small.load_state_dict(layer.state_dict())
        small(x[part])
        assert np.array_equal(small.backward(dy[part]), dx[part])


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_streamed_activation_output_is_bitwise_the_same(activation):
    """A fused activation's streamed output (formed in a scratch, then copied out) equals
    the plain one: rows of 1028 floats start at either 32-byte alignment and end in half
    a vector."""
    x = make_input((4100, 1028), np.float32, seed=23)
    layer = fn.LayerNorm(1028, activation=activation)
    randomize_parameters(layer)
    big = layer(x)
    assert np.array_equal(big[:7], layer(x[:7]))
    assert np.array_equal(big[-5:], layer(x[-5:]))


@pytest.mark.parametrize("shape", [(2100, 1024), (8200, 256), (8200, 257), (16400, 128)])
def test_streamed_residual_output_is_bitwise_the_plain_one(shape):
    """With a residual, h and y together (16.4 MiB) make y stream, from rows of 512 bytes
    on when they are whole lines (streams_runs), and rows of 1-8 KiB stream h too
    (forward_row_streamed_h); rows of 257 floats stay plain; y alone (8.2 MiB) is not
    streamed: h is x + r and y of the fused call equals the plain call on h, bit for bit."""
    x = make_input(shape, np.float32, seed=30)
    r = make_input(shape, np.float32, seed=31)
    layer = fn.LayerNorm(shape[1])
    randomize_parameters(layer)
    y, h = layer(x, residual=r)
    assert np.array_equal(h, x + r)
    assert np.array_equal(y, layer(h))


@pytest.mark.parametrize("cls", [fn.LayerNorm, fn.RMSNorm])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [1, 7, 32, 64, 96, 383, 384, 385])
def test_short_rows_route_matches_general_route(cls, dtype, size):
    """Rows of at most 384 values without fusion take the short-rows kernels; with a
    residual and grad_h (here zeros: h == x, dx + 0 == dx) the same rows take the
    general per-row path. Both routes do the same arithmetic: outputs and every
    gradient bitwise equal, on either side of the limit, for centered (far from
    zero) and RMS rows."""
    x = make_input((37, size), dtype, seed=size, mean=1e3)
    dy = make_input((37, size), dtype, seed=size + 1)
    short, general = cls(size, dtype=dtype), cls(size, dtype=dtype)
    randomize_parameters(short)
    general.load_state_dict(short.state_dict())
    y_general, h = general(x, residual=np.zeros_like(x))
    assert np.array_equal(h, x)
    assert np.array_equal(short(x), y_general)
    assert np.array_equal(short.backward(dy), general.backward(dy, grad_h=np.zeros_like(dy)))
    for key in short.grads:
        assert np.array_equal(short.grads[key], general.grads[key])


def _placed(a, offset):
    """A copy of a whose data starts `offset` bytes into a 4 KiB page."""
    buf = np.empty(a.nbytes + 8192, np.uint8)
    start = (-buf.ctypes.data) % 4096 + offset
    out = buf[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


@pytest.mark.parametrize("cls, dtype, rows, size, activation", [
    (fn.LayerNorm, np.float32, 37, 1024, None),     # one page per row
    (fn.LayerNorm, np.float64, 37, 1024, None),     # two pages
    (fn.RMSNorm, np.float32, 37, 2048, None),
    (fn.LayerNorm, np.float32, 37, 1024, "silu"),   # the dx pass reads g from dx
    (fn.LayerNorm, np.float32, 2600, 1024, None),   # dx streamed, next rows prefetched
])
def test_row_route_by_page_offset_is_bitwise_the_same(cls, dtype, rows, size, activation):
    """Rows of whole pages at every placement of x and dy (modulo 4 KiB, where the
    kernels' speed depends on it, backward_block in _rows.pxi): same dx and parameter
    gradients whatever the placement."""
    x = make_input((rows, size), dtype, seed=size, mean=50.0)
    dy = make_input((rows, size), dtype, seed=size + 3)
    results = []
    for x_at, dy_at in ((16, 16), (2048, 2048), (16, 1040), (2048, 0)):
        layer = cls(size, activation=activation, dtype=dtype)
        randomize_parameters(layer, seed=5)
        layer(_placed(x, x_at))
        dx = layer.backward(_placed(dy, dy_at))
        results.append((dx, *(layer.grads[k] for k in sorted(layer.grads))))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(a, b)
