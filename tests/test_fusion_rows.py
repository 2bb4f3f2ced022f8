"""Fusions of the row family: activation= on LayerNorm, RMSNorm, GroupNorm and
InstanceNorm*, and the fused residual add of LayerNorm/RMSNorm, forward and backward,
against the unfused composition (fastnorm's own layer, then NumPy) and against torch
autograd of the composition."""
import numpy as np
import pytest

import fastnorm as fn
import reference as ref
from fastnorm import functional as F
from helpers import make_input, torch_or_skip
from rows_testing import (
    assert_bitwise_equal, assert_state_unchanged, layer_state, randomize_parameters,
    results_for_thread_counts,
)
from test_fusion import ACTIVATIONS, act_derivative, act_forward, close

DTYPES = (np.float32, np.float64)
# torch autograd (float64) of the composition vs ours, relative to max(1, |value|)
TORCH_TOL = {np.float32: 3e-5, np.float64: 1e-11}


def torch_close(actual, expected, dtype, scale=1.0):
    expected = np.asarray(expected, np.float64)
    err = np.abs(np.asarray(actual, np.float64) - expected) / np.maximum(1.0, np.abs(expected))
    assert err.max(initial=0.0) <= TORCH_TOL[np.dtype(dtype).type] * scale, err.max()


def torch_activation(torch, name):
    tF = torch.nn.functional
    return {"relu": tF.relu, "silu": tF.silu, "gelu": tF.gelu,
            "gelu_tanh": lambda t: tF.gelu(t, approximate="tanh")}[name]


def pair(make, seed=3):
    """(fused, plain): make(activation) twice, with the same random parameters."""
    def build(activation):
        layer = make(activation)
        randomize_parameters(layer, seed)
        return layer
    return build


def check_against_plain(fused, plain, name, x, dy, dtype, grad_scale=50):
    """act(plain(x)) and its backward (plain.backward of dy * act'(z)) equal the fused layer's."""
    y = fused(x)
    z = plain(x)
    assert y.dtype == dtype and y.shape == x.shape and y.strides == z.strides
    close(y, act_forward(name, z), dtype)
    dx = fused.backward(dy)
    dz = (dy * act_derivative(name, z)).astype(dtype)
    close(dx, plain.backward(dz), dtype, scale=10)
    assert fused.grads.keys() == plain.grads.keys()
    for key in fused.grads:
        close(fused.grads[key], plain.grads[key], dtype, scale=grad_scale)


# ------------------------------------------------------ activation: all layers

ROW_CASES = [
    ("LayerNorm", (4, 7, 48), (48,)),
    ("LayerNorm", (5, 6, 8), (6, 8)),
    ("LayerNorm", (3, 5000), (5000,)),        # rows of two units: the by-unit strategy
    ("RMSNorm", (4, 7, 48), (48,)),
    ("RMSNorm", (3, 5000), (5000,)),
]
CHANNEL_CASES = [
    ("GroupNorm", (3, 8, 5, 6), 4),
    ("GroupNorm", (2, 6, 20), 3),
    ("GroupNorm", (2, 4, 70, 70), 2),         # runs of several units, by-unit strategy
    ("InstanceNorm1d", (3, 4, 10), None),
    ("InstanceNorm2d", (2, 3, 5, 6), None),
    ("InstanceNorm3d", (2, 3, 2, 3, 4), None),
]


def make_row_layer(cls_name, normalized_shape, dtype):
    cls = getattr(fn, cls_name)
    return lambda activation: cls(normalized_shape, activation=activation, dtype=dtype)


def make_channel_layer(cls_name, shape, groups, dtype, **kwargs):
    cls = getattr(fn, cls_name)
    if cls_name == "GroupNorm":
        return lambda activation: cls(groups, shape[1], activation=activation, dtype=dtype)
    kwargs.setdefault("affine", True)
    return lambda activation: cls(shape[1], activation=activation, dtype=dtype, **kwargs)


def case_params():
    for cls_name, shape, extra in ROW_CASES + CHANNEL_CASES:
        layouts = ["contiguous", "strided"]
        if cls_name in ("GroupNorm", "InstanceNorm2d", "InstanceNorm3d") and len(shape) >= 4:
            layouts.append("channels_last")
        for layout in layouts:
            for dtype in DTYPES:
                yield pytest.param(cls_name, shape, extra, layout, dtype, id=(
                    f"{cls_name}-{'x'.join(map(str, shape))}-{layout}-{np.dtype(dtype).name}"))


