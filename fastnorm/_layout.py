"""Memory layouts: how an (N, C, *spatial) array is handed to the kernels.

Kernels see one of two C-contiguous 3-D views of the very same memory:
  * channels-first (N, C, S), S = prod(spatial): contiguous NCHW and friends;
  * channels-last (N * prod(spatial), C, 1): NHWC/NDHWC memory, i.e. an array
    made as x_nhwc.transpose(0, 3, 1, 2), processed in place without a copy.
Any other strides cost one contiguous copy, and so does memory that is not
aligned for its dtype (kernels may use aligned vector accesses; misaligned
floats are undefined behaviour in C). Outputs are allocated in the input's
layout, so a channels-last input gives a channels-last output.

When one layout must become the other (a gradient, or an out=, in the other
layout than the input), the copy is the `relayout` kernel (_relayout.pxi),
parallel and cache-blocked: NumPy takes 2-8x longer for these strided copies.
"""
import functools
import math

import numpy as np

from ._kernels import kernels
from ._memory import empty as empty_output
from ._threads import threads_for

_RELAYOUT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@functools.lru_cache(maxsize=None)
def _axes_channels_last(ndim):
    """transpose() axes taking (N, C, *spatial) to (N, *spatial, C)."""
    return (0,) + tuple(range(2, ndim)) + (1,)


@functools.lru_cache(maxsize=None)
def _axes_channels_first(ndim):
    """transpose() axes taking (N, *spatial, C) back to (N, C, *spatial)."""
    return (0, ndim - 1) + tuple(range(1, ndim - 1))


def channels_to_last(x):
    """The (N, *spatial, C) view of an (N, C, *spatial) array (np.moveaxis(x, 1, -1),
    which costs microseconds a tiny call cannot spare)."""
    return x.transpose(_axes_channels_last(x.ndim))


def is_channels_last(x):
    """True for aligned memory ordered (N, *spatial, C) behind an (N, C, *spatial) shape."""
    return (x.ndim >= 3 and x.flags.aligned and not x.flags.c_contiguous
            and channels_to_last(x).flags.c_contiguous)


def contiguous(a):
    """a itself when it is C-contiguous and aligned, else such a copy."""
    if is_kernel_array(a):
        return a
    if _relayoutable(a) and is_channels_last(a):
        return _relaid(a, False)
    return np.require(a, requirements="CA")


def _relayoutable(a):
    """Whether the relayout kernel may copy a (an aligned float array of rank >= 3)."""
    return a.ndim >= 3 and a.dtype in _RELAYOUT_DTYPES and a.flags.aligned


def _relayout(src, dst, channels_last):
    """dst[...] = src, src in one kernel layout and dst in the other, both
    (N, C, *spatial); channels_last: dst's layout."""
    n, c = src.shape[0], src.shape[1]
    threads = threads_for(src.size)
    if channels_last:
        kernels.relayout(src.reshape(n, c, -1), channels_to_last(dst).reshape(n, -1, c), threads)
    else:
        kernels.relayout(channels_to_last(src).reshape(n, -1, c), dst.reshape(n, c, -1), threads)


def _relaid(a, channels_last):
    """A copy of a in the other kernel layout (channels_last: the copy's), allocated as
    the layers' outputs are (output_for)."""
    copy, _ = output_for(a, channels_last)
    _relayout(a, copy, channels_last)
    return copy


def is_kernel_array(a):
    """Whether kernels may use a directly as a C-contiguous array (read or write)."""
    return a.flags.c_contiguous and a.flags.aligned


def kernel_view(x, channels_last):
    """A 3-D C-contiguous view of x in the given layout (a copy only if needed)."""
    n, c = x.shape[0], x.shape[1]
    if channels_last:
        moved = channels_to_last(x)
        if not moved.flags.c_contiguous and is_kernel_array(x) and _relayoutable(x):
            moved = channels_to_last(_relaid(x, True))
        return contiguous(moved).reshape(-1, c, 1)
    return contiguous(x).reshape(n, c, math.prod(x.shape[2:]))


def kernel_ready(x):
    """x itself when its memory is already a kernel layout, else one contiguous copy
    (same shape and values). Layers keep this array for backward."""
    if is_kernel_array(x) or is_channels_last(x):
        return x
    return contiguous(x)


def input_view(x):
    """(view, channels_last) for an input: channels-last memory stays channels-last."""
    channels_last = is_channels_last(x)
    return kernel_view(x, channels_last), channels_last


def output_for(x, channels_last, out=None):
    """(target, view): the kernel writes target through its 3-D view. target is
    out itself when out's strides allow; otherwise a fresh array in the input's
    layout, which the caller copies into out (see deliver)."""
    if out is not None:
        view = _writable_view(out, channels_last)
        if view is not None:
            return out, view
    n, c = x.shape[0], x.shape[1]
    if channels_last:
        last = empty_output(x.shape[:1] + x.shape[2:] + x.shape[1:2], x.dtype)
        return last.transpose(_axes_channels_first(last.ndim)), last.reshape(-1, c, 1)
    target = empty_output(x.shape, x.dtype)
    return target, target.reshape(n, c, math.prod(x.shape[2:]))


def deliver(target, out):
    """The array to return: target, copied into out= when it is not out already."""
    if out is None or target is out:
        return target
    if (out.dtype == target.dtype and out.flags.writeable and _relayoutable(out)
            and _relayoutable(target)):
        if is_channels_last(target) and is_kernel_array(out):
            _relayout(target, out, False)
            return out
        if is_kernel_array(target) and is_channels_last(out):
            _relayout(target, out, True)
            return out
    np.copyto(out, target)
    return out


def _writable_view(out, channels_last):
    n, c = out.shape[0], out.shape[1]
    if not out.flags.aligned:
        return None
    if channels_last:
        moved = channels_to_last(out)
        return moved.reshape(-1, c, 1) if moved.flags.c_contiguous else None
    if out.flags.c_contiguous:
        return out.reshape(n, c, math.prod(out.shape[2:]))
    return None
