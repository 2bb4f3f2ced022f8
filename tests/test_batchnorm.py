"""BatchNorm1d/2d/3d and functional.batch_norm against the float64 reference and torch."""
import numpy as np
import pytest

import fastnorm as fn
from fastnorm import functional as F
from fastnorm._kernels import kernels
from helpers import is_channels_last, make_input, num_threads, tolerance, torch_or_skip
import reference as ref

DTYPES = (np.float32, np.float64)

# (layer class, input shape): awkward sizes on purpose (1s, primes, N=2, S=1).
CASES = [
    (fn.BatchNorm1d, (2, 3)),
    (fn.BatchNorm1d, (7, 1)),
    (fn.BatchNorm1d, (5, 13, 11)),
    (fn.BatchNorm1d, (2, 4, 1)),
    (fn.BatchNorm1d, (97, 5)),
    (fn.BatchNorm2d, (2, 3, 5, 7)),
    (fn.BatchNorm2d, (3, 1, 4, 4)),
    (fn.BatchNorm2d, (2, 17, 1, 1)),
    (fn.BatchNorm2d, (4, 6, 9, 1)),
    (fn.BatchNorm3d, (2, 3, 2, 3, 5)),
    (fn.BatchNorm1d, (8, 3, 2100)),   # float32 runs of 8400 bytes: fused per channel (use_runs)
]
CASE_IDS = [f"{cls.__name__}-{'x'.join(map(str, shape))}" for cls, shape in CASES]


@pytest.fixture(params=["runs", "fused"])
def short_runs_walk(request):
    """Both walks of (N, C, S) channels of short runs that fit in cache: sample after
    sample (runs) or channel by channel, fused (use_runs in _channel.pxi: the CPU's
    vendor picks one, so each machine would test only its own)."""
    previous = kernels._set_fuse_short_runs(request.param == "fused")
    yield request.param
    kernels._set_fuse_short_runs(previous)


def layouts_for(shape):
    return ("contiguous", "strided") + (("channels_last",) if len(shape) >= 3 else ())


def case_params():
    for (cls, shape), case_id in zip(CASES, CASE_IDS):
        for layout in layouts_for(shape):
            for dtype in DTYPES:
                yield pytest.param(cls, shape, layout, dtype, id=f"{case_id}-{layout}-{np.dtype(dtype).name}")


def randomize_affine(layer, seed=1):
    rng = np.random.default_rng(seed)
    layer.weight[...] = rng.uniform(0.5, 1.5, layer.num_features)
    layer.bias[...] = rng.standard_normal(layer.num_features)


@pytest.mark.smoke
@pytest.mark.parametrize("cls, shape, layout, dtype", list(case_params()))
def test_training_steps_then_eval_match_reference(cls, shape, layout, dtype):
    """Two training steps (forward + backward) then an eval step, all against the reference."""
    C = shape[1]
    layer = cls(C, momentum=0.3, dtype=dtype)
    randomize_affine(layer)
    running_mean = np.zeros(C)
    running_var = np.ones(C)
    tol = tolerance(dtype)
    for step in range(2):
        x = make_input(shape, dtype, layout, seed=10 + step, mean=step, std=2.0)
        dy = make_input(shape, dtype, layout, seed=20 + step)
        y = layer(x)
        expected = ref.batch_norm_forward(x, layer.weight, layer.bias, layer.eps, running_mean,
                                          running_var, training=True, momentum=0.3)
        running_mean, running_var = expected.running_mean, expected.running_var
        assert y.dtype == dtype and y.shape == shape
        np.testing.assert_allclose(y, expected.y, atol=tol, rtol=0)
        np.testing.assert_allclose(layer.running_mean, running_mean, atol=tol, rtol=tol)
        np.testing.assert_allclose(layer.running_var, running_var, atol=tol, rtol=tol)
        assert int(layer.num_batches_tracked) == step + 1
        dx = layer.backward(dy)
        gx, gw, gb = ref.batch_norm_backward(x, dy, layer.weight, layer.eps, training=True)
        assert dx.dtype == dtype and dx.shape == shape
        scale = max(1.0, np.abs(gx).max())
        np.testing.assert_allclose(dx, gx, atol=tol * scale * 4, rtol=0)
        np.testing.assert_allclose(layer.grads["weight"], gw, atol=tol * x.size, rtol=tol * 10)
        np.testing.assert_allclose(layer.grads["bias"], gb, atol=tol * x.size, rtol=tol * 10)
    layer.eval()
    x = make_input(shape, dtype, layout, seed=30)
    y = layer(x)
    expected = ref.batch_norm_forward(x, layer.weight, layer.bias, layer.eps, layer.running_mean,
                                      layer.running_var, training=False)
    np.testing.assert_allclose(y, expected.y, atol=tol, rtol=0)
    dy = make_input(shape, dtype, layout, seed=31)
    dx = layer.backward(dy)
    gx, gw, gb = ref.batch_norm_backward(x, dy, layer.weight, layer.eps, training=False,
                                         running_mean=layer.running_mean,
                                         running_var=layer.running_var)
    np.testing.assert_allclose(dx, gx, atol=tol * 4, rtol=0)
    np.testing.assert_allclose(layer.grads["weight"], gw, atol=tol * x.size, rtol=tol * 10)
    assert int(layer.num_batches_tracked) == 2


