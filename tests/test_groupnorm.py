"""GroupNorm and functional.group_norm against the float64 reference and torch."""
import numpy as np
import pytest

import fastnorm as fn
from fastnorm import functional as F
from helpers import is_channels_last, make_input, torch_or_skip
from rows_testing import (
    assert_bitwise_equal, assert_close, assert_rejected_unchanged, randomize_parameters,
    results_for_thread_counts, run_torch, torch_twin,
)
import reference as ref

DTYPES = (np.float32, np.float64)

# (input shape, groups): groups of 1, C and in between; 1s and primes
CASES = [
    ((2, 6, 5, 7), 1),
    ((2, 6, 5, 7), 3),
    ((2, 6, 5, 7), 6),
    ((3, 4), 2),
    ((1, 4, 1, 1), 2),
    ((3, 10, 7), 5),
    ((2, 7, 3, 11), 7),
    ((2, 4, 2, 3, 5), 2),
    ((1, 2, 4099), 1),           # a row longer than one unit
    ((1, 6, 2, 4099), 3),        # runs longer than one unit
    ((2, 300, 9, 7), 10),        # channels-last rows of 1 KiB and more: the column sums'
                                 # register tiles (FN_COLUMN_TILE), 12 channels left over
]


def case_params():
    for shape, groups in CASES:
        layouts = ("contiguous", "strided") + (("channels_last",) if len(shape) >= 3 else ())
        for layout in layouts:
            for dtype in DTYPES:
                case_id = f"{'x'.join(map(str, shape))}-G{groups}-{layout}-{np.dtype(dtype).name}"
                yield pytest.param(shape, groups, layout, dtype, id=case_id)


@pytest.mark.smoke
@pytest.mark.parametrize("shape, groups, layout, dtype", list(case_params()))
def test_forward_backward_match_reference(shape, groups, layout, dtype):
    C = shape[1]
    layer = fn.GroupNorm(groups, C, dtype=dtype)
    randomize_parameters(layer)
    x = make_input(shape, dtype, layout, seed=3, mean=1.5, std=2.0)
    dy = make_input(shape, dtype, layout, seed=4)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    if layout == "channels_last":
        assert is_channels_last(y)
    expected = ref.group_norm_forward(x, groups, layer.weight, layer.bias, layer.eps)
    assert_close(y, expected, dtype, "y")
    dx = layer.backward(dy)
    if layout == "channels_last":
        assert is_channels_last(dx)
    gx, gw, gb = ref.group_norm_backward(x, dy, groups, layer.weight, layer.eps)
    assert_close(dx, gx, dtype, "grad_input")
    assert_close(layer.grads["weight"], gw, dtype, "grad_weight", scale=10)
    assert_close(layer.grads["bias"], gb, dtype, "grad_bias", scale=10)


