"""Fused activations (BatchNorm family), fold_batchnorm, from_torch/to_torch."""
import math

import numpy as np
import pytest

import fastnorm as fn
from fastnorm import functional as F
from fastnorm._kernels import kernels
from fastnorm.interop import LAYER_ARGUMENTS
from helpers import make_input, num_threads, torch_or_skip

DTYPES = (np.float32, np.float64)
ACTIVATIONS = ("relu", "silu", "gelu", "gelu_tanh")
CODES = {"relu": 1, "silu": 2, "gelu": 3, "gelu_tanh": 4}
# fused vs unfused composition, relative to max(1, |value|)
FUSED_TOL = {np.float32: 2e-5, np.float64: 1e-11}


# ------------------------------------------------- NumPy reference activations

def _erf(v):
    return np.vectorize(math.erf, otypes=[np.float64])(v)


def act_forward(name, z):
    z = np.asarray(z, np.float64)
    with np.errstate(over="ignore"):
        if name == "relu":
            return np.maximum(z, 0.0)
        if name == "silu":
            return z / (1.0 + np.exp(-z))
        if name == "gelu":
            return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))
        u = math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)
        return 0.5 * z * (1.0 + np.tanh(u))


def act_derivative(name, z):
    z = np.asarray(z, np.float64)
    with np.errstate(over="ignore"):
        if name == "relu":
            return (z > 0).astype(np.float64)
        if name == "silu":
            s = 1.0 / (1.0 + np.exp(-z))
            return s * (1.0 + z * (1.0 - s))
        if name == "gelu":
            return 0.5 * (1.0 + _erf(z / math.sqrt(2.0))) + z * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        k = math.sqrt(2.0 / math.pi)
        t = np.tanh(k * (z + 0.044715 * z ** 3))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * k * (1.0 + 3 * 0.044715 * z * z)


def close(actual, expected, dtype, scale=1.0):
    err = np.abs(np.asarray(actual, np.float64) - expected) / np.maximum(1.0, np.abs(expected))
    assert err.max(initial=0.0) <= FUSED_TOL[np.dtype(dtype).type] * scale, err.max()


# ---------------------------------------------------------- activation math

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_math_matches_python_math(name, dtype):
    """The vectorized exp/erf-based math against math.erf/np.exp in float64."""
    z = np.concatenate([np.linspace(-12, 12, 4001), [0.0, -0.0, 1e-30, -1e-30, 30, -30, 90, -90,
                                                     1e10, -1e10]]).astype(dtype)
    y = np.empty_like(z)
    g = np.empty_like(z)
    kernels.activation_forward(z, CODES[name], y, 1)
    kernels.activation_backward(z, np.ones_like(z), CODES[name], g, 1)
    tol = {np.float32: 5e-7, np.float64: 5e-15}[np.dtype(dtype).type]
    for got, want in ((y, act_forward(name, z)), (g, act_derivative(name, z))):
        err = np.abs(got - want) / np.maximum(1.0, np.abs(want))
        assert err.max() <= tol, (name, err.max(), z[err.argmax()])


@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_propagates_nan_and_handles_infinities(dtype):
    z = np.array([np.nan, np.inf, -np.inf, 1e38], dtype)
    for name in ACTIVATIONS:
        y = np.empty_like(z)
        kernels.activation_forward(z, CODES[name], y, 1)
        assert np.isnan(y[0]) and y[1] == np.inf and y[3] == z[3]
        g = np.empty_like(z)
        kernels.activation_backward(z, np.ones_like(z), CODES[name], g, 1)
        assert g[1] == 1.0 and abs(g[2]) < 1e-30 and g[3] == 1.0


# ------------------------------------------------------ BatchNorm + activation

CASES = [
    (fn.BatchNorm1d, (6, 5)),
    (fn.BatchNorm1d, (4, 3, 7)),
    (fn.BatchNorm2d, (3, 4, 5, 6)),
    (fn.BatchNorm2d, (9, 3, 5, 6)),     # 8 samples and more: the runs strategy
    (fn.BatchNorm2d, (9, 3, 37, 29)),   # runs of several pieces of an activation's g
    (fn.BatchNorm2d, (2, 3, 40, 41)),   # segments of several pieces
    (fn.BatchNorm2d, (2, 1, 1, 3)),
    (fn.BatchNorm3d, (2, 3, 2, 3, 4)),
]


def fused_params():
    for cls, shape in CASES:
        layouts = ("contiguous", "strided") + (("channels_last",) if len(shape) >= 4 else ())
        for layout in layouts:
            for dtype in DTYPES:
                yield pytest.param(cls, shape, layout, dtype,
                                   id=f"{cls.__name__}-{'x'.join(map(str, shape))}-{layout}-{np.dtype(dtype).name}")


