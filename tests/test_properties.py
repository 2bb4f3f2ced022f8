"""Property-based tests: every layer and functional form on random ranks, shapes,
strides, dtypes, parameters, modes and thread counts.

Each example either matches the float64 reference (tests/reference.py) or raises
ValueError/TypeError for a reason the example itself predicts, with the layer's
state unchanged. Outputs are finite wherever the reference's are.

Budget: the "ci" profile (default) runs a fixed, derandomized set of examples per
test, so CI is reproducible and bounded. A longer, randomized run:

    FASTNORM_FUZZ_EXAMPLES=5000 python -m pytest tests/test_properties.py

uses the "fuzz" profile: failing examples are saved in tests/.hypothesis
(gitignored) and replayed first by the next run, and printed with a
@reproduce_failure blob.
"""
import contextlib
import os

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase  # noqa: E402

import fastnorm as fn  # noqa: E402
import fastnorm.functional as F  # noqa: E402
import reference as R  # noqa: E402
from helpers import num_threads  # noqa: E402

_FUZZ = int(os.environ.get("FASTNORM_FUZZ_EXAMPLES", "0"))
_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=100, derandomize=True, database=None, **_COMMON)
settings.register_profile(
    "fuzz", max_examples=max(_FUZZ, 1),
    database=DirectoryBasedExampleDatabase(os.path.join(os.path.dirname(__file__), ".hypothesis")),
    **_COMMON)
PROFILE = settings.get_profile("fuzz" if _FUZZ else "ci")
# the reference warns about empty and zero-variance inputs; fastnorm's own output is checked
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# Max error against the reference, relative to the reference's largest value (at least 1).
RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-9}
LAYOUTS = ("contiguous", "channels_last", "fortran", "negative", "sliced", "broadcast",
           "permuted")
BAD_DTYPES = (np.float16, np.int32, np.complex64)


# ------------------------------------------------------------------ strategies

@st.composite
def data_arrays(draw, shape, dtype):
    """Values of `shape` in a random memory layout, as (x, description). The
    broadcast layout repeats one sample along axis 0 (zero stride, read-only)."""
    seed = draw(st.integers(0, 2**32 - 1))
    offset = draw(st.sampled_from([0.0, 0.0, 5.0, -1e4]))
    scale = draw(st.sampled_from([1.0, 1.0, 1e-3, 1e3]))
    if np.dtype(dtype) == np.float64 and abs(offset) / scale > 1e6:
        # then the float64 reference itself is only good to ~1e-16 * |mean| / std
        scale = 1.0
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal(shape) * scale + offset).astype(dtype)
    layout = draw(st.sampled_from(LAYOUTS))
    ndim = len(shape)
    if layout == "channels_last" and ndim >= 3:
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(values, 1, -1)), -1, 1)
    elif layout == "fortran":
        x = np.asfortranarray(values)
    elif layout == "negative":
        x = np.ascontiguousarray(values[::-1])[::-1]
    elif layout == "sliced":
        big = np.zeros((2 * shape[0] + 1,) + tuple(shape[1:]), dtype)
        big[1::2] = values
        x = big[1::2]
    elif layout == "broadcast":
        x = np.broadcast_to(values[:1], shape)
    elif layout == "permuted":
        perm = draw(st.permutations(range(ndim)))
        x = np.ascontiguousarray(values.transpose(perm)).transpose(np.argsort(perm))
    else:
        x = values
    if draw(st.booleans()) and x.flags.writeable:
        x.flags.writeable = False
    return x


def sizes(low=0, high=7):
    """Small sizes with 0, 1 and primes well represented."""
    return st.one_of(st.sampled_from([0, 1, 2, 3, 5, 7, 11, 13]), st.integers(low, high))


dtypes = st.sampled_from([np.dtype(np.float32), np.dtype(np.float64)])
threads = st.sampled_from([1, 2, 3])
# eps=0 with a constant unit is 0/0 (NaN in torch; the reference's rounding makes it +-1)
epsilons = st.sampled_from([1e-5, 1e-5, 1e-3, 0.5, 1e-12])


@contextlib.contextmanager
def small_work_threads(n):
    """n threads even for tiny inputs, so that examples exercise the parallel paths."""
    saved = fn._threads.MIN_VALUES_PER_THREAD
    fn._threads.MIN_VALUES_PER_THREAD = 1
    try:
        with num_threads(n):
            yield
    finally:
        fn._threads.MIN_VALUES_PER_THREAD = saved


