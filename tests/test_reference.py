"""Checks of the NumPy oracle in tests/reference.py.

* against PyTorch in float64 (forward, running statistics, every gradient),
  skipped cleanly when torch is not installed;
* against central finite differences on tiny shapes (no torch needed).

This file never imports fastnorm.
"""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402

RTOL = 1e-10
ATOL = 1e-10
# finite differences with h=1e-6 are good to ~1e-9 relative here
FD_RTOL = 1e-6
FD_ATOL = 1e-7


def close(actual, expected, rtol=RTOL, atol=ATOL, what=""):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected),
                               rtol=rtol, atol=atol, err_msg=what)


def rand(rng, *shape, loc=0.0, scale=1.0):
    return rng.normal(loc, scale, size=shape)


# ==========================================================================
# torch comparison helpers
# ==========================================================================

@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def T(torch, a, grad=False):
    """float64 tensor (a copy) from a NumPy array, or None."""
    if a is None:
        return None
    return torch.tensor(np.asarray(a, dtype=np.float64), dtype=torch.float64,
                        requires_grad=grad)


def torch_grads(torch, out, dy, *tensors):
    """Backprop dy through out; return the .grad of each tensor (None stays None)."""
    need = [t for t in tensors if t is not None and t.requires_grad]
    gs = torch.autograd.grad(out, need, grad_outputs=T(torch, dy), allow_unused=True)
    it = iter(gs)
    res = []
    for t in tensors:
        if t is not None and t.requires_grad:
            g = next(it)
            res.append(None if g is None else g.detach().numpy())
        else:
            res.append(None)
    return res


# ==========================================================================
# BatchNorm vs torch
# ==========================================================================

BN_SHAPES = [(2, 1), (2, 3), (3, 5), (2, 1, 1), (3, 5, 7), (2, 3, 4, 5), (2, 3, 2, 3, 4),
             (5, 2, 3)]


@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("momentum", [0.1, 0.7])
def test_batch_norm_train_vs_torch(torch, shape, affine, momentum):
    F = torch.nn.functional
    rng = np.random.default_rng(1)
    C = shape[1]
    x = rand(rng, *shape, loc=0.5, scale=2.0)
    w = rand(rng, C) if affine else None
    b = rand(rng, C) if affine else None
    rm = rand(rng, C)
    rv = rng.uniform(0.5, 2.0, C)
    dy = rand(rng, *shape)
    eps = 1e-5

    res = ref.batch_norm_forward(x, w, b, eps, running_mean=rm, running_var=rv,
                                 training=True, momentum=momentum, num_batches_tracked=3)
    gx, gw, gb = ref.batch_norm_backward(x, dy, w, eps, training=True)

    xt, wt, bt = T(torch, x, True), T(torch, w, True), T(torch, b, True)
    rmt, rvt = T(torch, rm), T(torch, rv)
    yt = F.batch_norm(xt, rmt, rvt, wt, bt, training=True, momentum=momentum, eps=eps)
    tgx, tgw, tgb = torch_grads(torch, yt, dy, xt, wt, bt)

    close(res.y, yt.detach().numpy(), what="y")
    close(res.running_mean, rmt.numpy(), what="running_mean")
    close(res.running_var, rvt.numpy(), what="running_var")
    assert res.num_batches_tracked == 4
    axes = (0,) + tuple(range(2, len(shape)))
    close(res.mean, x.mean(axis=axes), what="mean")
    close(res.var, x.var(axis=axes), what="var")
    close(gx, tgx, what="grad_input")
    if affine:
        close(gw, tgw, what="grad_weight")
        close(gb, tgb, what="grad_bias")
    # the arguments are not modified
    assert not np.shares_memory(res.running_mean, rm)


