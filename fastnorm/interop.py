"""Conversion between torch.nn normalization modules and fastnorm layers.

    layer = fastnorm.from_torch(torch_module)     # type, configuration, parameters,
    module = layer.to_torch()                     # buffers and train/eval mode

The table below names every torch normalization module fastnorm implements and
the constructor arguments both sides share (same names in torch and fastnorm).
A layer this build of fastnorm lacks is reported when asked for. A fastnorm
layer with a fused activation becomes torch.nn.Sequential(norm, activation), and
from_torch accepts such a pair back. torch is imported only when needed.
"""
import inspect

import numpy as np

_BATCH_NORM_ARGS = ("num_features", "eps", "momentum", "affine", "track_running_stats")

# torch.nn class name -> constructor arguments read from the module (or layer)
LAYER_ARGUMENTS = {
    "BatchNorm1d": _BATCH_NORM_ARGS,
    "BatchNorm2d": _BATCH_NORM_ARGS,
    "BatchNorm3d": _BATCH_NORM_ARGS,
    "SyncBatchNorm": _BATCH_NORM_ARGS,
    "LayerNorm": ("normalized_shape", "eps", "elementwise_affine", "bias"),
    "RMSNorm": ("normalized_shape", "eps", "elementwise_affine"),
    "GroupNorm": ("num_groups", "num_channels", "eps", "affine"),
    "InstanceNorm1d": _BATCH_NORM_ARGS,
    "InstanceNorm2d": _BATCH_NORM_ARGS,
    "InstanceNorm3d": _BATCH_NORM_ARGS,
    "LocalResponseNorm": ("size", "alpha", "beta", "k"),
}

# fused activation name -> (torch.nn class name, its keyword arguments)
_TORCH_ACTIVATIONS = {
    "relu": ("ReLU", {}),
    "silu": ("SiLU", {}),
    "gelu": ("GELU", {}),
    "gelu_tanh": ("GELU", {"approximate": "tanh"}),
}


def from_torch(module):
    """The fastnorm layer equivalent to a torch.nn normalization module: same type,
    configuration, parameters, buffers (copied) and training mode, in the module's
    float dtype (float32 or float64). A torch.nn.Sequential(norm, ReLU/SiLU/GELU)
    becomes a layer with that fused activation."""
    torch = _import_torch()
    module, activation = _split_activation(torch, module)
    name = _torch_layer_name(torch, module)
    cls = _fastnorm_class(name)
    kwargs = {arg: _argument(module, arg) for arg in LAYER_ARGUMENTS[name]}
    dtype = _module_dtype(torch, module)
    if _accepts(cls, "dtype"):
        kwargs["dtype"] = dtype
    if activation is not None:
        kwargs["activation"] = activation
    layer = cls(**kwargs)
    state = {key: value.detach().cpu().numpy() for key, value in module.state_dict().items()}
    layer.load_state_dict(state)
    layer.train(module.training)
    return layer


def to_torch(layer):
    """The torch.nn module equivalent to a fastnorm layer (see NormLayer.to_torch)."""
    torch = _import_torch()
    name = type(layer).__name__
    if name not in LAYER_ARGUMENTS:
        raise TypeError(f"to_torch: no torch.nn equivalent known for {name}")
    cls = getattr(torch.nn, name)
    kwargs = {arg: _argument(layer, arg) for arg in LAYER_ARGUMENTS[name]}
    if _accepts(cls, "dtype"):
        kwargs["dtype"] = getattr(torch, np.dtype(getattr(layer, "dtype", np.float32)).name)
    module = cls(**kwargs)
    module.load_state_dict({key: torch.from_numpy(np.array(value))
                            for key, value in layer.state_dict().items()})
    module.train(layer.training)
    activation = getattr(layer, "activation", None)
    if activation is None:
        return module
    act_name, act_kwargs = _TORCH_ACTIVATIONS[activation]
    return torch.nn.Sequential(module, getattr(torch.nn, act_name)(**act_kwargs)).train(layer.training)


# ------------------------------------------------------------------ helpers

def _import_torch():
    try:
        import torch
    except ImportError:
        raise ImportError("fastnorm's torch interop needs PyTorch installed") from None
    return torch


def _torch_layer_name(torch, module):
    """The name of the torch.nn normalization class module is (or derives from)."""
    for klass in type(module).__mro__:
        if klass.__name__ in LAYER_ARGUMENTS and getattr(torch.nn, klass.__name__, None) is klass:
            return klass.__name__
    supported = ", ".join(LAYER_ARGUMENTS)
    raise TypeError(f"from_torch: {type(module).__name__} is not a torch.nn normalization "
                    f"module fastnorm implements ({supported})")


def _fastnorm_class(name):
    import fastnorm

    cls = getattr(fastnorm, name, None)
    if cls is None:
        raise TypeError(f"from_torch: this build of fastnorm has no {name} layer")
    return cls


def _argument(obj, name):
    """A constructor argument as the module/layer stores it (same names on both sides)."""
    if name == "bias":  # LayerNorm's flag: stored as the bias array/tensor itself
        return obj.bias is not None or not obj.elementwise_affine
    value = getattr(obj, name)
    return tuple(value) if name == "normalized_shape" else value


def _module_dtype(torch, module):
    for value in module.state_dict().values():
        if value.is_floating_point():
            if value.dtype not in (torch.float32, torch.float64):
                raise TypeError(f"from_torch: fastnorm layers are float32 or float64, the "
                                f"module is {value.dtype}")
            return np.float64 if value.dtype == torch.float64 else np.float32
    return np.float32


def _split_activation(torch, module):
    """(norm module, activation name or None): a Sequential(norm, activation) is split."""
    if not isinstance(module, torch.nn.Sequential):
        return module, None
    if len(module) == 2:
        norm, act = module[0], module[1]
        for name, (act_cls, act_kwargs) in _TORCH_ACTIVATIONS.items():
            if type(act) is getattr(torch.nn, act_cls) and \
                    all(getattr(act, k) == v for k, v in act_kwargs.items()) and \
                    (name != "gelu" or act.approximate == "none"):
                return norm, name
    raise TypeError("from_torch: a Sequential must be (normalization, ReLU/SiLU/GELU)")


def _accepts(cls, argument):
    try:
        return argument in inspect.signature(cls).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
        return False
