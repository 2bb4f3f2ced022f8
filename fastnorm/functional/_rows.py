"""Helpers shared by the row-family functional forms (layer/rms/group/instance norm).

They are on the hot path of tiny, latency-bound calls: no needless copies or
allocations (missing parameters become cached read-only ones/zeros).
"""
import functools
import math
import operator

import numpy as np

from .._layout import contiguous
from .._validation import check_same_dtype


@functools.lru_cache(maxsize=64)
def constant_vector(length, dtype, value):
    """A read-only vector of `length` copies of value (stands in for a missing parameter)."""
    vec = np.full(length, value, dtype=dtype)
    vec.flags.writeable = False
    return vec


def param_or(param, length, dtype, value):
    """A C-contiguous parameter for the kernels, or a constant vector when it is None."""
    if param is None:
        return constant_vector(length, dtype, value)
    return contiguous(param)


def check_param(x, param, name, shape):
    """A parameter must be an array of x's dtype and the given shape."""
    if param is None:
        return
    check_same_dtype(x, param, name)
    if param.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {param.shape}")


def check_eps_value(eps):
    try:
        ok = eps >= 0
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")


def as_shape(normalized_shape):
    """normalized_shape as a tuple of ints (an int means a 1-D shape)."""
    try:
        if type(normalized_shape) is tuple:
            shape = normalized_shape
        elif np.ndim(normalized_shape) == 0:
            shape = (normalized_shape,)
        else:
            shape = tuple(normalized_shape)
        shape = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise TypeError("normalized_shape must be an int or a sequence of ints, "
                        f"got {normalized_shape!r}") from None
    if not shape or min(shape) < 0:
        raise ValueError("normalized_shape must be non-empty with sizes >= 0, "
                         f"got {normalized_shape!r}")
    return shape


def check_trailing(x, shape, what):
    """x's last len(shape) dims must equal shape; the message says which dims differ."""
    k = len(shape)
    if x.ndim < k:
        raise ValueError(
            f"{what} expected an input with at least {k} dims ending with normalized_shape "
            f"{shape}, got {x.ndim}-D input of shape {x.shape}"
        )
    if x.shape[x.ndim - k:] != shape:
        wrong = [x.ndim - k + i for i in range(k) if x.shape[x.ndim - k + i] != shape[i]]
        raise ValueError(
            f"{what} expected the input's last {k} dims to be normalized_shape {shape}, "
            f"got input of shape {x.shape}: dims {wrong} differ"
        )


def check_stat(stat, name, count):
    """A saved statistic: a float array of `count` values (any shape)."""
    if not isinstance(stat, np.ndarray) or stat.size != count:
        shape = getattr(stat, "shape", type(stat).__name__)
        raise ValueError(f"{name} must be an array of {count} values (one per row), got {shape}")
    return np.require(stat, np.float64, "CA").reshape(-1)


def prod(shape):
    return math.prod(shape)