@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_eval_vs_torch(torch, shape, affine):
    F = torch.nn.functional
    rng = np.random.default_rng(2)
    C = shape[1]
    x = rand(rng, *shape)
    w = rand(rng, C) if affine else None
    b = rand(rng, C) if affine else None
    rm = rand(rng, C)
    rv = rng.uniform(0.5, 2.0, C)
    dy = rand(rng, *shape)
    eps = 1e-3

    res = ref.batch_norm_forward(x, w, b, eps, running_mean=rm, running_var=rv,
                                 training=False)
    gx, gw, gb = ref.batch_norm_backward(x, dy, w, eps, training=False,
                                         running_var=rv, running_mean=rm)

    xt = T(torch, x, True)
    wt = T(torch, w if affine else np.ones(C), True)
    bt = T(torch, b if affine else np.zeros(C), True)
    yt = F.batch_norm(xt, T(torch, rm), T(torch, rv), wt, bt, training=False, eps=eps)
    tgx, tgw, tgb = torch_grads(torch, yt, dy, xt, wt, bt)

    close(res.y, yt.detach().numpy(), what="y")
    assert res.running_mean is None and res.running_var is None
    assert res.num_batches_tracked == 0
    close(gx, tgx, what="grad_input")
    # grads of the affine parameters are returned even when weight/bias are None
    close(gw, tgw, what="grad_weight")
    close(gb, tgb, what="grad_bias")


@pytest.mark.parametrize("shape", [(2, 1, 3), (4, 3, 5), (3, 5, 2, 2)])
def test_batch_norm_module_cumulative_and_eval_vs_torch(torch, shape):
    """nn.BatchNorm with momentum=None over several steps, then eval."""
    rng = np.random.default_rng(3)
    C = shape[1]
    mod_cls = {3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}[len(shape)]
    for momentum in (None, 0.3):
        mod = mod_cls(C, momentum=momentum).double()
        w, b = rand(rng, C), rand(rng, C)
        with torch.no_grad():
            mod.weight.copy_(T(torch, w))
            mod.bias.copy_(T(torch, b))
        rm, rv, nbt = np.zeros(C), np.ones(C), 0
        for _ in range(4):
            x = rand(rng, *shape, loc=1.0)
            res = ref.batch_norm_forward(x, w, b, 1e-5, rm, rv, True, momentum, nbt)
            rm, rv, nbt = res.running_mean, res.running_var, res.num_batches_tracked
            yt = mod(T(torch, x))
            close(res.y, yt.detach().numpy(), what="train y")
            close(rm, mod.running_mean.numpy(), what="running_mean")
            close(rv, mod.running_var.numpy(), what="running_var")
            assert nbt == int(mod.num_batches_tracked)
        mod.eval()
        x = rand(rng, *shape)
        res = ref.batch_norm_forward(x, w, b, 1e-5, rm, rv, training=False)
        close(res.y, mod(T(torch, x)).detach().numpy(), what="eval y")


def test_batch_norm_cumulative_average_is_plain_mean():
    rng = np.random.default_rng(4)
    xs = [rand(rng, 4, 3, 5) for _ in range(3)]
    rm, rv, nbt = rand(rng, 3), rng.uniform(1, 2, 3), 0
    for x in xs:
        res = ref.batch_norm_forward(x, None, None, 1e-5, rm, rv, True, None, nbt)
        rm, rv, nbt = res.running_mean, res.running_var, res.num_batches_tracked
    close(rm, np.mean([x.mean(axis=(0, 2)) for x in xs], axis=0))
    close(rv, np.mean([x.var(axis=(0, 2), ddof=1) for x in xs], axis=0))
    assert nbt == 3


def test_batch_norm_no_running_stats_uses_batch_stats():
    rng = np.random.default_rng(5)
    x = rand(rng, 3, 2, 4)
    a = ref.batch_norm_forward(x, None, None, 1e-5, training=False)
    b = ref.batch_norm_forward(x, None, None, 1e-5, training=True)
    close(a.y, b.y)
    assert a.running_mean is None and b.running_mean is None


def test_batch_norm_one_value_per_channel_raises():
    with pytest.raises(ValueError):
        ref.batch_norm_forward(np.ones((1, 3)), None, None, 1e-5, np.zeros(3), np.ones(3))


# ==========================================================================
# LayerNorm vs torch
# ==========================================================================

LN_CASES = [((3, 5, 7), (7,)), ((3, 5, 7), (5, 7)), ((3, 5, 7), (3, 5, 7)),
            ((4, 1), (1,)), ((2, 3, 1), (3, 1)), ((6,), (6,)), ((2, 2, 3, 4), (3, 4))]


