"""The base class every fastnorm layer shares.

A layer holds its parameters and buffers as NumPy attributes with PyTorch's
names, runs the functional API in forward(), and keeps what backward() needs
from the last forward. It never calls a kernel itself.
"""
from typing import NamedTuple

import numpy as np

from ._validation import FLOAT_DTYPES, check_count  # noqa: F401  (re-exported for layers)


class StateDictError(ValueError, RuntimeError):
    """A state dict that does not fit the layer (torch raises RuntimeError there)."""


class IncompatibleKeys(NamedTuple):
    missing_keys: list
    unexpected_keys: list


class NormLayer:
    """Parameters, buffers, train/eval, state dicts, and the forward/backward protocol.

    Subclasses list their attribute names in _parameter_names/_buffer_names
    (an attribute may be None, as in torch) and implement forward() and
    _backward(grad_output, saved) -> (grad_input, grads).

    Threads: separate layer objects may run in separate Python threads at once
    (the kernels release the GIL). One layer object is not thread-safe: forward
    saves its input and statistics on the object for backward and updates the
    running statistics in place, so concurrent calls on the same object race.
    Use one layer per thread, or hold a lock around each forward+backward pair.
    """

    _parameter_names = ("weight", "bias")
    _buffer_names = ()

    def __init__(self, dtype=np.float32):
        self.dtype = check_dtype(dtype)
        self.training = True
        self.grads = {}
        self._saved = None

    # ------------------------------------------------------------ running
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, input, out=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, grad_output, **extra):
        """Gradient w.r.t. the last forward's input, for the mode that forward ran
        in; also sets self.grads (gradients of the parameters, keyed like them).
        extra: keywords some layers take (LayerNorm/RMSNorm: grad_h)."""
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before any forward()")
        grad_input, grads = self._backward(grad_output, self._saved, **extra)
        self.grads = grads
        return grad_input

    def _backward(self, grad_output, saved, **extra):  # pragma: no cover - abstract
        raise NotImplementedError

    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    # ---------------------------------------------------- parameters/state
    def named_parameters(self):
        for name in self._parameter_names:
            value = getattr(self, name)
            if value is not None:
                yield name, value

    def parameters(self):
        return [value for _, value in self.named_parameters()]

    def named_buffers(self):
        for name in self._buffer_names:
            value = getattr(self, name)
            if value is not None:
                yield name, value

    def state_dict(self):
        """Copies of parameters and buffers under torch's keys (torch's order)."""
        state = {name: value.copy() for name, value in self.named_parameters()}
        state.update((name, value.copy()) for name, value in self.named_buffers())
        return state

    def load_state_dict(self, state_dict, strict=True):
        """Copy matching arrays (e.g. a torch state dict converted with .numpy()) into
        the layer. Everything is checked before anything changes. Values are cast
        to the layer's dtype, like torch's copy_."""
        current = dict(self.named_parameters())
        current.update(self.named_buffers())
        missing = [name for name in current if name not in state_dict]
        unexpected = [name for name in state_dict if name not in current]
        if strict and (missing or unexpected):
            raise StateDictError(
                f"Error(s) in loading state_dict for {type(self).__name__}: "
                f"missing keys {missing}, unexpected keys {unexpected}"
            )
        incoming = {}
        for name, target in current.items():
            if name not in state_dict:
                continue
            value = np.asarray(state_dict[name])
            if value.shape != target.shape:
                raise StateDictError(
                    f"size mismatch for {name}: expected shape {target.shape}, got {value.shape}"
                )
            if not np.can_cast(value.dtype, target.dtype, casting="same_kind"):
                raise TypeError(f"{name}: cannot load dtype {value.dtype} into {target.dtype}")
            incoming[name] = value
        for name, value in incoming.items():
            np.copyto(current[name], value, casting="same_kind")
        return IncompatibleKeys(missing, unexpected)

    # --------------------------------------------------------------- torch
    def to_torch(self):
        """The equivalent torch.nn module (needs torch): configuration, parameters,
        buffers and mode; with a fused activation, Sequential(module, activation)."""
        from .interop import to_torch

        return to_torch(self)

    # ------------------------------------------------------------- display
    def extra_repr(self):
        return ""

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"


class ChannelStatsLayer(NormLayer):
    """A layer with per-channel affine parameters and optional running statistics
    (BatchNorm*, SyncBatchNorm, InstanceNorm*): their shared constructor."""

    _buffer_names = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self, num_features, eps, momentum, affine, track_running_stats, dtype):
        super().__init__(dtype)
        self.num_features = check_count("num_features", num_features)
        self.eps = check_eps(eps)
        self.momentum = check_momentum(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        channels = self.num_features
        self.weight = np.ones(channels, self.dtype) if self.affine else None
        self.bias = np.zeros(channels, self.dtype) if self.affine else None
        if self.track_running_stats:
            self.running_mean = np.zeros(channels, self.dtype)
            self.running_var = np.ones(channels, self.dtype)
            self.num_batches_tracked = np.array(0, dtype=np.int64)
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0

    def _count_batch(self):
        """num_batches_tracked += 1, in place: through the scalar, 0.2 us; `+=` on the
        0-d array takes 2.5 us, a tenth of a tiny training call."""
        self.num_batches_tracked[()] = self.num_batches_tracked[()] + 1


# ------------------------------------------------- constructor argument checks

def check_dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


def check_eps(eps):
    if eps is None or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    return float(eps)


def check_momentum(momentum):
    """None (cumulative average) or a number in [0, 1]."""
    if momentum is None:
        return None
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be None or in [0, 1], got {momentum!r}")
    return float(momentum)