def make_pair(cls, channels, dtype, activation, **kwargs):
    """A fused layer and an unfused twin with the same random affine parameters."""
    rng = np.random.default_rng(3)
    fused = cls(channels, activation=activation, dtype=dtype, **kwargs)
    plain = cls(channels, dtype=dtype, **kwargs)
    if fused.affine:
        fused.weight[...] = plain.weight[...] = rng.uniform(0.5, 1.5, channels)
        fused.bias[...] = plain.bias[...] = rng.standard_normal(channels) * 0.5
    return fused, plain


@pytest.mark.parametrize("cls, shape, layout, dtype", list(fused_params()))
def test_fused_equals_unfused_composition(cls, shape, layout, dtype):
    """act(bn(x)) and its backward, train then eval, against fastnorm's own layer
    followed by a NumPy activation (and its derivative applied to dy)."""
    for name in ACTIVATIONS:
        fused, plain = make_pair(cls, shape[1], dtype, name, momentum=0.2)
        for step, training in enumerate((True, True, False)):
            fused.train(training)
            plain.train(training)
            x = make_input(shape, dtype, layout, seed=step, mean=0.5, std=1.5)
            dy = make_input(shape, dtype, layout, seed=10 + step)
            y = fused(x)
            z = plain(x)
            assert y.dtype == dtype and y.strides == z.strides
            close(y, act_forward(name, z), dtype)
            dx = fused.backward(dy)
            dz = (dy * act_derivative(name, z)).astype(dtype)
            close(dx, plain.backward(dz), dtype, scale=10)
            for key in ("weight", "bias"):
                close(fused.grads[key], plain.grads[key], dtype, scale=50)
            np.testing.assert_array_equal(fused.running_mean, plain.running_mean)
            np.testing.assert_array_equal(fused.running_var, plain.running_var)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("shape", [(4, 8, 5, 7), (24, 32, 74, 74)],   # the second: 16 MiB and
                         ids=["plain", "streamed"])                   # more in float32