@pytest.mark.parametrize("shape,ns", LN_CASES)
@pytest.mark.parametrize("use_w,use_b", [(True, True), (True, False), (False, False)])
def test_layer_norm_vs_torch(torch, shape, ns, use_w, use_b):
    F = torch.nn.functional
    rng = np.random.default_rng(10)
    x = rand(rng, *shape, loc=-1.0, scale=3.0)
    w = rand(rng, *ns) if use_w else None
    b = rand(rng, *ns) if use_b else None
    dy = rand(rng, *shape)
    eps = 1e-5

    y = ref.layer_norm_forward(x, ns, w, b, eps)
    gx, gw, gb = ref.layer_norm_backward(x, dy, ns, w, eps)

    xt = T(torch, x, True)
    wt = T(torch, w if use_w else np.ones(ns), True)
    bt = T(torch, b if use_b else np.zeros(ns), True)
    yt = F.layer_norm(xt, ns, wt, bt, eps)
    tgx, tgw, tgb = torch_grads(torch, yt, dy, xt, wt, bt)

    close(y, yt.detach().numpy(), what="y")
    close(gx, tgx, what="grad_input")
    close(gw, tgw, what="grad_weight")
    close(gb, tgb, what="grad_bias")


def test_layer_norm_module_without_bias_vs_torch(torch):
    rng = np.random.default_rng(11)
    mod = torch.nn.LayerNorm((5, 7), bias=False).double()
    w = rand(rng, 5, 7)
    with torch.no_grad():
        mod.weight.copy_(T(torch, w))
    x, dy = rand(rng, 3, 5, 7), rand(rng, 3, 5, 7)
    xt = T(torch, x, True)
    yt = mod(xt)
    tgx, tgw = torch_grads(torch, yt, dy, xt, mod.weight)
    close(ref.layer_norm_forward(x, (5, 7), w, None), yt.detach().numpy())
    gx, gw, _ = ref.layer_norm_backward(x, dy, (5, 7), w)
    close(gx, tgx)
    close(gw, tgw)


def test_layer_norm_int_normalized_shape():
    rng = np.random.default_rng(12)
    x = rand(rng, 3, 4)
    close(ref.layer_norm_forward(x, 4), ref.layer_norm_forward(x, (4,)))


# ==========================================================================
# RMSNorm vs torch
# ==========================================================================

@pytest.mark.parametrize("shape,ns", LN_CASES)
@pytest.mark.parametrize("use_w", [True, False])
@pytest.mark.parametrize("eps", [None, 1e-6])
def test_rms_norm_vs_torch(torch, shape, ns, use_w, eps):
    F = torch.nn.functional
    rng = np.random.default_rng(20)
    x = rand(rng, *shape, loc=0.3, scale=2.0)
    w = rand(rng, *ns) if use_w else None
    dy = rand(rng, *shape)

    y = ref.rms_norm_forward(x, ns, w, eps)
    gx, gw = ref.rms_norm_backward(x, dy, ns, w, eps)

    xt = T(torch, x, True)
    wt = T(torch, w if use_w else np.ones(ns), True)
    yt = F.rms_norm(xt, ns, wt, eps)
    tgx, tgw = torch_grads(torch, yt, dy, xt, wt)

    close(y, yt.detach().numpy(), what="y")
    close(gx, tgx, what="grad_input")
    close(gw, tgw, what="grad_weight")


def test_rms_norm_default_eps_follows_input_dtype():
    x32 = np.array([[1e-5, -2e-5, 3e-5]], dtype=np.float32)
    x64 = x32.astype(np.float64)
    close(ref.rms_norm_forward(x32, 3), ref.rms_norm_forward(x64, 3, eps=float(np.finfo(np.float32).eps)))
    close(ref.rms_norm_forward(x64, 3), ref.rms_norm_forward(x64, 3, eps=float(np.finfo(np.float64).eps)))


def test_rms_norm_float32_default_eps_vs_torch(torch):
    rng = np.random.default_rng(21)
    x = (rand(rng, 2, 8) * 1e-3).astype(np.float32)
    yt = torch.nn.functional.rms_norm(torch.tensor(x), (8,))  # eps = finfo(float32).eps
    close(ref.rms_norm_forward(x, (8,)), yt.numpy(), rtol=1e-6, atol=1e-6)


# ==========================================================================
# GroupNorm vs torch
# ==========================================================================

