"""Input checks shared by every layer and functional form.

Everything is checked here, in Python, before any kernel runs or any state
changes; the kernels then trust their inputs. Messages say what was expected
and what came.
"""
import operator

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_count(name, value, minimum=1):
    """An integer argument of at least `minimum` (num_features, num_groups, size, ...)."""
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def check_float_array(x, name="input"):
    """x must be a float32/float64 ndarray; nothing is converted silently."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of float32 or float64, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {x.dtype}")


def check_same_dtype(x, arr, name, x_name="input"):
    """A parameter/buffer/gradient must be an ndarray of x's dtype (no silent casts)."""
    if arr is None:
        return
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(arr).__name__}")
    if arr.dtype != x.dtype:
        raise TypeError(
            f"{name} has dtype {arr.dtype} but {x_name} has dtype {x.dtype}; "
            "fastnorm does not cast silently: convert one of them"
        )


def check_vector(x, arr, name, length):
    """A per-channel parameter or buffer: 1-D of the given length, x's dtype."""
    if arr is None:
        return
    check_same_dtype(x, arr, name)
    if arr.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {arr.shape}")


def check_out(x, out):
    """out= must be a writable array of x's shape and dtype that does not overlap x."""
    if out is None:
        return
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"out must have the input's shape {x.shape}, got {out.shape}")
    if out.dtype != x.dtype:
        raise TypeError(f"out must have the input's dtype {x.dtype}, got {out.dtype}")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    if np.may_share_memory(out, x):
        raise ValueError("out must not overlap the input (the input is kept for backward)")


def check_like(arr, x, name, x_name="the forward input"):
    """arr must be a float ndarray of x's shape and dtype (a gradient, a residual)."""
    check_float_array(arr, name)
    if arr.shape != x.shape:
        raise ValueError(f"{name} must have {x_name}'s shape {x.shape}, got {arr.shape}")
    check_same_dtype(x, arr, name, x_name)


def check_grad_output(grad_output, x):
    check_like(grad_output, x, "grad_output")


def check_channels(x, num_channels, what):
    if x.shape[1] != num_channels:
        raise ValueError(
            f"{what} expected {num_channels} channels (dim 1) but the input has shape "
            f"{x.shape} with {x.shape[1]} channels"
        )