def test_fused_relu_is_bitwise_relu_of_the_unfused_output(shape, layout, dtype):
    """relu is applied in the same sweep as the normalization (fn_affine_relu,
    fn_channels_relu), in place of a second sweep: the values are exactly those of the
    composition."""
    x = make_input(shape, dtype, layout, seed=4, mean=0.5)
    for cls, args in ((fn.BatchNorm2d, (shape[1],)), (fn.GroupNorm, (4, shape[1])),
                      (fn.LayerNorm, (shape[-1],))):
        fused = cls(*args, activation="relu", dtype=dtype)
        plain = cls(*args, dtype=dtype)
        rng = np.random.default_rng(5)
        fused.weight[...] = plain.weight[...] = rng.uniform(0.5, 1.5, fused.weight.shape)
        fused.bias[...] = plain.bias[...] = rng.standard_normal(fused.bias.shape)
        for training in (True, False):
            fused.train(training)
            plain.train(training)
            np.testing.assert_array_equal(fused(x), np.maximum(plain(x), 0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("training", (True, False))
def test_fused_matches_torch_autograd(dtype, layout, training):
    torch = torch_or_skip()
    tF = torch.nn.functional
    torch_act = {"relu": tF.relu, "silu": tF.silu, "gelu": tF.gelu,
                 "gelu_tanh": lambda t: tF.gelu(t, approximate="tanh")}
    shape = (4, 3, 5, 6)
    tol = {np.float32: 1e-5, np.float64: 1e-12}[np.dtype(dtype).type]
    for name in ACTIVATIONS:
        layer = fn.BatchNorm2d(3, activation=name, dtype=dtype)
        layer.weight[...] = [0.7, 1.3, -1.1]
        layer.bias[...] = [0.2, -0.4, 0.1]
        layer.running_mean[...] = [0.1, -0.2, 0.3]
        layer.running_var[...] = [0.8, 1.5, 1.1]
        layer.train(training)
        tw, tb = (torch.tensor(p, requires_grad=True) for p in (layer.weight, layer.bias))
        rm, rv = torch.tensor(layer.running_mean), torch.tensor(layer.running_var)
        x = make_input(shape, dtype, layout, seed=5)
        dy = make_input(shape, dtype, layout, seed=6)
        tx = torch.tensor(np.ascontiguousarray(x), requires_grad=True)
        ty = torch_act[name](tF.batch_norm(tx, rm, rv, tw, tb, training, 0.1, layer.eps))
        ty.backward(torch.tensor(np.ascontiguousarray(dy)))
        y = layer(x)
        dx = layer.backward(dy)
        np.testing.assert_allclose(y, ty.detach().numpy(), atol=tol, rtol=tol)
        np.testing.assert_allclose(dx, tx.grad.numpy(), atol=10 * tol, rtol=10 * tol)
        np.testing.assert_allclose(layer.grads["weight"], tw.grad.numpy(), atol=50 * tol, rtol=tol)
        np.testing.assert_allclose(layer.grads["bias"], tb.grad.numpy(), atol=50 * tol, rtol=tol)
        np.testing.assert_allclose(layer.running_mean, rm.numpy(), atol=tol, rtol=tol)


@pytest.mark.parametrize("shape", [(8, 6, 40, 40), (256, 600), (1000, 64), (4, 2, 300, 300),
                                   (2, 5, 7, 11)])
@pytest.mark.parametrize("name", ("gelu", "silu", "relu"))
def test_fused_bitwise_identical_for_any_thread_count(shape, name):
    """Fused per-channel, split and rows paths, forward and backward (relu's g is formed
    again in the dx pass of the split paths, the others' kept in dx; rows of 64
    channels form relu's g row by row inside the sums)."""
    x = make_input(shape, np.float32, seed=1, mean=2.0)
    dy = make_input(shape, np.float32, seed=2)
    results = []
    for n in (1, 2, 3):
        with num_threads(n):
            layer = fn.BatchNorm1d(shape[1], activation=name) if len(shape) == 2 else \
                fn.BatchNorm2d(shape[1], activation=name)
            y = layer(x)
            results.append((y, layer.backward(dy), layer.grads["weight"], layer.running_var))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_sync_batchnorm_activation_with_a_communicator(dtype, layout):
    """The synchronized path (one process, a summing callable) equals BatchNorm's, on
    channels-last rows and channels-first runs (its backward keeps g in dx for every
    activation; BatchNorm forms relu's g again in the dx pass over runs)."""
    x = make_input((3, 4, 5, 2), dtype, layout, seed=7)
    dy = make_input((3, 4, 5, 2), dtype, seed=8)
    for name in ACTIVATIONS:
        sync = fn.SyncBatchNorm(4, activation=name, comm=lambda a: a.copy(), dtype=dtype)
        bn = fn.BatchNorm2d(4, activation=name, dtype=dtype)
        close(sync(x), bn(x), dtype)
        close(sync.backward(dy), bn.backward(dy), dtype, scale=10)
        close(sync.grads["weight"], bn.grads["weight"], dtype, scale=10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_activation_and_backward(dtype):
    x = make_input((5, 3, 4), dtype, seed=3)
    dy = make_input((5, 3, 4), dtype, seed=4)
    w, b = np.array([1.0, 2.0, -1.0], dtype), np.array([0.0, 0.5, -0.5], dtype)
    rm, rv = np.zeros(3, dtype), np.ones(3, dtype)
    y, mean, invstd = F.native_batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5, activation="silu")
    z = F.batch_norm(x, None, None, w, b, training=True)
    close(y, act_forward("silu", z), dtype)
    close(F.batch_norm(x, rm, rv, w, b, activation="silu"), act_forward("silu", F.batch_norm(x, rm, rv, w, b)), dtype)
    dx, gw, gb = F.batch_norm_backward(dy, x, mean, invstd, w, True, bias=b, activation="silu")
    dz = (dy * act_derivative("silu", z)).astype(dtype)
    expected = F.batch_norm_backward(dz, x, mean, invstd, w, True)
    for got, want in zip((dx, gw, gb), expected):
        close(got, want, dtype, scale=10)


def test_invalid_activation_is_rejected_before_any_change():
    with pytest.raises(ValueError, match="'relu'.*'gelu_tanh'.*got 'tanh'"):
        fn.BatchNorm2d(3, activation="tanh")
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    x = make_input((4, 3, 2, 2))
    with pytest.raises(ValueError, match="activation"):
        F.batch_norm(x, rm, rv, training=True, activation="Relu")
    assert not rm.any() and (rv == 1).all()
    with pytest.raises(ValueError, match="activation"):
        F.batch_norm(x, rm, rv, activation=1)


def test_fused_empty_batch():
    layer = fn.BatchNorm2d(3, activation="gelu")
    x = np.zeros((0, 3, 4, 4), np.float32)
    assert layer(x).shape == x.shape
    assert layer.backward(x).shape == x.shape


# ------------------------------------------------------------ fold_batchnorm

def eval_bn(channels, dtype=np.float64, affine=True, seed=0):
    rng = np.random.default_rng(seed)
    bn = fn.BatchNorm2d(channels, affine=affine, dtype=dtype)
    if affine:
        bn.weight[...] = rng.uniform(0.5, 2.0, channels)
        bn.bias[...] = rng.standard_normal(channels)
    bn.running_mean[...] = rng.standard_normal(channels)
    bn.running_var[...] = rng.uniform(0.5, 2.0, channels)
    return bn.eval()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", (True, False))
@pytest.mark.parametrize("affine", (True, False))
def test_fold_linear(dtype, with_bias, affine):
    rng = np.random.default_rng(1)
    W = rng.standard_normal((5, 7)).astype(dtype)
    b = rng.standard_normal(5).astype(dtype) if with_bias else None
    bn = eval_bn(5, dtype, affine)
    W0, b0 = W.copy(), None if b is None else b.copy()
    x = rng.standard_normal((11, 7)).astype(dtype)
    new_W, new_b = fn.fold_batchnorm(W, b, bn)
    assert new_W.dtype == dtype and new_b.dtype == dtype and new_W is not W
    np.testing.assert_array_equal(W, W0)
    if b is not None:
        np.testing.assert_array_equal(b, b0)
    bn1 = fn.BatchNorm1d(5, affine=affine, dtype=dtype)
    bn1.load_state_dict(bn.state_dict())
    expected = bn1.eval()(x @ W.T + (0 if b is None else b))
    tol = {np.float32: 1e-5, np.float64: 1e-12}[np.dtype(dtype).type]
    np.testing.assert_allclose(x @ new_W.T + new_b, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("transposed", (False, True))
def test_fold_conv_matches_torch(transposed):
    torch = torch_or_skip()
    rng = np.random.default_rng(2)
    bn = eval_bn(6, np.float64)
    x = torch.tensor(rng.standard_normal((2, 4, 9, 9)))
    if transposed:  # ConvTranspose2d weight: (in, out, kh, kw), output channels on axis 1
        W = rng.standard_normal((4, 6, 3, 3))
        conv = lambda w, b: torch.nn.functional.conv_transpose2d(x, torch.tensor(w), torch.tensor(b))
    else:
        W = rng.standard_normal((6, 4, 3, 3))
        conv = lambda w, b: torch.nn.functional.conv2d(x, torch.tensor(w), torch.tensor(b))
    b = rng.standard_normal(6)
    new_W, new_b = fn.fold_batchnorm(W, b, bn, channel_axis=1 if transposed else 0)
    expected = bn(conv(W, b).numpy())
    np.testing.assert_allclose(conv(new_W, new_b).numpy(), expected, atol=1e-12)
    # a torch BatchNorm module is accepted as it is
    tbn = torch.nn.BatchNorm2d(6, dtype=torch.float64).eval()
    tbn.load_state_dict({k: torch.tensor(np.array(v)) for k, v in bn.state_dict().items()})
    W2, b2 = fn.fold_batchnorm(W, b, tbn, channel_axis=1 if transposed else 0)
    np.testing.assert_array_equal(W2, new_W)
    np.testing.assert_array_equal(b2, new_b)


def test_fold_errors():
    W = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="eval"):
        fn.fold_batchnorm(W, None, fn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="running statistics"):
        fn.fold_batchnorm(W, None, fn.BatchNorm1d(4, track_running_stats=False).eval())
    with pytest.raises(ValueError, match="4"):
        fn.fold_batchnorm(W, None, fn.BatchNorm1d(3).eval())
    with pytest.raises(ValueError, match="bias"):
        fn.fold_batchnorm(W, np.ones(3, np.float32), fn.BatchNorm1d(4).eval())
    with pytest.raises(ValueError, match="activation"):
        fn.fold_batchnorm(W, None, fn.BatchNorm1d(4, activation="relu").eval())
    with pytest.raises(TypeError):
        fn.fold_batchnorm(W, None, object())


# -------------------------------------------------------- from_torch/to_torch

def torch_modules(torch):
    """(torch module, input shape) for every layer the interop table names."""
    nn = torch.nn
    return {
        "BatchNorm1d": (nn.BatchNorm1d(3, momentum=0.3), (4, 3, 5)),
        "BatchNorm2d": (nn.BatchNorm2d(3, eps=1e-3), (2, 3, 4, 5)),
        "BatchNorm3d": (nn.BatchNorm3d(3, affine=False), (2, 3, 2, 3, 4)),
        "SyncBatchNorm": (nn.SyncBatchNorm(3, momentum=None), (2, 3, 4, 5)),
        "LayerNorm": (nn.LayerNorm((4, 5), bias=False), (2, 3, 4, 5)),
        "RMSNorm": (nn.RMSNorm(5), (2, 3, 5)),
        "GroupNorm": (nn.GroupNorm(2, 4), (2, 4, 3)),
        "InstanceNorm1d": (nn.InstanceNorm1d(3, affine=True, track_running_stats=True), (2, 3, 7)),
        "InstanceNorm2d": (nn.InstanceNorm2d(3), (2, 3, 4, 4)),
        "InstanceNorm3d": (nn.InstanceNorm3d(3, affine=True), (2, 3, 2, 3, 3)),
        "LocalResponseNorm": (nn.LocalResponseNorm(3, alpha=1e-2), (2, 5, 4, 4)),
    }


def randomize_torch(torch, module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in module.state_dict().values():
            if value.is_floating_point():
                value.copy_(torch.rand(value.shape, generator=gen, dtype=value.dtype) + 0.5)


def test_interop_table_names_every_spec_layer():
    assert set(LAYER_ARGUMENTS) == {
        "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "LayerNorm", "RMSNorm",
        "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LocalResponseNorm"}


@pytest.mark.parametrize("name", sorted(LAYER_ARGUMENTS))
@pytest.mark.parametrize("dtype", ("float32", "float64"))
def test_from_torch_to_torch_round_trip(name, dtype):
    torch = torch_or_skip()
    if not hasattr(fn, name):
        pytest.skip(f"fastnorm has no {name} in this build")
    module, shape = torch_modules(torch)[name]
    module = module.to(getattr(torch, dtype))
    randomize_torch(torch, module)
    tol = {"float32": 2e-5, "float64": 1e-10}[dtype]
    x = make_input(shape, np.dtype(dtype), seed=4, mean=0.3)
    for training in (True, False):
        module.train(training)
        layer = fn.from_torch(module)
        assert type(layer).__name__ == name and layer.training == training
        if any(v.is_floating_point() for v in module.state_dict().values()):
            # (a module without parameters or buffers has no dtype to carry over)
            assert np.dtype(getattr(layer, "dtype", dtype)) == np.dtype(dtype)
        for key, value in module.state_dict().items():
            np.testing.assert_array_equal(getattr(layer, key), value.numpy())
        back = layer.to_torch()
        assert type(back) is type(module) and back.training == training
        for key, value in module.state_dict().items():
            assert torch.equal(back.state_dict()[key], value), key
        if name == "SyncBatchNorm" and training:
            continue  # torch's SyncBatchNorm trains only inside a process group
        with torch.no_grad():
            expected = module(torch.tensor(x)).numpy()
            expected_back = back(torch.tensor(x)).numpy()
        np.testing.assert_array_equal(expected_back, expected)
        np.testing.assert_allclose(layer(x), expected, atol=tol, rtol=tol)
        for key, value in module.state_dict().items():  # buffers updated alike
            np.testing.assert_allclose(getattr(layer, key), value.numpy(), atol=tol, rtol=tol)


def test_activation_round_trips_through_sequential():
    torch = torch_or_skip()
    for name, act in (("relu", torch.nn.ReLU()), ("gelu", torch.nn.GELU()),
                      ("gelu_tanh", torch.nn.GELU(approximate="tanh")), ("silu", torch.nn.SiLU())):
        seq = torch.nn.Sequential(torch.nn.BatchNorm2d(3), act).eval()
        randomize_torch(torch, seq[0])
        layer = fn.from_torch(seq)
        assert layer.activation == name and not layer.training
        x = make_input((2, 3, 4, 4), seed=9)
        with torch.no_grad():
            expected = seq(torch.tensor(x)).numpy()
        np.testing.assert_allclose(layer(x), expected, atol=2e-6, rtol=1e-5)
        back = layer.to_torch()
        assert isinstance(back, torch.nn.Sequential) and type(back[1]) is type(act)
        with torch.no_grad():
            np.testing.assert_array_equal(back(torch.tensor(x)).numpy(), expected)


def test_from_torch_rejects_other_modules():
    torch = torch_or_skip()
    with pytest.raises(TypeError, match="Linear"):
        fn.from_torch(torch.nn.Linear(2, 3))
    with pytest.raises(TypeError, match="float16"):
        fn.from_torch(torch.nn.BatchNorm1d(3).half())
    with pytest.raises(TypeError, match="Sequential"):
        fn.from_torch(torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.Tanh()))
