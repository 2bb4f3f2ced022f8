"""Helpers for the row-family tests (LayerNorm, RMSNorm, GroupNorm, InstanceNorm)."""
import numpy as np
import pytest

import fastnorm as fn
from helpers import num_threads, tolerance


def assert_close(actual, expected, dtype, what="", scale=1.0):
    """Max abs error within the dtype's tolerance (times scale) of the expected values."""
    tol = tolerance(dtype) * scale
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol, atol=tol,
                               err_msg=what)


def run_torch(torch, module, x, dy, **kwargs):
    """Forward and backward of a float64 torch module on NumPy data:
    (y, grad_input, {parameter name: grad})."""
    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    y = module(xt, **kwargs)
    y.backward(torch.tensor(np.asarray(dy, np.float64)))
    grads = {name: p.grad.numpy().copy() for name, p in module.named_parameters()}
    for p in module.parameters():
        p.grad = None
    return y.detach().numpy(), xt.grad.numpy(), grads


def torch_twin(torch, layer, torch_cls, *args, **kwargs):
    """A float64 torch module with the layer's parameters and buffers."""
    module = torch_cls(*args, **kwargs).double()
    state = {k: torch.tensor(np.asarray(v, np.float64) if v.dtype.kind == "f" else v)
             for k, v in layer.state_dict().items()}
    module.load_state_dict(state)
    module.train(layer.training)
    return module


def randomize_parameters(layer, seed=1):
    rng = np.random.default_rng(seed)
    for _, p in layer.named_parameters():
        p[...] = rng.uniform(0.5, 1.5, p.shape)
    if getattr(layer, "bias", None) is not None:
        layer.bias[...] = rng.standard_normal(layer.bias.shape)


def results_for_thread_counts(run, counts=(1, 2, 3)):
    """run() under each thread count; the list of its results (tuples of arrays)."""
    results = []
    for n in counts:
        with num_threads(n):
            results.append(run())
    return results


def assert_bitwise_equal(results):
    first = results[0]
    for other in results[1:]:
        for a, b in zip(first, other):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert np.array_equal(a, b, equal_nan=True)


def layer_state(layer):
    """Copies of every parameter and buffer (to check that a rejected call changed nothing)."""
    return {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}


def assert_state_unchanged(layer, before):
    after = layer_state(layer)
    assert after.keys() == before.keys()
    for name in before:
        assert np.array_equal(after[name], before[name]), name


def assert_rejected_unchanged(layer, good, bad, error, match):
    """After a forward on `good`, layer(bad) raises error (matching `match`) and leaves
    every parameter, buffer and the saved forward as they were."""
    randomize_parameters(layer)
    layer(good)
    saved = layer._saved
    before = layer_state(layer)
    with pytest.raises(error, match=match):
        layer(bad)
    assert_state_unchanged(layer, before)
    assert layer._saved is saved


__all__ = ["assert_close", "run_torch", "torch_twin", "randomize_parameters",
           "results_for_thread_counts", "assert_bitwise_equal", "layer_state", "assert_rejected_unchanged",
           "assert_state_unchanged", "fn"]