GN_CASES = [((2, 6, 5), 1), ((2, 6, 5), 2), ((2, 6, 5), 3), ((2, 6, 5), 6),
            ((3, 5, 7), 1), ((3, 5, 7), 5), ((1, 1, 4), 1), ((2, 4), 2), ((2, 4), 4),
            ((1, 6, 2, 3), 3), ((2, 4, 2, 3, 2), 2)]


@pytest.mark.parametrize("shape,G", GN_CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_vs_torch(torch, shape, G, affine):
    F = torch.nn.functional
    rng = np.random.default_rng(30)
    C = shape[1]
    x = rand(rng, *shape, loc=2.0, scale=1.5)
    w = rand(rng, C) if affine else None
    b = rand(rng, C) if affine else None
    dy = rand(rng, *shape)
    eps = 1e-5

    y = ref.group_norm_forward(x, G, w, b, eps)
    gx, gw, gb = ref.group_norm_backward(x, dy, G, w, eps)

    xt = T(torch, x, True)
    wt = T(torch, w if affine else np.ones(C), True)
    bt = T(torch, b if affine else np.zeros(C), True)
    yt = F.group_norm(xt, G, wt, bt, eps)
    tgx, tgw, tgb = torch_grads(torch, yt, dy, xt, wt, bt)

    close(y, yt.detach().numpy(), what="y")
    close(gx, tgx, what="grad_input")
    close(gw, tgw, what="grad_weight")
    close(gb, tgb, what="grad_bias")


# ==========================================================================
# InstanceNorm vs torch
# ==========================================================================

IN_SHAPES = [(2, 1, 3), (3, 5, 7), (1, 3, 4), (2, 3, 4, 5), (2, 2, 2, 3, 2), (1, 1, 2)]


@pytest.mark.parametrize("shape", IN_SHAPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_instance_norm_input_stats_vs_torch(torch, shape, affine, track):
    F = torch.nn.functional
    rng = np.random.default_rng(40)
    C = shape[1]
    x = rand(rng, *shape, loc=-0.5, scale=2.0)
    w = rand(rng, C) if affine else None
    b = rand(rng, C) if affine else None
    rm = rand(rng, C) if track else None
    rv = rng.uniform(0.5, 2.0, C) if track else None
    dy = rand(rng, *shape)
    eps, momentum = 1e-5, 0.2

    res = ref.instance_norm_forward(x, w, b, eps, rm, rv, True, momentum)
    gx, gw, gb = ref.instance_norm_backward(x, dy, w, eps)

    xt = T(torch, x, True)
    wt = T(torch, w if affine else np.ones(C), True)
    bt = T(torch, b if affine else np.zeros(C), True)
    rmt, rvt = T(torch, rm), T(torch, rv)
    yt = F.instance_norm(xt, rmt, rvt, wt, bt, use_input_stats=True, momentum=momentum,
                         eps=eps)
    tgx, tgw, tgb = torch_grads(torch, yt, dy, xt, wt, bt)

    close(res.y, yt.detach().numpy(), what="y")
    if track:
        close(res.running_mean, rmt.numpy(), what="running_mean")
        close(res.running_var, rvt.numpy(), what="running_var")
        assert res.num_batches_tracked == 1
    else:
        assert res.running_mean is None and res.num_batches_tracked == 0
    spatial = tuple(range(2, len(shape)))
    close(res.mean, x.mean(axis=spatial), what="mean")
    close(res.var, x.var(axis=spatial), what="var")
    close(gx, tgx, what="grad_input")
    close(gw, tgw, what="grad_weight")
    close(gb, tgb, what="grad_bias")


@pytest.mark.parametrize("shape", IN_SHAPES)
def test_instance_norm_running_stats_eval_vs_torch(torch, shape):
    F = torch.nn.functional
    rng = np.random.default_rng(41)
    C = shape[1]
    x = rand(rng, *shape)
    w, b = rand(rng, C), rand(rng, C)
    rm, rv = rand(rng, C), rng.uniform(0.5, 2.0, C)
    dy = rand(rng, *shape)
    eps = 1e-4

    res = ref.instance_norm_forward(x, w, b, eps, rm, rv, use_input_stats=False)
    gx, gw, gb = ref.instance_norm_backward(x, dy, w, eps, rm, rv, use_input_stats=False)

    xt, wt, bt = T(torch, x, True), T(torch, w, True), T(torch, b, True)
    yt = F.instance_norm(xt, T(torch, rm), T(torch, rv), wt, bt, use_input_stats=False,
                         eps=eps)
    tgx, tgw, tgb = torch_grads(torch, yt, dy, xt, wt, bt)

    close(res.y, yt.detach().numpy(), what="y")
    assert res.running_mean is None
    close(gx, tgx, what="grad_input")
    close(gw, tgw, what="grad_weight")
    close(gb, tgb, what="grad_bias")


def test_instance_norm_module_steps_vs_torch(torch):
    """nn.InstanceNorm2d(track_running_stats=True): several train steps, then eval."""
    rng = np.random.default_rng(42)
    C = 3
    mod = torch.nn.InstanceNorm2d(C, affine=True, track_running_stats=True,
                                  momentum=0.25).double()
    w, b = rand(rng, C), rand(rng, C)
    with torch.no_grad():
        mod.weight.copy_(T(torch, w))
        mod.bias.copy_(T(torch, b))
    rm, rv = np.zeros(C), np.ones(C)
    for _ in range(3):
        x = rand(rng, 2, C, 3, 4, loc=1.0)
        res = ref.instance_norm_forward(x, w, b, 1e-5, rm, rv, True, 0.25)
        rm, rv = res.running_mean, res.running_var
        close(res.y, mod(T(torch, x)).detach().numpy())
        close(rm, mod.running_mean.numpy())
        close(rv, mod.running_var.numpy())
    mod.eval()
    x = rand(rng, 2, C, 3, 4)
    res = ref.instance_norm_forward(x, w, b, 1e-5, rm, rv, use_input_stats=False)
    close(res.y, mod(T(torch, x)).detach().numpy())


def test_instance_norm_cumulative_average():
    """momentum=None: fastnorm keeps a cumulative average (PyTorch would not update)."""
    rng = np.random.default_rng(43)
    xs = [rand(rng, 3, 2, 5) for _ in range(3)]
    rm, rv, nbt = rand(rng, 2), rng.uniform(1, 2, 2), 0
    for x in xs:
        res = ref.instance_norm_forward(x, None, None, 1e-5, rm, rv, True, None, nbt)
        rm, rv, nbt = res.running_mean, res.running_var, res.num_batches_tracked
    close(rm, np.mean([x.mean(axis=(0, 2)) for x in xs], axis=0))
    close(rv, np.mean([x.var(axis=2, ddof=1).mean(axis=0) for x in xs], axis=0))
    assert nbt == 3


# ==========================================================================
# LocalResponseNorm vs torch
# ==========================================================================

LRN_SHAPES = [(2, 5, 7), (1, 1, 4), (2, 3, 4, 5), (1, 4, 2, 3, 2), (3, 7, 2)]
LRN_SIZES = [1, 2, 3, 4, 5, 6, 8, 11]


@pytest.mark.parametrize("shape", LRN_SHAPES)
@pytest.mark.parametrize("size", LRN_SIZES)
@pytest.mark.parametrize("alpha,beta,k", [(1e-4, 0.75, 1.0), (0.9, 0.6, 0.5), (2.0, 1.3, 2.0)])
def test_lrn_vs_torch(torch, shape, size, alpha, beta, k):
    F = torch.nn.functional
    rng = np.random.default_rng(50)
    x = rand(rng, *shape, scale=1.5)
    dy = rand(rng, *shape)

    y = ref.local_response_norm_forward(x, size, alpha, beta, k)
    gx = ref.local_response_norm_backward(x, dy, size, alpha, beta, k)

    xt = T(torch, x, True)
    yt = F.local_response_norm(xt, size, alpha, beta, k)
    (tgx,) = torch_grads(torch, yt, dy, xt)

    close(y, yt.detach().numpy(), what="y")
    close(gx, tgx, what="grad_input")


def test_lrn_rejects_2d():
    with pytest.raises(ValueError):
        ref.local_response_norm_forward(np.ones((2, 3)), 2)


# ==========================================================================
# finite differences (no torch)
# ==========================================================================

def fd_check(f, x, dy, analytic, what):
    close(analytic, ref.finite_difference_grad(f, x, dy), rtol=FD_RTOL, atol=FD_ATOL,
          what=what)


def test_finite_difference_grad_on_known_function():
    rng = np.random.default_rng(60)
    x, dy = rand(rng, 2, 3), rand(rng, 2, 3)
    x_before = x.copy()
    g = ref.finite_difference_grad(lambda a: np.sin(a) * a, x, dy)
    close(g, dy * (np.cos(x) * x + np.sin(x)), rtol=1e-8, atol=1e-9)
    assert np.array_equal(x, x_before)


@pytest.mark.parametrize("shape", [(2, 1), (2, 3), (3, 2, 2), (2, 2, 1, 3)])
def test_batch_norm_train_fd(shape):
    rng = np.random.default_rng(61)
    C = shape[1]
    x, dy = rand(rng, *shape), rand(rng, *shape)
    w, b = rand(rng, C), rand(rng, C)
    eps = 1e-3
    gx, gw, gb = ref.batch_norm_backward(x, dy, w, eps, training=True)

    def fwd(x_, w_, b_):
        return ref.batch_norm_forward(x_, w_, b_, eps, training=True).y

    fd_check(lambda a: fwd(a, w, b), x, dy, gx, "grad_input")
    fd_check(lambda a: fwd(x, a, b), w, dy, gw, "grad_weight")
    fd_check(lambda a: fwd(x, w, a), b, dy, gb, "grad_bias")
    # weight=None behaves as weight=1
    gx1, _, _ = ref.batch_norm_backward(x, dy, None, eps)
    fd_check(lambda a: fwd(a, None, None), x, dy, gx1, "grad_input no affine")


@pytest.mark.parametrize("shape", [(1, 2), (2, 3, 2)])
def test_batch_norm_eval_fd(shape):
    rng = np.random.default_rng(62)
    C = shape[1]
    x, dy = rand(rng, *shape), rand(rng, *shape)
    w, b = rand(rng, C), rand(rng, C)
    rm, rv = rand(rng, C), rng.uniform(0.5, 2, C)
    eps = 1e-3
    gx, gw, gb = ref.batch_norm_backward(x, dy, w, eps, training=False, running_var=rv,
                                         running_mean=rm)

    def fwd(x_, w_, b_):
        return ref.batch_norm_forward(x_, w_, b_, eps, rm, rv, training=False).y

    fd_check(lambda a: fwd(a, w, b), x, dy, gx, "grad_input")
    fd_check(lambda a: fwd(x, a, b), w, dy, gw, "grad_weight")
    fd_check(lambda a: fwd(x, w, a), b, dy, gb, "grad_bias")


@pytest.mark.parametrize("shape,ns", [((2, 3), (3,)), ((2, 2, 3), (2, 3)), ((2, 1, 2), (2, 1, 2)),
                                      ((3, 1), (1,))])
def test_layer_norm_fd(shape, ns):
    rng = np.random.default_rng(63)
    x, dy = rand(rng, *shape), rand(rng, *shape)
    w, b = rand(rng, *ns), rand(rng, *ns)
    eps = 1e-3
    gx, gw, gb = ref.layer_norm_backward(x, dy, ns, w, eps)
    fd_check(lambda a: ref.layer_norm_forward(a, ns, w, b, eps), x, dy, gx, "grad_input")
    fd_check(lambda a: ref.layer_norm_forward(x, ns, a, b, eps), w, dy, gw, "grad_weight")
    fd_check(lambda a: ref.layer_norm_forward(x, ns, w, a, eps), b, dy, gb, "grad_bias")
    gx1, _, _ = ref.layer_norm_backward(x, dy, ns, None, eps)
    fd_check(lambda a: ref.layer_norm_forward(a, ns, None, None, eps), x, dy, gx1,
             "grad_input no affine")


@pytest.mark.parametrize("shape,ns", [((2, 3), (3,)), ((2, 2, 3), (2, 3)), ((3, 1), (1,))])
@pytest.mark.parametrize("eps", [1e-3, None])
def test_rms_norm_fd(shape, ns, eps):
    rng = np.random.default_rng(64)
    x, dy = rand(rng, *shape), rand(rng, *shape)
    w = rand(rng, *ns)
    gx, gw = ref.rms_norm_backward(x, dy, ns, w, eps)
    fd_check(lambda a: ref.rms_norm_forward(a, ns, w, eps), x, dy, gx, "grad_input")
    fd_check(lambda a: ref.rms_norm_forward(x, ns, a, eps), w, dy, gw, "grad_weight")


@pytest.mark.parametrize("shape,G", [((2, 4, 3), 2), ((1, 3, 2), 1), ((2, 3, 2), 3),
                                     ((2, 4), 2), ((1, 2, 2, 2), 1)])
def test_group_norm_fd(shape, G):
    rng = np.random.default_rng(65)
    C = shape[1]
    x, dy = rand(rng, *shape), rand(rng, *shape)
    w, b = rand(rng, C), rand(rng, C)
    eps = 1e-3
    gx, gw, gb = ref.group_norm_backward(x, dy, G, w, eps)
    fd_check(lambda a: ref.group_norm_forward(a, G, w, b, eps), x, dy, gx, "grad_input")
    fd_check(lambda a: ref.group_norm_forward(x, G, a, b, eps), w, dy, gw, "grad_weight")
    fd_check(lambda a: ref.group_norm_forward(x, G, w, a, eps), b, dy, gb, "grad_bias")


@pytest.mark.parametrize("shape", [(2, 2, 3), (1, 1, 2), (2, 1, 2, 2)])
@pytest.mark.parametrize("use_input_stats", [True, False])
def test_instance_norm_fd(shape, use_input_stats):
    rng = np.random.default_rng(66)
    C = shape[1]
    x, dy = rand(rng, *shape), rand(rng, *shape)
    w, b = rand(rng, C), rand(rng, C)
    rm, rv = rand(rng, C), rng.uniform(0.5, 2, C)
    eps = 1e-3
    gx, gw, gb = ref.instance_norm_backward(x, dy, w, eps, rm, rv, use_input_stats)

    def fwd(x_, w_, b_):
        return ref.instance_norm_forward(x_, w_, b_, eps, rm, rv, use_input_stats).y

    fd_check(lambda a: fwd(a, w, b), x, dy, gx, "grad_input")
    fd_check(lambda a: fwd(x, a, b), w, dy, gw, "grad_weight")
    fd_check(lambda a: fwd(x, w, a), b, dy, gb, "grad_bias")


@pytest.mark.parametrize("shape", [(1, 4, 2), (2, 3, 1, 2), (1, 1, 3)])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 6])
def test_lrn_fd(shape, size):
    rng = np.random.default_rng(67)
    x, dy = rand(rng, *shape), rand(rng, *shape)
    alpha, beta, k = 0.8, 0.75, 1.5
    gx = ref.local_response_norm_backward(x, dy, size, alpha, beta, k)
    fd_check(lambda a: ref.local_response_norm_forward(a, size, alpha, beta, k), x, dy, gx,
             "grad_input")


