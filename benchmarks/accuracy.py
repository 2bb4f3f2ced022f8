"""Accuracy on hard data: float32 input with mean 1e4 and std 1.

For every layer and layout, the training forward output and the input
gradient of fastnorm and of torch are compared with the float64 NumPy
reference of tests/reference.py computed on the very same (float32) data and
parameters. Reported: the maximum absolute error.
"""
import os
import sys

import numpy as np

from .cases import LAYERS, Case, Shape, layouts_for, make_array

HARD_MEAN, HARD_STD = 1e4, 1.0


def _load_reference():
    tests = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import reference
    return reference


def _references(ref):
    """family -> f(x64, dy64, args, params, dtype) -> (y, grad_input), all float64."""
    def batch(x, dy, args, p, dtype):
        y = ref.batch_norm_forward(x, p.get("weight"), p.get("bias"), 1e-5).y
        return y, ref.batch_norm_backward(x, dy, p.get("weight"), 1e-5)[0]

    def instance(x, dy, args, p, dtype):
        y = ref.instance_norm_forward(x, p.get("weight"), p.get("bias")).y
        return y, ref.instance_norm_backward(x, dy, p.get("weight"))[0]

    def group(x, dy, args, p, dtype):
        groups = args[0]
        y = ref.group_norm_forward(x, groups, p.get("weight"), p.get("bias"))
        return y, ref.group_norm_backward(x, dy, groups, p.get("weight"))[0]

    def layer(x, dy, args, p, dtype):
        y = ref.layer_norm_forward(x, args[0], p.get("weight"), p.get("bias"))
        return y, ref.layer_norm_backward(x, dy, args[0], p.get("weight"))[0]

    def rms(x, dy, args, p, dtype):
        eps = float(np.finfo(dtype).eps)  # the layers' eps=None, for the data's dtype
        y = ref.rms_norm_forward(x, args[0], p.get("weight"), eps)
        return y, ref.rms_norm_backward(x, dy, args[0], p.get("weight"), eps)[0]

    def lrn(x, dy, args, p, dtype):
        return (ref.local_response_norm_forward(x, *args),
                ref.local_response_norm_backward(x, dy, *args))

    return {"batch": batch, "instance": instance, "group": group, "layer": layer, "rms": rms,
            "lrn": lrn}


def _randomize_parameters(layer, module, torch, rng):
    """Give fastnorm's layer non-trivial parameters and copy them into torch's module."""
    params = {}
    for name, value in layer.named_parameters():
        value[...] = (1.0 if name == "weight" else 0.0) + 0.1 * rng.standard_normal(value.shape)
        params[name] = value.copy()
        with torch.no_grad():
            getattr(module, name).copy_(torch.from_numpy(value))
    return params


def _torch_forward_backward(module, torch, x, dy):
    leaf = torch.from_numpy(x).requires_grad_()
    y = module(leaf)
    (grad,) = torch.autograd.grad(y, (leaf,), torch.from_numpy(dy))
    return y.detach().numpy(), grad.numpy()


def _max_error(got, want):
    return float(np.max(np.abs(np.asarray(got, np.float64) - want))) if want.size else 0.0


def accuracy_table(fastnorm_peer, torch_peer, layer_names, seed=0, dtype="float32"):
    """Rows {layer, layout, shape, fastnorm_forward, torch_forward, fastnorm_backward,
    torch_backward} (max abs errors), and notes for what could not be measured."""
    try:
        references = _references(_load_reference())
    except ImportError as error:
        return [], [f"accuracy table skipped: tests/reference.py not importable ({error})"]
    torch = torch_peer.torch
    rows, notes = [], []
    rng = np.random.default_rng(seed)
    for spec in LAYERS:
        if spec.name not in layer_names or spec.fusion:  # fusions: see tests/test_fusion_rows.py
            continue
        for layout in layouts_for(spec, spec.accuracy_shape):
            case = Case(spec, Shape(spec.accuracy_shape, "accuracy"), layout, "train", dtype)
            if fastnorm_peer.skip_reason(case):
                break  # the runner already notes the missing layer
            rows.append(_accuracy_row(case, fastnorm_peer, torch_peer, references, torch, rng))
    return rows, notes


def _accuracy_row(case, fastnorm_peer, torch_peer, references, torch, rng):
    x = make_array(case.dims, case.layout, case.dtype, rng, HARD_MEAN, HARD_STD)
    dy = make_array(case.dims, case.layout, case.dtype, rng)
    layer = fastnorm_peer.make_layer(case)
    module = torch_peer.make_module(case)
    params = _randomize_parameters(layer, module, torch, rng)
    want_y, want_dx = references[case.layer.family](
        x.astype(np.float64), dy.astype(np.float64), case.layer.args(case.dims), params,
        np.dtype(case.dtype))
    got_y = layer(x)
    got_dx = layer.backward(dy)
    torch_y, torch_dx = _torch_forward_backward(module, torch, x, dy)
    return {
        "layer": case.layer.name, "layout": case.layout, "shape": list(case.dims),
        "dtype": case.dtype,
        "fastnorm_forward": _max_error(got_y, want_y), "torch_forward": _max_error(torch_y, want_y),
        "fastnorm_backward": _max_error(got_dx, want_dx),
        "torch_backward": _max_error(torch_dx, want_dx),
    }