@pytest.mark.parametrize("shape, groups", CASES[:8])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_torch_module(shape, groups, layout):
    torch = torch_or_skip()
    if layout == "channels_last" and len(shape) < 3:
        pytest.skip("channels-last needs spatial dims")
    C = shape[1]
    layer = fn.GroupNorm(groups, C, eps=1e-4, dtype=np.float64)
    randomize_parameters(layer)
    module = torch_twin(torch, layer, torch.nn.GroupNorm, groups, C, eps=1e-4)
    x = make_input(shape, np.float64, layout, seed=5, mean=-1.0, std=2.0)
    dy = make_input(shape, np.float64, layout, seed=6)
    y, gx, grads = run_torch(torch, module, x, dy)
    np.testing.assert_allclose(layer(x), y, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(layer.backward(dy), gx, rtol=1e-10, atol=1e-10)
    for name, grad in grads.items():
        np.testing.assert_allclose(layer.grads[name], grad, rtol=1e-10, atol=1e-10)


def test_without_affine_and_mixed_grad_layout():
    x = make_input((2, 4, 3, 5), np.float32, "channels_last", seed=7)
    dy = make_input((2, 4, 3, 5), np.float32, "contiguous", seed=8)
    layer = fn.GroupNorm(2, 4, affine=False)
    y = layer(x)
    assert layer.weight is None and layer.parameters() == []
    assert_close(y, ref.group_norm_forward(x, 2), np.float32)
    dx = layer.backward(dy)
    assert_close(dx, ref.group_norm_backward(x, dy, 2)[0], np.float32)
    assert layer.grads == {}


def test_functional_forms_and_backward_entry_point():
    x = make_input((3, 6, 4, 5), np.float64, seed=10)
    dy = make_input((3, 6, 4, 5), np.float64, seed=11)
    w = make_input((6,), np.float64, seed=12)
    b = make_input((6,), np.float64, seed=13)
    y, mean, rstd = F.native_group_norm(x, 2, w, b, 1e-3)
    assert mean.shape == rstd.shape == (3, 2)
    np.testing.assert_allclose(F.group_norm(x, 2, w, b, 1e-3), y)
    np.testing.assert_allclose(y, ref.group_norm_forward(x, 2, w, b, 1e-3), atol=1e-12)
    grouped = x.reshape(3, 2, -1)
    np.testing.assert_allclose(mean, grouped.mean(axis=2), atol=1e-14)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(grouped.var(axis=2) + 1e-3), atol=1e-12)
    got = F.group_norm_backward(dy, x, 2, mean, rstd, w)
    for a, e in zip(got, ref.group_norm_backward(x, dy, 2, w, 1e-3)):
        np.testing.assert_allclose(a, e, atol=1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_hard_data_far_from_zero(layout, dtype):
    x = make_input((2, 8, 9, 10), dtype, layout, seed=14, mean=1e4, std=1.0)
    dy = make_input((2, 8, 9, 10), dtype, layout, seed=15)
    layer = fn.GroupNorm(4, 8, dtype=dtype)
    randomize_parameters(layer)
    y = layer(x)
    dx = layer.backward(dy)
    assert np.abs(y - ref.group_norm_forward(x, 4, layer.weight, layer.bias)).max() <= 1e-5
    gx, gw, gb = ref.group_norm_backward(x, dy, 4, layer.weight)
    assert np.abs(dx - gx).max() <= 1e-5
    assert np.abs(layer.grads["weight"] - gw).max() <= 1e-5 * np.abs(gw).max() + 1e-5
    assert np.abs(layer.grads["bias"] - gb).max() <= 1e-5 * np.abs(gb).max() + 1e-5


@pytest.mark.parametrize("shape, groups, layout", [
    ((4, 32, 32, 32), 8, "contiguous"),           # >= 3 * 32768 values: 3 threads used
    ((1, 2, 50003), 1, "contiguous"),             # few long rows: split by unit
    ((1, 6, 3, 6007), 3, "contiguous"),           # runs longer than a unit
    ((64, 8, 15, 15), 4, "contiguous"),           # many short rows
    ((3, 24, 41, 37), 6, "channels_last"),       # threads take whole samples
    ((1, 24, 71, 67), 6, "channels_last"),        # one sample: its kernels in parallel
    ((3, 300, 11, 13), 10, "channels_last"),      # column sums in register tiles
])
def test_bitwise_identical_for_any_thread_count(shape, groups, layout):
    x = make_input(shape, np.float32, layout, seed=16, mean=2.0)
    dy = make_input(shape, np.float32, layout, seed=17)
    layer = fn.GroupNorm(groups, shape[1])
    randomize_parameters(layer)

    def run():
        y = layer(x)
        return y, layer.backward(dy), layer.grads["weight"], layer.grads["bias"]

    assert_bitwise_equal(results_for_thread_counts(run))


def test_nan_poisons_only_its_group():
    x = make_input((2, 4, 3, 3), np.float32, seed=18)
    x[1, 2, 0, 0] = np.nan
    y = fn.GroupNorm(2, 4)(x)
    assert np.isnan(y[1, 2:]).all()
    assert np.isfinite(y[0]).all() and np.isfinite(y[1, :2]).all()


def test_out_read_only_and_empty_batch():
    x = make_input((2, 4, 3, 3), np.float32, "channels_last", seed=19)
    x.flags.writeable = False
    expected = fn.GroupNorm(2, 4)(x)
    out = np.empty((2, 4, 3, 3), np.float32)          # contiguous out for a channels-last input
    assert F.group_norm(x, 2, out=out) is out
    np.testing.assert_array_equal(out, expected)
    layer = fn.GroupNorm(2, 4)
    assert layer(np.empty((0, 4, 3), np.float32)).shape == (0, 4, 3)
    assert layer.backward(np.empty((0, 4, 3), np.float32)).shape == (0, 4, 3)
    assert np.array_equal(layer.grads["bias"], np.zeros(4, np.float32))


@pytest.mark.parametrize("bad, error, match", [
    (np.zeros((2, 5, 3), np.float32), ValueError, "expected 4 channels"),
    (np.zeros((4,), np.float32), ValueError, r"\(N, C, \*\)"),
    (np.zeros((2, 4, 3), np.int64), TypeError, "float32 or float64"),
    (np.zeros((2, 4, 3), np.float64), TypeError, "dtype"),
])
def test_bad_input_raises_before_any_state_change(bad, error, match):
    assert_rejected_unchanged(fn.GroupNorm(2, 4), make_input((2, 4, 3), np.float32), bad, error,
                              match)


def test_groups_must_divide_channels():
    with pytest.raises(ValueError, match="divisible"):
        fn.GroupNorm(3, 4)
    with pytest.raises(ValueError, match="num_groups"):
        fn.GroupNorm(0, 4)
    with pytest.raises(ValueError, match="eps"):
        fn.GroupNorm(2, 4, eps=-1)
    with pytest.raises(ValueError, match="divisible"):
        F.group_norm(np.zeros((2, 4, 3), np.float32), 3)
    with pytest.raises(ValueError, match="weight must have shape"):
        F.group_norm(np.zeros((2, 4, 3), np.float32), 2, weight=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="rstd"):
        x = np.zeros((2, 4, 3), np.float32)
        F.group_norm_backward(x, x, 2, np.zeros((2, 2)), np.zeros(3))


def test_state_dict_round_trip_with_torch():
    torch = torch_or_skip()
    module = torch.nn.GroupNorm(2, 4)
    with torch.no_grad():
        module.weight.uniform_()
    layer = fn.GroupNorm(2, 4)
    layer.load_state_dict({k: v.numpy() for k, v in module.state_dict().items()})
    assert layer.state_dict().keys() == module.state_dict().keys()
    assert np.array_equal(layer.weight, module.weight.detach().numpy())


@pytest.mark.parametrize("layout, shape", [("contiguous", (9, 64, 96, 77)),
                                           ("channels_last", (9, 64, 96, 77)),
                                           ("contiguous", (88, 64, 28, 28))])
def test_large_output_written_with_streaming_stores_is_bitwise_the_same(layout, shape):
    """17 MiB outputs are streamed (channels-last: by the total size, though each
    sample's slab is 2 MiB; runs of 28 * 28 floats, whole lines, from STREAM_ROW_BYTES);
    one sample alone is written with plain stores."""
    x = make_input(shape, np.float32, layout, seed=21)      # 17 MiB
    layer = fn.GroupNorm(8, 64)
    randomize_parameters(layer)
    big = layer(x)
    assert np.array_equal(big[3:4], layer(x[3:4]))


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu"])
@pytest.mark.parametrize("layout, shape", [("contiguous", (9, 64, 96, 77)),
                                           ("contiguous", (17, 128, 33, 61)),
                                           ("channels_last", (9, 64, 96, 77)),
                                           ("channels_last", (3, 640, 48, 48))])
def test_streamed_activation_output_is_bitwise_the_plain_one(layout, shape, activation):
    """With a fused activation, a streamed output is formed in an L1 scratch placed at
    its line offset, then copied out (fn_stream_copy): the same bits as one sample
    alone, written in place with plain stores. Runs of 7392 values make units of 4096
    and 3296; runs of 2013 values, units of two whole runs. Channels-last rows of 64
    floats go four to a chunk (rows_act_streamed); rows of 640, in pieces of 256, 256
    and 128."""
    x = make_input(shape, np.float32, layout, seed=22)
    layer = fn.GroupNorm(8, shape[1], activation=activation)
    randomize_parameters(layer)
    big = layer(x)
    for n in (0, 3, shape[0] - 1):
        assert np.array_equal(big[n:n + 1], layer(x[n:n + 1]))


@pytest.mark.parametrize("cls, layout, shape", [
    ("GroupNorm", "contiguous", (8, 128, 41, 100)),          # 16.02 MiB of float32 per array
    ("InstanceNorm2d", "contiguous", (8, 128, 41, 100)),
    ("GroupNorm", "channels_last", (8, 128, 41, 100)),       # rows of 512 bytes: streamed
    ("GroupNorm", "channels_last", (8, 66, 80, 100)),        # rows of 264 bytes: plain
])
def test_streamed_backward_matches_cached(cls, layout, shape):
    """A per-channel backward whose dx reaches 16 MiB writes it with non-temporal
    stores: every sample's dx is bitwise what the sample alone gives, a small pass with
    plain stores. Runs of 41 * 100 values start at either 32-byte alignment and end in
    half a vector; channels-last rows are streamed when they are whole 16-byte pieces."""
    x = make_input(shape, np.float32, layout, seed=11, mean=3.0)
    dy = make_input(shape, np.float32, layout, seed=12)
    C = shape[1]
    if cls == "GroupNorm":
        groups = 2 if C % 32 else 32
        big, small = fn.GroupNorm(groups, C), fn.GroupNorm(groups, C)
    else:
        big, small = fn.InstanceNorm2d(C, affine=True), fn.InstanceNorm2d(C, affine=True)
    randomize_parameters(big)
    small.load_state_dict(big.state_dict())
    big(x)
    dx = big.backward(dy)
    for n in (1, 6):
        small(x[n:n + 1])
        assert np.array_equal(small.backward(dy[n:n + 1]), dx[n:n + 1])