def make_layer_factory(cls_name, shape, extra, dtype):
    if cls_name in ("LayerNorm", "RMSNorm"):
        return make_row_layer(cls_name, extra, dtype)
    return make_channel_layer(cls_name, shape, extra, dtype)


@pytest.mark.parametrize("cls_name, shape, extra, layout, dtype", list(case_params()))
def test_activation_equals_unfused_composition(cls_name, shape, extra, layout, dtype):
    build = pair(make_layer_factory(cls_name, shape, extra, dtype))
    for step, name in enumerate(ACTIVATIONS):
        x = make_input(shape, dtype, layout, seed=step, mean=0.3, std=1.5)
        dy = make_input(shape, dtype, layout, seed=20 + step)
        check_against_plain(build(name), build(None), name, x, dy, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_instance_norm_eval_with_running_stats_and_activation(dtype, layout):
    """Eval with tracked statistics goes through the per-channel kernels."""
    shape = (2, 3, 4, 5)
    build = pair(make_channel_layer("InstanceNorm2d", shape, None, dtype,
                                    track_running_stats=True))
    for name in ACTIVATIONS:
        fused, plain = build(name), build(None)
        for layer in (fused, plain):
            layer.running_mean[...] = [0.1, -0.2, 0.3]
            layer.running_var[...] = [0.8, 1.5, 1.1]
            layer.eval()
        x = make_input(shape, dtype, layout, seed=4)
        check_against_plain(fused, plain, name, x, make_input(shape, dtype, layout, seed=5), dtype)


def torch_module(torch, cls_name, shape, extra):
    nn = torch.nn
    if cls_name == "LayerNorm":
        return nn.LayerNorm(extra, dtype=torch.float64)
    if cls_name == "RMSNorm":
        return nn.RMSNorm(extra, dtype=torch.float64)
    if cls_name == "GroupNorm":
        return nn.GroupNorm(extra, shape[1], dtype=torch.float64)
    return getattr(nn, cls_name)(shape[1], affine=True, dtype=torch.float64)


@pytest.mark.parametrize("cls_name, shape, extra, layout, dtype", list(case_params()))
def test_activation_matches_torch_autograd(cls_name, shape, extra, layout, dtype):
    torch = torch_or_skip()
    for step, name in enumerate(ACTIVATIONS):
        layer = make_layer_factory(cls_name, shape, extra, dtype)(name)
        randomize_parameters(layer, seed=step)
        module = torch_module(torch, cls_name, shape, extra)
        if cls_name == "RMSNorm":
            module.eps = float(np.finfo(dtype).eps)   # fastnorm's eps=None for this dtype
        module.load_state_dict({k: torch.tensor(v.astype(np.float64))
                                for k, v in layer.state_dict().items()})
        x = make_input(shape, dtype, layout, seed=step, mean=0.3, std=1.5)
        dy = make_input(shape, dtype, layout, seed=20 + step)
        xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
        yt = torch_activation(torch, name)(module(xt))
        yt.backward(torch.tensor(np.asarray(dy, np.float64)))
        torch_close(layer(x), yt.detach().numpy(), dtype)
        torch_close(layer.backward(dy), xt.grad.numpy(), dtype, scale=10)
        for key, param in module.named_parameters():
            torch_close(layer.grads[key], param.grad.numpy(), dtype, scale=100)


@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_activation_forms(dtype):
    x = make_input((3, 4, 5, 6), dtype, "channels_last", seed=1)
    dy = make_input((3, 4, 5, 6), dtype, seed=2)
    rng = np.random.default_rng(0)
    w, b = rng.uniform(0.5, 1.5, 4).astype(dtype), rng.standard_normal(4).astype(dtype)
    for name in ACTIVATIONS:
        y, mean, rstd = F.native_group_norm(x, 2, w, b, activation=name)
        z = F.group_norm(x, 2, w, b)
        close(y, act_forward(name, z), dtype)
        close(F.group_norm(x, 2, w, b, activation=name), y, dtype)
        dz = (dy * act_derivative(name, z)).astype(dtype)
        got = F.group_norm_backward(dy, x, 2, mean, rstd, w, bias=b, activation=name)
        for g, want in zip(got, F.group_norm_backward(dz, x, 2, mean, rstd, w)):
            close(g, want, dtype, scale=50)
        y, mean, rstd = F.native_instance_norm(x, weight=w, bias=b, activation=name)
        close(y, act_forward(name, F.instance_norm(x, weight=w, bias=b)), dtype)
        got = F.instance_norm_backward(dy, x, mean, rstd, w, bias=b, activation=name)
        z = F.instance_norm(x, weight=w, bias=b)
        dz = (dy * act_derivative(name, z)).astype(dtype)
        for g, want in zip(got, F.instance_norm_backward(dz, x, mean, rstd, w)):
            close(g, want, dtype, scale=50)
        xr = x.reshape(3, 4, 30)
        close(F.layer_norm(xr, 30, activation=name), act_forward(name, F.layer_norm(xr, 30)),
              dtype)
        close(F.rms_norm(xr, 30, activation=name), act_forward(name, F.rms_norm(xr, 30)), dtype)


# --------------------------------------------------------- fused residual add

def residual_params():
    for cls_name in ("LayerNorm", "RMSNorm"):
        for shape, ns in (((4, 7, 48), (48,)), ((3, 5000), (5000,)), ((2, 3, 4, 5), (4, 5))):
            for layout in ("contiguous", "strided"):
                for dtype in DTYPES:
                    yield pytest.param(cls_name, shape, ns, layout, dtype, id=(
                        f"{cls_name}-{'x'.join(map(str, shape))}-{layout}-"
                        f"{np.dtype(dtype).name}"))


@pytest.mark.parametrize("cls_name, shape, ns, layout, dtype", list(residual_params()))
def test_residual_add_equals_unfused_composition(cls_name, shape, ns, layout, dtype):
    """Without an activation bitwise: h == x + r, y == layer(h), grad == layer.backward(dy)
    + grad_h; with one, close to the NumPy composition."""
    build = pair(make_row_layer(cls_name, ns, dtype))
    x = make_input(shape, dtype, layout, seed=1, mean=0.5)
    r = make_input(shape, dtype, layout, seed=2)
    dy = make_input(shape, dtype, layout, seed=3)
    grad_h = make_input(shape, dtype, layout, seed=4)
    for name in (None,) + ACTIVATIONS:
        fused, plain = build(name), build(None)
        y, h = fused(x, residual=r)
        np.testing.assert_array_equal(h, x + r)
        z = plain(x + r)
        dz = dy if name is None else (dy * act_derivative(name, z)).astype(dtype)
        expected_dx = plain.backward(dz)
        for given in (None, grad_h):
            grad = fused.backward(dy, grad_h=given)
            want = expected_dx if given is None else expected_dx + given
            if name is None:
                np.testing.assert_array_equal(y, z)
                np.testing.assert_array_equal(grad, want)
                for key in plain.grads:
                    np.testing.assert_array_equal(fused.grads[key], plain.grads[key])
            else:
                close(y, act_forward(name, z), dtype)
                close(grad, want, dtype, scale=10)
                for key in plain.grads:
                    close(fused.grads[key], plain.grads[key], dtype, scale=50)


@pytest.mark.parametrize("cls_name, shape, ns, layout, dtype", list(residual_params()))
def test_residual_add_matches_torch_autograd(cls_name, shape, ns, layout, dtype):
    torch = torch_or_skip()
    tF = torch.nn.functional
    x = make_input(shape, dtype, layout, seed=1, mean=0.5)
    r = make_input(shape, dtype, layout, seed=2)
    dy = make_input(shape, dtype, layout, seed=3)
    grad_h = make_input(shape, dtype, layout, seed=4)
    for name in (None, "gelu", "silu"):
        layer = make_row_layer(cls_name, ns, dtype)(name)
        randomize_parameters(layer, seed=5)
        xt, rt = (torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in (x, r))
        params = {k: torch.tensor(v.astype(np.float64), requires_grad=True)
                  for k, v in layer.state_dict().items()}
        ht = xt + rt
        if cls_name == "LayerNorm":
            zt = tF.layer_norm(ht, ns, params["weight"], params["bias"], layer.eps)
        else:
            zt = tF.rms_norm(ht, ns, params["weight"], float(np.finfo(dtype).eps))
        yt = zt if name is None else torch_activation(torch, name)(zt)
        torch.autograd.backward((yt, ht), (torch.tensor(np.asarray(dy, np.float64)),
                                           torch.tensor(np.asarray(grad_h, np.float64))))
        y, h = layer(x, residual=r)
        grad = layer.backward(dy, grad_h=grad_h)
        torch_close(y, yt.detach().numpy(), dtype)
        torch_close(h, ht.detach().numpy(), dtype)
        torch_close(grad, xt.grad.numpy(), dtype, scale=10)
        torch_close(grad, rt.grad.numpy(), dtype, scale=10)
        for key, param in params.items():
            torch_close(layer.grads[key], param.grad.numpy(), dtype, scale=100)


@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_residual_forms_against_float64_reference(dtype):
    x = make_input((6, 40), dtype, seed=1)
    r = make_input((6, 40), dtype, "strided", seed=2)
    dy = make_input((6, 40), dtype, seed=3)
    grad_h = make_input((6, 40), dtype, seed=4)
    rng = np.random.default_rng(0)
    w, b = rng.uniform(0.5, 1.5, 40).astype(dtype), rng.standard_normal(40).astype(dtype)
    h64 = np.asarray(x, np.float64) + r

    y, h = F.add_layer_norm(x, r, 40, w, b)
    np.testing.assert_array_equal(h, x + r)
    close(y, ref.layer_norm_forward(h64, (40,), w, b), dtype)
    y, h, mean, rstd = F.native_add_layer_norm(x, r, 40, w, b, activation="relu")
    close(y, act_forward("relu", ref.layer_norm_forward(h64, (40,), w, b)), dtype)
    grad, gw, gb = F.add_layer_norm_backward(dy, h, 40, mean, rstd, w, grad_h, bias=b,
                                             activation="relu")
    z = ref.layer_norm_forward(h, (40,), w, b)
    want = ref.layer_norm_backward(h, dy * act_derivative("relu", z), (40,), w)
    close(grad, want[0] + grad_h, dtype, scale=10)
    close(gw, want[1], dtype, scale=50)
    close(gb, want[2], dtype, scale=50)

    y, h = F.add_rms_norm(x, r, 40, w)
    close(y, ref.rms_norm_forward(h64, (40,), w, float(np.finfo(dtype).eps)), dtype)
    y, h, rstd = F.native_add_rms_norm(x, r, 40, w, eps=1e-6)
    grad, gw = F.add_rms_norm_backward(dy, h, 40, rstd, w)
    want = ref.rms_norm_backward(h, dy, (40,), w, 1e-6)
    close(grad, want[0], dtype, scale=10)
    close(gw, want[1], dtype, scale=50)
    # out= receives y; h is a new array
    out = np.empty_like(x)
    y, h = F.add_rms_norm(x, r, 40, w, out=out)
    assert y is out and not np.may_share_memory(h, out)


def test_residual_empty_rows():
    layer = fn.LayerNorm(8)
    x = np.zeros((0, 8), np.float32)
    y, h = layer(x, residual=x.copy())
    assert y.shape == h.shape == (0, 8)
    assert layer.backward(x, grad_h=x).shape == (0, 8)


# ------------------------------------------------------- thread invariance

@pytest.mark.parametrize("name", ("gelu", "silu"))
@pytest.mark.parametrize("cls_name, shape", [("LayerNorm", (64, 768)), ("LayerNorm", (3, 9000)),
                                             ("LayerNorm", (259, 384)),   # rows one by one
                                             ("RMSNorm", (64, 768)), ("RMSNorm", (2, 9000))])
def test_row_fusions_bitwise_identical_for_any_thread_count(cls_name, shape, name):
    x = make_input(shape, np.float32, seed=1, mean=2.0)
    r = make_input(shape, np.float32, seed=2)
    dy = make_input(shape, np.float32, seed=3)
    grad_h = make_input(shape, np.float32, seed=4)

    def run():
        layer = getattr(fn, cls_name)(shape[-1], activation=name)
        randomize_parameters(layer)
        y, h = layer(x, residual=r)
        grad = layer.backward(dy, grad_h=grad_h)
        return (y, h, grad, layer.grads["weight"])
    assert_bitwise_equal(results_for_thread_counts(run))


@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("shape, groups", [((2, 64, 40, 40), 2), ((4, 64, 12, 12), 32),
                                           ((1, 32, 20, 20), 8)])
def test_group_norm_activation_bitwise_identical_for_any_thread_count(shape, groups, layout):
    x = make_input(shape, np.float32, layout, seed=1, mean=1.0)
    dy = make_input(shape, np.float32, layout, seed=2)

    def run():
        layer = fn.GroupNorm(groups, shape[1], activation="silu")
        randomize_parameters(layer)
        y = layer(x)
        return (y, layer.backward(dy), layer.grads["weight"], layer.grads["bias"])
    assert_bitwise_equal(results_for_thread_counts(run))


# --------------------------------------------------------------- validation

@pytest.mark.parametrize("cls_name", ("LayerNorm", "RMSNorm"))
def test_bad_residual_is_rejected_before_any_state_change(cls_name):
    layer = getattr(fn, cls_name)(8)
    x = make_input((3, 8), seed=1)
    y, h = layer(x, residual=x)
    saved, before = layer._saved, layer_state(layer)
    bad = [(ValueError, make_input((3, 9))), (ValueError, make_input((8,))),
           (TypeError, x.astype(np.float64)), (TypeError, x.tolist()),
           (TypeError, x.astype(np.int32))]
    for error, residual in bad:
        with pytest.raises(error, match="residual"):
            layer(x, residual=residual)
        assert layer._saved is saved
    layer.backward(x, grad_h=x)
    grads = layer.grads
    for error, grad_h in bad:
        with pytest.raises(error, match="grad_h"):
            layer.backward(x, grad_h=grad_h)
        assert layer.grads is grads
    assert_state_unchanged(layer, before)
    with pytest.raises(ValueError, match="out must not overlap the residual"):
        layer(x, residual=h, out=h)
    layer(x)
    with pytest.raises(ValueError, match="grad_h is accepted only after a forward with residual"):
        layer.backward(x, grad_h=x)


def test_functional_validation():
    x = make_input((3, 8), seed=1)
    with pytest.raises(ValueError, match="residual"):
        F.add_layer_norm(x, x[:2], 8)
    with pytest.raises(TypeError, match="residual"):
        F.add_rms_norm(x, x.astype(np.float64), 8)
    with pytest.raises(ValueError, match="activation"):
        F.add_layer_norm(x, x, 8, activation="tanh")
    with pytest.raises(ValueError, match="activation"):
        F.group_norm(make_input((2, 4, 3)), 2, activation="Relu")
    y, h, rstd = F.native_add_rms_norm(x, x, 8)
    with pytest.raises(ValueError, match="grad_h"):
        F.add_rms_norm_backward(x, h, 8, rstd, grad_h=x[:, :4])
    for cls in (fn.LayerNorm, fn.RMSNorm):
        with pytest.raises(ValueError, match="activation"):
            cls(8, activation="tanh")
    with pytest.raises(ValueError, match="activation"):
        fn.GroupNorm(2, 4, activation="swish")
    with pytest.raises(ValueError, match="activation"):
        fn.InstanceNorm2d(4, activation=0)


# ------------------------------------------------------------------- interop

@pytest.mark.parametrize("make, shape", [
    (lambda: fn.LayerNorm(12, activation="gelu"), (3, 5, 12)),
    (lambda: fn.RMSNorm(12, activation="gelu_tanh", dtype=np.float64), (3, 12)),
    (lambda: fn.GroupNorm(2, 6, activation="silu"), (2, 6, 4, 4)),
    (lambda: fn.InstanceNorm1d(6, affine=True, activation="relu"), (2, 6, 9)),
])
def test_fused_layers_convert_to_torch_sequential_and_back(make, shape):
    torch = torch_or_skip()
    layer = make()
    randomize_parameters(layer)
    module = layer.to_torch()
    assert isinstance(module, torch.nn.Sequential) and len(module) == 2
    x = make_input(shape, layer.dtype, seed=1)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    close(layer(x), expected, layer.dtype)
    back = fn.from_torch(module)
    assert type(back) is type(layer) and back.activation == layer.activation
    np.testing.assert_array_equal(back(x), layer(x))
    assert repr(back) == repr(layer) and f"activation={layer.activation!r}" in repr(layer)