@pytest.mark.parametrize("cls, shape, layout, dtype", list(case_params()))
def test_matches_torch_module(cls, shape, layout, dtype):
    """Forward, running stats and every gradient equal torch.nn.BatchNorm*d's."""
    torch = torch_or_skip()
    C = shape[1]
    layer = cls(C, momentum=0.2, dtype=dtype)
    randomize_affine(layer, seed=5)
    tmod = getattr(torch.nn, cls.__name__)(C, momentum=0.2, dtype=getattr(torch, np.dtype(dtype).name))
    tmod.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in layer.state_dict().items()})
    x = make_input(shape, dtype, layout, seed=3, mean=3.0, std=0.5)
    dy = make_input(shape, dtype, layout, seed=4)
    tx = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_()
    ty = tmod(tx)
    ty.backward(torch.from_numpy(np.ascontiguousarray(dy)))
    y = layer(x)
    dx = layer.backward(dy)
    tol = tolerance(dtype) * 5
    np.testing.assert_allclose(y, ty.detach().numpy(), atol=tol, rtol=0)
    # float32 rounding of x is amplified by invstd (large when a channel has 2 close values)
    amplification = max(1.0, np.abs(dx).max(), layer._saved[2].max())
    np.testing.assert_allclose(dx, tx.grad.numpy(), atol=tol * amplification, rtol=0)
    np.testing.assert_allclose(layer.grads["weight"], tmod.weight.grad.numpy(), rtol=tol, atol=tol * x.size)
    np.testing.assert_allclose(layer.grads["bias"], tmod.bias.grad.numpy(), rtol=tol, atol=tol * x.size)
    for name, value in tmod.state_dict().items():
        np.testing.assert_allclose(layer.state_dict()[name], value.numpy(), rtol=tol, atol=tol)