# ==========================================================================
# a few direct sanity checks of the formulas (no torch)
# ==========================================================================

def test_lrn_matches_explicit_formula():
    rng = np.random.default_rng(70)
    x = rand(rng, 1, 5, 2)
    size, alpha, beta, k = 4, 0.5, 0.75, 2.0
    y = ref.local_response_norm_forward(x, size, alpha, beta, k)
    xp = np.concatenate([np.zeros((1, size // 2, 2)), x, np.zeros((1, (size - 1) // 2, 2))],
                        axis=1)
    for c in range(5):
        s = k + alpha / size * np.sum(xp[:, c:c + size] ** 2, axis=1)
        close(y[:, c], x[:, c] / s ** beta)


def test_reference_is_accurate_far_from_zero():
    """Two-pass statistics: mean 1e4, std 1 in float64 stays accurate."""
    rng = np.random.default_rng(71)
    base = rand(rng, 64, 3)
    x = base + 1e4
    y = ref.batch_norm_forward(x, None, None, 0.0).y
    y0 = ref.batch_norm_forward(base, None, None, 0.0).y
    close(y, y0, rtol=1e-9, atol=1e-9)


def test_reference_does_not_import_torch_or_fastnorm():
    import ast
    src = open(ref.__file__).read()
    names = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert "torch" not in names and "fastnorm" not in names