# ------------------------------------------------------------------- checks

def amplification(x, axes, eps, dy, centered=True):
    """max |dy| / std over the units reduced on `axes`: the size of the terms a
    gradient is the difference of, which is what its rounding error scales with."""
    x = np.asarray(x, dtype=np.float64)
    center = x.mean(axis=axes, keepdims=True) if centered else 0.0
    spread = np.square(x - center).mean(axis=axes)
    with np.errstate(divide="ignore"):
        return float(np.abs(dy).max(initial=0.0) * np.max(1 / np.sqrt(spread + eps), initial=1.0))


def assert_matches(got, want, dtype, what, rtol=None, floor=1.0):
    """got equals want to dtype accuracy, relative to the larger of want's magnitude and
    floor, wherever want is finite (and is finite there)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    finite = np.isfinite(want)
    assert np.isfinite(got[finite]).all(), f"{what}: non-finite where the reference is finite"
    if finite.any():
        scale = max(1.0, floor, float(np.abs(want[finite]).max()))
        err = float(np.abs(got[finite] - want[finite]).max())
        rtol = rtol or RTOL[np.dtype(dtype)]
        assert err <= rtol * scale, f"{what}: error {err:.3g} (scale {scale:.3g})"


def state_of(layer):
    return {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}


def assert_same_state(before, layer):
    after = state_of(layer)
    assert before.keys() == after.keys()
    for k in before:
        assert np.array_equal(before[k], after[k], equal_nan=True), f"{k} changed"


def configured(layer, w, b, track, training):
    """A per-channel layer with the drawn parameters (when affine), non-trivial running
    statistics (when tracked) and the drawn mode."""
    if layer.weight is not None:
        layer.weight[...], layer.bias[...] = w, b
    if track:
        channels = layer.running_mean.shape[0]
        layer.running_mean[...] = np.linspace(-1, 1, channels)
        layer.running_var[...] = np.linspace(0.5, 2, channels)
    return layer.train(training)


def run_rejected(layer, x, exc):
    """A call that must raise exc and change nothing."""
    before = state_of(layer)
    with pytest.raises(exc):
        layer(x)
    assert_same_state(before, layer)


def wrong_dtype(x, draw):
    return np.ones(x.shape, draw(st.sampled_from(BAD_DTYPES)))


def params(draw, shape, dtype, present):
    if not present:
        return None, None
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    return (rng.uniform(0.5, 1.5, shape).astype(dtype), rng.standard_normal(shape).astype(dtype))


def gradient(draw, x):
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    return rng.standard_normal(x.shape).astype(x.dtype)


def check_thread_invariance(make_layer, x, n):
    """Forward output bitwise equal with 1 and n threads (fresh layers, same state)."""
    with small_work_threads(1):
        one = make_layer()(x)
    with small_work_threads(n):
        many = make_layer()(x)
    assert np.array_equal(one, many, equal_nan=True), "result depends on the thread count"


# ------------------------------------------------------------ channel layers

BATCH_NORMS = {2: fn.BatchNorm1d, 3: fn.BatchNorm1d, 4: fn.BatchNorm2d, 5: fn.BatchNorm3d}
INSTANCE_NORMS = {3: fn.InstanceNorm1d, 4: fn.InstanceNorm2d, 5: fn.InstanceNorm3d}


@PROFILE
@given(st.data())
def test_batch_norm_layers(data):
    draw = data.draw
    ndim = draw(st.sampled_from([2, 3, 4, 5]))
    channels = draw(st.sampled_from([1, 2, 3, 5, 8]))
    shape = (draw(sizes(0, 6)), channels) + tuple(draw(sizes(1, 5)) for _ in range(ndim - 2))
    dtype = draw(dtypes)
    eps, momentum = draw(epsilons), draw(st.sampled_from([0.1, 0.0, 1.0, 0.37, None]))
    affine, track = draw(st.booleans()), draw(st.booleans())
    sync = draw(st.sampled_from([None, None, "callable"]))
    training, n = draw(st.booleans()), draw(threads)
    w, b = params(draw, (channels,), dtype, affine)

    def make_layer():
        if sync:
            layer = fn.SyncBatchNorm(channels, eps, momentum, affine, track,
                                     comm=lambda a: a.copy(), dtype=dtype)
        else:
            layer = BATCH_NORMS[ndim](channels, eps, momentum, affine, track, dtype=dtype)
        return configured(layer, w, b, track, training)

    layer = make_layer()
    x = draw(data_arrays(shape, dtype))
    if draw(st.integers(0, 9)) == 0:
        return run_rejected(layer, wrong_dtype(x, draw), TypeError)
    if draw(st.integers(0, 9)) == 0:
        wrong = np.zeros((shape[0], channels + 1) + shape[2:], dtype)
        return run_rejected(layer, wrong, ValueError)
    use_batch = training or not track
    count = x.size // channels
    if use_batch and count == 1:
        return run_rejected(layer, x, ValueError)
    before = state_of(layer)
    with small_work_threads(n):
        y = layer(x)
    assert y.shape == x.shape and y.dtype == dtype
    if count == 0:
        return assert_same_state(before, layer)
    updates = training and track
    ref = R.batch_norm_forward(
        x, before.get("weight"), before.get("bias"), eps,
        before.get("running_mean") if track else None, before.get("running_var") if track else None,
        training=use_batch, momentum=momentum,
        num_batches_tracked=int(before.get("num_batches_tracked", 0)))
    # SyncBatchNorm's first step sums about a shift of 0 (see functional.sync_batch_norm):
    # float64 data with |mean| / std near 1e5 keep about float32 accuracy there.
    assert_matches(y, ref.y, dtype, "forward", rtol=1e-4 if sync else None)
    if updates:
        assert_matches(layer.running_mean, ref.running_mean, dtype, "running_mean",
                       1e-4 if sync else None)
        assert_matches(layer.running_var, ref.running_var, dtype, "running_var",
                       1e-4 if sync else None)
        assert int(layer.num_batches_tracked) == ref.num_batches_tracked
    dy = gradient(draw, x)
    with small_work_threads(n):
        dx = layer.backward(dy)
    want = R.batch_norm_backward(x, dy, before.get("weight"), eps, training=use_batch,
                                 running_var=before.get("running_var"),
                                 running_mean=before.get("running_mean"))
    axes = (0,) + tuple(range(2, ndim))
    assert_matches(dx, want[0], dtype, "grad_input", 1e-4 if sync else None,
                   floor=amplification(x, axes, eps, dy))
    if affine:
        assert_matches(layer.grads["weight"], want[1], dtype, "grad_weight")
        assert_matches(layer.grads["bias"], want[2], dtype, "grad_bias")
    check_thread_invariance(make_layer, x, n)


@PROFILE
@given(st.data())
def test_instance_norm_layers(data):
    draw = data.draw
    ndim = draw(st.sampled_from([3, 4, 5]))
    channels = draw(st.sampled_from([1, 2, 3, 7]))
    shape = (draw(sizes(0, 5)), channels) + tuple(draw(sizes(1, 5)) for _ in range(ndim - 2))
    dtype, eps = draw(dtypes), draw(epsilons)
    momentum = draw(st.sampled_from([0.1, 1.0, None]))
    affine, track, training = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    unbatched, n = draw(st.booleans()), draw(threads)
    w, b = params(draw, (channels,), dtype, affine)

    def make_layer():
        layer = INSTANCE_NORMS[ndim](channels, eps, momentum, affine, track, dtype=dtype)
        return configured(layer, w, b, track, training)

    layer = make_layer()
    x = draw(data_arrays(shape, dtype))
    if draw(st.integers(0, 9)) == 0:
        return run_rejected(layer, wrong_dtype(x, draw), TypeError)
    use_input = training or not track
    spatial = int(np.prod(shape[2:]))
    if use_input and spatial == 1 and x.size:
        return run_rejected(layer, x[0] if unbatched else x, ValueError)
    if use_input and spatial == 1:
        # empty batch of single-position instances: rejected like any one-value instance
        with contextlib.suppress(ValueError):
            layer(x)
        return
    before = state_of(layer)
    with small_work_threads(n):
        y = layer(x[0]) if unbatched and shape[0] else layer(x)
    xb = x[:1] if unbatched and shape[0] else x
    if not xb.size:
        assert y.shape == (xb.shape[1:] if xb is not x else x.shape)
        return assert_same_state(before, layer)
    ref = R.instance_norm_forward(
        xb, before.get("weight"), before.get("bias"), eps,
        before.get("running_mean"),
        before.get("running_var"), use_input_stats=use_input, momentum=momentum,
        num_batches_tracked=int(before.get("num_batches_tracked", 0)))
    assert_matches(y, ref.y[0] if xb is not x else ref.y, dtype, "forward")
    if training and track:
        assert_matches(layer.running_mean, ref.running_mean, dtype, "running_mean")
        assert_matches(layer.running_var, ref.running_var, dtype, "running_var")
    dy = gradient(draw, xb)
    with small_work_threads(n):
        dx = layer.backward(dy[0] if xb is not x else dy)
    want = R.instance_norm_backward(xb, dy, before.get("weight"), eps,
                                    before.get("running_mean"), before.get("running_var"),
                                    use_input_stats=use_input)
    floor = amplification(xb, tuple(range(2, ndim)), eps, dy)
    assert_matches(dx, want[0][0] if xb is not x else want[0], dtype, "grad_input",
                   floor=floor)
    if affine:
        assert_matches(layer.grads["weight"], want[1], dtype, "grad_weight")
    check_thread_invariance(make_layer, x, n)


@PROFILE
@given(st.data())
def test_functional_batch_norm_updates_running_arrays(data):
    draw = data.draw
    channels = draw(st.sampled_from([1, 3, 4]))
    shape = (draw(sizes(2, 6)), channels, draw(sizes(1, 6)))
    dtype, eps = draw(dtypes), draw(epsilons)
    x = draw(data_arrays(shape, dtype))
    if x.size // channels <= 1:
        return
    rm, rv = np.linspace(-1, 1, channels).astype(dtype), np.full(channels, 2.0, dtype)
    w, b = params(draw, (channels,), dtype, draw(st.booleans()))
    ref = R.batch_norm_forward(x, w, b, eps, rm, rv, training=True, momentum=0.3)
    y = F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.3, eps=eps)
    assert_matches(y, ref.y, dtype, "forward")
    assert_matches(rm, ref.running_mean, dtype, "running_mean")
    assert_matches(rv, ref.running_var, dtype, "running_var")
    with pytest.raises(TypeError):
        F.batch_norm(x, rm.astype(np.float16), rv, training=True)


# ---------------------------------------------------------------- row layers

@PROFILE
@given(st.data())
def test_layer_norm_and_rms_norm(data):
    draw = data.draw
    lead = tuple(draw(sizes(0, 5)) for _ in range(draw(st.integers(0, 3))))
    normalized = tuple(draw(sizes(1, 9)) for _ in range(draw(st.integers(1, 2))))
    shape = lead + normalized
    dtype, eps, n = draw(dtypes), draw(epsilons), draw(threads)
    rms, affine = draw(st.booleans()), draw(st.booleans())
    w, b = params(draw, normalized, dtype, affine)

    def make_layer():
        if rms:
            layer = fn.RMSNorm(normalized, eps=eps, elementwise_affine=affine, dtype=dtype)
        else:
            layer = fn.LayerNorm(normalized, eps, elementwise_affine=affine, dtype=dtype)
        if affine:
            layer.weight[...] = w
            if not rms:
                layer.bias[...] = b
        return layer

    layer = make_layer()
    x = draw(data_arrays(shape, dtype)) if len(shape) >= 2 else np.zeros(shape, dtype) + 0.5
    if draw(st.integers(0, 9)) == 0:
        return run_rejected(layer, wrong_dtype(x, draw), TypeError)
    if draw(st.integers(0, 9)) == 0:
        return run_rejected(layer, np.zeros(shape[:-1] + (shape[-1] + 1,), dtype), ValueError)
    state = state_of(layer)
    w, b = state.get("weight"), state.get("bias")
    with small_work_threads(n):
        y = layer(x)
    dy = gradient(draw, x)
    with small_work_threads(n):
        dx = layer.backward(dy)
    if rms:
        want_y = R.rms_norm_forward(x, normalized, w, eps)
        want = R.rms_norm_backward(x, dy, normalized, w, eps)
    else:
        want_y = R.layer_norm_forward(x, normalized, w, b, eps)
        want = R.layer_norm_backward(x, dy, normalized, w, eps)
    if x.size == 0:
        assert y.shape == x.shape and dx.shape == x.shape
        return
    assert_matches(y, want_y, dtype, "forward")
    axes = tuple(range(len(lead), len(shape)))
    assert_matches(dx, want[0], dtype, "grad_input",
                   floor=amplification(x, axes, eps, dy, centered=not rms))
    if affine:
        assert_matches(layer.grads["weight"], want[1], dtype, "grad_weight")
    check_thread_invariance(make_layer, x, n)


@PROFILE
@given(st.data())
def test_group_norm(data):
    draw = data.draw
    groups, per_group = draw(st.sampled_from([1, 2, 3, 5])), draw(st.sampled_from([1, 2, 3]))
    channels = groups * per_group
    shape = (draw(sizes(0, 5)), channels) + tuple(
        draw(sizes(1, 6)) for _ in range(draw(st.integers(0, 3))))
    dtype, eps, affine, n = draw(dtypes), draw(epsilons), draw(st.booleans()), draw(threads)
    w, b = params(draw, (channels,), dtype, affine)

    def make_layer():
        layer = fn.GroupNorm(groups, channels, eps, affine, dtype=dtype)
        if affine:
            layer.weight[...], layer.bias[...] = w, b
        return layer

    layer = make_layer()
    x = draw(data_arrays(shape, dtype))
    if draw(st.integers(0, 9)) == 0:
        return run_rejected(layer, wrong_dtype(x, draw), TypeError)
    state = state_of(layer)
    with small_work_threads(n):
        y = layer(x)
    dy = gradient(draw, x)
    with small_work_threads(n):
        dx = layer.backward(dy)
    if x.size == 0:
        assert y.shape == x.shape and dx.shape == x.shape
        return
    w, b = state.get("weight"), state.get("bias")
    assert_matches(y, R.group_norm_forward(x, groups, w, b, eps), dtype, "forward")
    want = R.group_norm_backward(x, dy, groups, w, eps)
    floor = amplification(x.reshape(shape[0], groups, -1), (2,), eps, dy)
    assert_matches(dx, want[0], dtype, "grad_input", floor=floor)
    if affine:
        assert_matches(layer.grads["weight"], want[1], dtype, "grad_weight")
        assert_matches(layer.grads["bias"], want[2], dtype, "grad_bias")
    check_thread_invariance(make_layer, x, n)
    with pytest.raises(ValueError):
        F.group_norm(x, channels + 1)


# ---------------------------------------------------------------------- LRN

@PROFILE
@given(st.data())
def test_local_response_norm(data):
    draw = data.draw
    shape = (draw(sizes(0, 4)), draw(sizes(1, 9))) + tuple(
        draw(sizes(1, 5)) for _ in range(draw(st.integers(1, 3))))
    dtype, n = draw(dtypes), draw(threads)
    size = draw(st.sampled_from([1, 2, 3, 5, 8, 13]))
    alpha = draw(st.sampled_from([1e-4, 0.1, 1.0, 0.0]))
    beta = draw(st.sampled_from([0.75, 0.5, 1.0, 0.0, 2.0]))
    k = draw(st.sampled_from([1.0, 2.0, 0.5]))
    layer = fn.LocalResponseNorm(size, alpha, beta, k)
    x = draw(data_arrays(shape, dtype))
    if draw(st.integers(0, 9)) == 0:
        return run_rejected(layer, wrong_dtype(x, draw), TypeError)
    with small_work_threads(n):
        y = layer(x)
    dy = gradient(draw, x)
    with small_work_threads(n):
        dx = layer.backward(dy)
    assert_matches(y, R.local_response_norm_forward(x, size, alpha, beta, k), dtype, "forward")
    assert_matches(dx, R.local_response_norm_backward(x, dy, size, alpha, beta, k), dtype,
                   "grad_input")
    check_thread_invariance(lambda: fn.LocalResponseNorm(size, alpha, beta, k), x, n)


def test_bad_constructor_arguments_are_value_errors():
    for make in (lambda: fn.BatchNorm2d(0), lambda: fn.BatchNorm1d(3, eps=-1),
                 lambda: fn.BatchNorm1d(3, momentum=1.5), lambda: fn.GroupNorm(3, 4),
                 lambda: fn.LocalResponseNorm(0), lambda: fn.InstanceNorm2d(-2)):
        with pytest.raises(ValueError):
            make()