@pytest.mark.parametrize("momentum", [None, 0.0, 1.0])
def test_momentum_edge_values(momentum):
    torch = torch_or_skip()
    layer = fn.BatchNorm1d(4, momentum=momentum)
    tmod = torch.nn.BatchNorm1d(4, momentum=momentum)
    for step in range(3):
        x = make_input((8, 4, 3), np.float32, seed=step, mean=step, std=step + 1)
        layer(x)
        tmod(torch.from_numpy(x))
    for name, value in tmod.state_dict().items():
        np.testing.assert_allclose(layer.state_dict()[name], value.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_affine_and_tracking_options(affine, track, training):
    torch = torch_or_skip()
    layer = fn.BatchNorm2d(3, affine=affine, track_running_stats=track)
    tmod = torch.nn.BatchNorm2d(3, affine=affine, track_running_stats=track)
    layer.train(training)
    tmod.train(training)
    x = make_input((4, 3, 5, 5), np.float32, seed=1, mean=1.0)
    dy = make_input((4, 3, 5, 5), np.float32, seed=2)
    tx = torch.from_numpy(x).requires_grad_()
    ty = tmod(tx)
    ty.backward(torch.from_numpy(dy))
    y = layer(x)
    dx = layer.backward(dy)
    np.testing.assert_allclose(y, ty.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(dx, tx.grad.numpy(), atol=1e-5)
    assert set(layer.grads) == ({"weight", "bias"} if affine else set())
    if affine:
        np.testing.assert_allclose(layer.grads["weight"], tmod.weight.grad.numpy(), atol=1e-4)
        np.testing.assert_allclose(layer.grads["bias"], tmod.bias.grad.numpy(), atol=1e-4)
    assert layer.state_dict().keys() == tmod.state_dict().keys()
    for name, value in tmod.state_dict().items():
        np.testing.assert_allclose(layer.state_dict()[name], value.numpy(), atol=1e-6)


def test_finite_difference_gradients_float64():
    """Every gradient of the training forward against central differences."""
    x = make_input((3, 2, 4), np.float64, seed=7)
    dy = make_input((3, 2, 4), np.float64, seed=8)
    layer = fn.BatchNorm1d(2, dtype=np.float64)
    randomize_affine(layer)
    layer(x)
    dx = layer.backward(dy)

    def f_x(x_):
        probe = fn.BatchNorm1d(2, dtype=np.float64)
        probe.weight[...], probe.bias[...] = layer.weight, layer.bias
        return probe(x_)

    def f_w(w):
        probe = fn.BatchNorm1d(2, dtype=np.float64)
        probe.weight[...], probe.bias[...] = w, layer.bias
        return probe(x)

    np.testing.assert_allclose(dx, ref.finite_difference_grad(f_x, x, dy), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(layer.grads["weight"], ref.finite_difference_grad(f_w, layer.weight.copy(), dy),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_hard_data_far_from_zero(layout):
    """float32 data with mean 1e4, std 1: within 1e-5 of the float64 reference, both ways."""
    shape = (16, 8, 12, 12)
    x = make_input(shape, np.float32, layout, seed=11, mean=1e4, std=1.0)
    dy = make_input(shape, np.float32, layout, seed=12)
    layer = fn.BatchNorm2d(8)
    y = layer(x)
    dx = layer.backward(dy)
    expected = ref.batch_norm_forward(x, None, None, 1e-5)
    gx, gw, gb = ref.batch_norm_backward(x, dy, None, 1e-5)
    assert np.abs(y - expected.y).max() <= 1e-5
    assert np.abs(dx - gx).max() <= 1e-5
    np.testing.assert_allclose(layer.grads["weight"], gw, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("pattern", ["drift", "outlier_rows_first"])
def test_channels_last_statistics_on_awkward_row_orders(pattern):
    """Rows drifting far along the batch, or a first block of rows far from the rest,
    must not cost accuracy (the one-pass shifted sums fall back to exact sums)."""
    rows, channels = 4096, 24
    rng = np.random.default_rng(5)
    x = rng.standard_normal((rows, channels)) + 1e4
    if pattern == "drift":
        x += np.linspace(0.0, 400.0, rows)[:, None]
    else:
        x[:32] = 0.0  # the first unit of the first stripe: a shift far from its mean
    x = x.astype(np.float32)
    layer = fn.BatchNorm1d(channels)
    y = layer(x)
    expected = ref.batch_norm_forward(x, None, None, 1e-5)
    assert np.abs(y - expected.y).max() <= 2e-5
    _, _, invstd = F.native_batch_norm(x, None, None, None, None, True, 0.1, 1e-5)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(expected.var + 1e-5), rtol=1e-6)


@pytest.mark.parametrize("pattern", ["drift", "outlier_sample_first"])
@pytest.mark.parametrize("spatial", [(5, 7), (64,)])
def test_sample_order_statistics_on_awkward_sample_orders(pattern, spatial, short_runs_walk):
    """NCHW data with many samples of short runs is reduced sample after sample about a
    shift from each stripe's first run: samples drifting along the batch, or a first
    sample far from the rest, must fall back to exact sums (forward and backward)."""
    n, channels = 128, 5   # 16 stripes of 8 samples
    rng = np.random.default_rng(6)
    x = rng.standard_normal((n, channels) + spatial) + 1e4
    if pattern == "drift":
        x += np.linspace(0.0, 400.0, n).reshape((n,) + (1,) * (x.ndim - 1))
    else:
        # the first sample of every stripe 100 std off: the shift it gives is over
        # 2 standard deviations from the stripe's mean, so the stripe is redone exactly
        x[::8] += 100.0
    x = x.astype(np.float32)
    layer = fn.BatchNorm1d(channels) if len(spatial) == 1 else fn.BatchNorm2d(channels)
    y = layer(x)
    expected = ref.batch_norm_forward(x, None, None, 1e-5)
    assert np.abs(y - expected.y).max() <= 2e-5
    _, _, invstd = F.native_batch_norm(x, None, None, None, None, True, 0.1, 1e-5)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(expected.var + 1e-5), rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls, shape", [(fn.BatchNorm1d, (16, 5, 300)),
                                        (fn.BatchNorm2d, (9, 3, 7, 11))])
def test_short_runs_walks_match_reference(cls, shape, dtype, short_runs_walk):
    """Channels of short runs, on either walk: a training forward (running statistics
    too) and its backward against the float64 reference, data far from zero."""
    C = shape[1]
    layer = cls(C, dtype=dtype)
    randomize_affine(layer)
    x = make_input(shape, dtype, seed=7, mean=1e3, std=2.0)
    dy = make_input(shape, dtype, seed=8)
    y = layer(x)
    dx = layer.backward(dy)
    expected = ref.batch_norm_forward(x, layer.weight, layer.bias, layer.eps, np.zeros(C),
                                      np.ones(C), training=True, momentum=0.1)
    gx, gw, gb = ref.batch_norm_backward(x, dy, layer.weight, layer.eps, training=True)
    tol = tolerance(dtype)
    np.testing.assert_allclose(y, expected.y, atol=tol, rtol=0)
    np.testing.assert_allclose(layer.running_mean, expected.running_mean, rtol=tol)
    np.testing.assert_allclose(layer.running_var, expected.running_var, rtol=tol)
    np.testing.assert_allclose(dx, gx, atol=tol * max(1.0, np.abs(gx).max()) * 4, rtol=0)
    np.testing.assert_allclose(layer.grads["weight"], gw, atol=tol * x.size, rtol=tol * 10)
    np.testing.assert_allclose(layer.grads["bias"], gb, atol=tol * x.size, rtol=tol * 10)


def test_short_runs_walk_follows_the_cpu_vendor():
    """Intel CPUs fuse channels of short runs per channel, others walk them as runs."""
    try:
        with open("/proc/cpuinfo") as f:
            vendors = {line.split(":")[1].strip() for line in f if line.startswith("vendor_id")}
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    if len(vendors) != 1:
        pytest.skip(f"CPU vendor unknown: {vendors}")
    fused = kernels._set_fuse_short_runs(False)
    kernels._set_fuse_short_runs(fused)
    assert fused == (vendors == {"GenuineIntel"})


def test_constant_channel_gives_bias_exactly():
    x = np.full((4, 3, 5), 7.25, np.float32)
    layer = fn.BatchNorm1d(3)
    layer.bias[...] = [1.0, -2.0, 0.5]
    y = layer(x)
    assert np.array_equal(y, np.broadcast_to(layer.bias[None, :, None], x.shape))


def test_nan_poisons_only_its_channel():
    x = make_input((4, 3, 5), np.float32, seed=1)
    x[1, 1, 2] = np.nan
    y = fn.BatchNorm1d(3)(x)
    assert np.isnan(y[:, 1]).all()
    assert np.isfinite(y[:, [0, 2]]).all()


@pytest.mark.parametrize("shape", [(32, 16, 300), (4096, 24), (2, 3, 5000), (6, 40, 50, 20),
                                   (64, 2, 9000), (16, 5, 300), (5, 300, 9, 11), (8, 5, 2100)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bitwise_identical_for_any_thread_count(shape, layout, monkeypatch, short_runs_walk):
    """Per-channel and split paths, every strategy: identical bits for 1, 2, 3 threads.
    (16, 5, 300): runs order, or (short_runs_walk) segments fused per channel at 1 and
    2 threads, split at 3. (8, 5, 2100): runs of 8400 bytes in channels that fit in
    cache, so segments (use_runs), fused per channel at 1 and 2 threads, split at 3.
    (5, 300, 9, 11) channels-last: the column sums' register tiles."""
    monkeypatch.setattr(fn._threads, "MIN_VALUES_PER_THREAD", 1)  # threads even for small inputs
    if layout == "channels_last" and len(shape) < 3:
        pytest.skip("2-D input has no channels-last form")
    x = make_input(shape, np.float32, layout, seed=2, mean=5.0)
    dy = make_input(shape, np.float32, layout, seed=3)
    results = []
    for n in (1, 2, 3, 2, 3):  # repeated: a data race shows up as a run-to-run difference
        with num_threads(n):
            layer = fn.BatchNorm1d(shape[1]) if len(shape) <= 3 else fn.BatchNorm2d(shape[1])
            y = layer(x)
            dx = layer.backward(dy)
            results.append((y, dx, layer.running_mean, layer.running_var, layer.grads["weight"],
                            layer.grads["bias"]))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, layout", [((2700, 1604), "contiguous"),
                                           ((2700, 1602), "contiguous"),
                                           ((6, 76, 96, 100), "channels_last"),
                                           ((6, 77, 96, 100), "channels_last")])
@pytest.mark.parametrize("running_mean", [0.0, 1e3])
def test_large_rows_output_written_with_streaming_stores_is_bitwise_the_same(
        shape, layout, dtype, running_mean):
    """(N, C) and channels-last outputs of 16 MiB and more are written with non-temporal
    stores where rows are whole 16-byte vectors (76, 1604 channels: a half vector at the
    end in float32; 1602 in float64; 77 never); a few samples alone take plain stores.
    Same bits, with the mean subtracted (far from zero) and folded into the shift."""
    x = make_input(shape, dtype, layout, seed=4, mean=running_mean)
    layer = fn.BatchNorm1d(shape[1], dtype=dtype) if len(shape) == 2 else fn.BatchNorm2d(
        shape[1], dtype=dtype)
    rng = np.random.default_rng(5)
    layer.running_mean[:] = running_mean + rng.standard_normal(shape[1])
    layer.running_var[:] = rng.uniform(0.5, 2.0, shape[1])
    layer.weight[:] = rng.uniform(0.5, 2.0, shape[1])
    layer.bias[:] = rng.standard_normal(shape[1])
    layer.eval()
    big = layer(x)
    for part in (slice(0, 1), slice(3, 5), slice(shape[0] - 1, None)):
        assert np.array_equal(big[part], layer(x[part]))


@pytest.mark.parametrize("activation", ["relu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streamed_activation_output_is_bitwise_the_same(dtype, activation):
    """An NCHW output of 16 MiB and more with a fused activation is formed in an L1 scratch
    and copied out with non-temporal stores (runs of 9600 values, several scratch chunks
    each, the first ending on a line boundary); a few samples alone are written in place."""
    shape = (6, 76, 96, 100) if dtype == np.float32 else (3, 76, 96, 100)
    x = make_input(shape, dtype, seed=9, mean=10.0)
    layer = fn.BatchNorm2d(76, dtype=dtype, activation=activation)
    rng = np.random.default_rng(10)
    layer.running_mean[:] = 10.0 + rng.standard_normal(76)
    layer.running_var[:] = rng.uniform(0.5, 2.0, 76)
    layer.weight[:] = rng.uniform(0.5, 2.0, 76)
    layer.eval()
    big = layer(x)
    for part in (slice(0, 1), slice(shape[0] - 1, None)):
        assert np.array_equal(big[part], layer(x[part]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels", [76, 1602, 77])
def test_large_rows_backward_written_with_streaming_stores_is_bitwise_the_same(dtype, channels):
    """A channels-last dx of 16 MiB and more is written with non-temporal stores where rows
    are whole 16-byte vectors (see the forward test); the same coefficients on a few rows
    take plain stores: same bits."""
    rows = (16 << 20) // (channels * np.dtype(dtype).itemsize) + 2
    x = make_input((rows, channels, 1), dtype, seed=6, mean=1e3)
    dy = make_input((rows, channels, 1), dtype, seed=7)
    rng = np.random.default_rng(8)
    mean = 1e3 + rng.standard_normal(channels)
    k_dy, k_x, k_0 = rng.standard_normal((3, channels))
    big = np.empty_like(x)
    kernels.channel_backward_apply(x, dy, mean, k_dy, k_x, k_0, big, 2)
    for part in (slice(0, 1), slice(3, 5), slice(rows - 1, None)):
        small = np.empty_like(x[part])
        kernels.channel_backward_apply(x[part], dy[part], mean, k_dy, k_x, k_0, small, 1)
        assert np.array_equal(big[part], small)


@pytest.mark.parametrize("dtype, shape", [(np.float32, (32, 64, 3136)),
                                          (np.float64, (16, 48, 3000))])
def test_fused_channel_backward_streamed_dx_is_bitwise_the_same(dtype, shape):
    """A dx of 16 MiB and more formed per channel (runs of more than 8 KiB in channels
    that fit in cache, use_runs) is written with non-temporal stores; the first four
    channels alone, a call below STREAM_BYTES, take plain stores: same bits."""
    x = make_input(shape, dtype, seed=12, mean=3.0)
    dy = make_input(shape, dtype, seed=13)
    big = fn.BatchNorm1d(shape[1], dtype=dtype)
    randomize_affine(big)
    big(x)
    dx = big.backward(dy)
    small = fn.BatchNorm1d(4, dtype=dtype)
    small.weight[...] = big.weight[:4]
    small.bias[...] = big.bias[:4]
    small(x[:, :4])
    assert np.array_equal(small.backward(dy[:, :4]), dx[:, :4])
    assert np.array_equal(small.grads["weight"], big.grads["weight"][:4])


@pytest.mark.smoke
def test_channels_last_input_gives_channels_last_output_without_copy():
    x = make_input((2, 5, 4, 3), np.float32, "channels_last")
    layer = fn.BatchNorm2d(5)
    y = layer(x)
    assert is_channels_last(y) and not y.flags.c_contiguous
    assert layer._saved[0] is x  # processed in place, not copied
    dx = layer.backward(make_input((2, 5, 4, 3), np.float32, "channels_last", seed=9))
    assert is_channels_last(dx)
    np.testing.assert_allclose(y, layer.eval().train()(np.ascontiguousarray(x)), atol=1e-6)


def test_read_only_input_is_fine():
    x = make_input((4, 3, 6), np.float32)
    x.flags.writeable = False
    layer = fn.BatchNorm1d(3)
    y = layer(x)
    layer.backward(np.ones_like(x))
    assert y.flags.writeable


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_out_argument(layout):
    x = make_input((4, 3, 5, 6), np.float32, seed=1)
    out = make_input((4, 3, 5, 6), np.float32, layout, seed=2)
    layer = fn.BatchNorm2d(3).eval()
    expected = layer(x)
    result = layer(x, out=out)
    assert result is out
    np.testing.assert_array_equal(out, expected)


def test_empty_batch_returns_empty_and_keeps_stats():
    layer = fn.BatchNorm2d(3)
    layer.running_mean[...] = [1, 2, 3]
    before = layer.state_dict()
    x = np.empty((0, 3, 4, 4), np.float32)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    for name, value in layer.state_dict().items():
        assert np.array_equal(value, before[name])
    dx = layer.backward(np.empty_like(x))
    assert dx.shape == x.shape
    assert np.array_equal(layer.grads["weight"], np.zeros(3, np.float32))


def _assert_state_unchanged(layer, before):
    after = layer.state_dict()
    assert after.keys() == before.keys()
    for name in before:
        assert np.array_equal(after[name], before[name]), name


BAD_INPUTS = [
    ("int input", lambda: np.ones((4, 3, 5), np.int32), TypeError, "float32 or float64"),
    ("list input", lambda: [[1.0, 2.0, 3.0]] * 4, TypeError, "numpy.ndarray"),
    ("dtype mismatch", lambda: np.ones((4, 3, 5), np.float64), TypeError, "float64.*float32|float32.*float64"),
    ("wrong channels", lambda: np.ones((4, 5, 5), np.float32), ValueError, "expected 3 channels"),
    ("wrong rank", lambda: np.ones((4, 3, 5, 5), np.float32), ValueError, "2D or 3D"),
    ("one value per channel", lambda: np.ones((1, 3), np.float32), ValueError, "more than 1 value per channel"),
    ("one value per channel 3d", lambda: np.ones((1, 3, 1), np.float32), ValueError, "more than 1 value"),
]


@pytest.mark.smoke
@pytest.mark.parametrize("name, make, error, match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_before_any_state_change(name, make, error, match):
    layer = fn.BatchNorm1d(3)
    layer(make_input((4, 3, 5), np.float32, seed=1))
    before = layer.state_dict()
    with pytest.raises(error, match=match):
        layer(make())
    _assert_state_unchanged(layer, before)


def test_bad_out_and_parameters_raise_before_state_change():
    layer = fn.BatchNorm1d(3)
    x = make_input((4, 3, 5), np.float32)
    before = layer.state_dict()
    with pytest.raises(ValueError, match="shape"):
        layer(x, out=np.empty((4, 3, 6), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        layer(x, out=np.empty((4, 3, 5), np.float64))
    read_only = np.empty((4, 3, 5), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        layer(x, out=read_only)
    with pytest.raises(ValueError, match="overlap"):
        layer(x, out=x)
    layer.weight = np.ones(4, np.float32)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        layer(x)
    _assert_state_unchanged(layer, {k: v for k, v in before.items() if k != "weight"} | {"weight": layer.weight})


def test_backward_errors():
    layer = fn.BatchNorm1d(3)
    with pytest.raises(RuntimeError, match="before any forward"):
        layer.backward(np.ones((4, 3), np.float32))
    layer(make_input((4, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        layer.backward(np.ones((4, 2), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        layer.backward(np.ones((4, 3), np.float64))


@pytest.mark.parametrize("kwargs, match", [
    ({"num_features": 0}, "num_features must be at least 1"),
    ({"num_features": 3, "eps": -1e-5}, "eps"),
    ({"num_features": 3, "momentum": 1.5}, "momentum"),
    ({"num_features": 3, "momentum": -0.1}, "momentum"),
])
def test_constructor_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn.BatchNorm2d(**kwargs)
    with pytest.raises(TypeError, match="dtype"):
        fn.BatchNorm2d(3, dtype=np.int32)
    with pytest.raises(TypeError, match="num_features must be an int"):
        fn.BatchNorm2d(3.5)


def test_state_dict_round_trip_with_torch():
    torch = torch_or_skip()
    tmod = torch.nn.BatchNorm2d(4)
    tmod(torch.randn(8, 4, 3, 3) * 3 + 1)
    tmod.weight.data.uniform_()
    layer = fn.BatchNorm2d(4)
    layer.load_state_dict({k: v.numpy() for k, v in tmod.state_dict().items()})
    assert int(layer.num_batches_tracked) == 1
    tmod.eval()
    layer.eval()
    x = make_input((2, 4, 3, 3), np.float32)
    np.testing.assert_allclose(layer(x), tmod(torch.from_numpy(x)).detach().numpy(), atol=1e-6)
    back = torch.nn.BatchNorm2d(4)
    back.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()})
    for name, value in back.state_dict().items():
        assert np.array_equal(value.numpy(), tmod.state_dict()[name].numpy())


def test_load_state_dict_rejects_before_changing_anything():
    layer = fn.BatchNorm1d(3)
    good = layer.state_dict()
    before = {k: v.copy() for k, v in good.items()}
    bad_shape = dict(good, running_mean=np.zeros(4, np.float32), weight=np.full(3, 2, np.float32))
    with pytest.raises(ValueError, match="size mismatch for running_mean"):
        layer.load_state_dict(bad_shape)
    with pytest.raises(ValueError, match="unexpected keys"):
        layer.load_state_dict(dict(good, extra=np.zeros(3)))
    missing = {k: v for k, v in good.items() if k != "bias"}
    with pytest.raises(RuntimeError, match="missing keys"):
        layer.load_state_dict(missing)
    _assert_state_unchanged(layer, before)
    result = layer.load_state_dict(dict(missing, weight=np.full(3, 2.0)), strict=False)
    assert result.missing_keys == ["bias"]
    assert np.array_equal(layer.weight, np.full(3, 2, np.float32))


def test_parameters_and_modes():
    layer = fn.BatchNorm3d(2)
    assert layer.training
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"]
    assert layer.parameters()[0] is layer.weight
    assert layer.eval() is layer and not layer.training
    assert layer.train() is layer and layer.training
    assert repr(layer) == "BatchNorm3d(2, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)"
    assert fn.BatchNorm1d(2, affine=False).parameters() == []


def test_functional_batch_norm_updates_running_arrays_in_place():
    torch = torch_or_skip()
    x = make_input((6, 4, 7), np.float32, seed=3, mean=2.0)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    trm, trv = torch.zeros(4), torch.ones(4)
    w, b = np.linspace(0.5, 2, 4).astype(np.float32), np.linspace(-1, 1, 4).astype(np.float32)
    y = F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.25)
    ty = torch.nn.functional.batch_norm(torch.from_numpy(x), trm, trv, torch.from_numpy(w),
                                        torch.from_numpy(b), training=True, momentum=0.25)
    np.testing.assert_allclose(y, ty.numpy(), atol=1e-5)
    np.testing.assert_allclose(rm, trm.numpy(), atol=1e-6)
    np.testing.assert_allclose(rv, trv.numpy(), atol=1e-6)
    y_eval = F.batch_norm(x, rm, rv, w, b)
    ty_eval = torch.nn.functional.batch_norm(torch.from_numpy(x), trm, trv, torch.from_numpy(w), torch.from_numpy(b))
    np.testing.assert_allclose(y_eval, ty_eval.numpy(), atol=1e-5)


def test_functional_backward_entry_point():
    x = make_input((5, 3, 4), np.float64, seed=1)
    dy = make_input((5, 3, 4), np.float64, seed=2)
    w = np.array([0.5, 1.0, 2.0])
    y, mean, invstd = F.native_batch_norm(x, w, None, None, None, True, 0.1, 1e-5)
    gx, gw, gb = F.batch_norm_backward(dy, x, mean, invstd, w, training=True)
    rx, rw, rb = ref.batch_norm_backward(x, dy, w, 1e-5)
    np.testing.assert_allclose(gx, rx, atol=1e-10)
    np.testing.assert_allclose(gw, rw, atol=1e-10)
    np.testing.assert_allclose(gb, rb, atol=1e-10)
    with pytest.raises(ValueError, match="required when training=False"):
        F.batch_norm(x, None, None)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", [True, False])
def test_eval_coefficients_are_numpys_bitwise(dtype, affine):
    """Eval mode computes its float64 coefficients in C (channel_eval_coefficients):
    the same bits as NumPy's running_mean.astype(float64) and 1 / sqrt(var + eps), and
    an output equal to channel_normalize with NumPy's coefficients. Running statistics
    and parameters are strided views here (copied to contiguous memory first)."""
    rng = np.random.default_rng(5)
    channels, eps = 7, 1e-3
    running_mean = rng.standard_normal(2 * channels).astype(dtype)[::2]
    running_var = (rng.random(2 * channels) + 0.01).astype(dtype)[::2]
    weight = rng.standard_normal(2 * channels).astype(dtype)[::2] if affine else None
    bias = rng.standard_normal(2 * channels).astype(dtype)[::2] if affine else None
    x = make_input((3, channels, 5), dtype, seed=6, mean=2.0)
    y, mean, invstd = F.native_batch_norm(x, weight, bias, running_mean, running_var,
                                          False, 0.1, eps)
    want_mean = running_mean.astype(np.float64)
    want_invstd = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
    assert np.array_equal(mean, want_mean) and np.array_equal(invstd, want_invstd)
    scale = (weight.astype(np.float64) if affine else np.ones(channels)) * want_invstd
    shift = bias.astype(np.float64) if affine else np.zeros(channels)
    want = np.empty_like(x)
    kernels.channel_normalize(x, want_mean, scale, shift, want, 1)
    assert np.array_equal(y, want)
    expected = (x.astype(np.float64) - want_mean[:, None]) * scale[:, None] + shift[:, None]
    np.testing.assert_allclose(y, expected, rtol=tolerance(dtype), atol=tolerance(dtype))
