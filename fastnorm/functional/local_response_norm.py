"""Local response normalization: each value divided by a power of the mean
square over a window of neighbouring channels (AlexNet, GoogLeNet).

    s_c = k + alpha / size * sum_{c'=c-size//2}^{c+(size-1)//2} x_{c'}**2
    y_c = x_c / s_c**beta

Channels outside [0, C) count as zero (PyTorch's padding of size//2 before
and (size-1)//2 after), and the sum is always divided by size.
"""
import numbers

import numpy as np

from .._kernels import kernels
from .._layout import deliver, input_view, kernel_view, output_for
from .._threads import threads_for
from .._validation import check_count, check_float_array, check_grad_output, check_out

__all__ = ["local_response_norm", "local_response_norm_backward"]


def local_response_norm(input, size, alpha=1e-4, beta=0.75, k=1.0, *, out=None):
    """torch.nn.functional.local_response_norm for NumPy arrays of shape (N, C, *)
    with at least 3 dimensions.

    Returns the output: a new array in the input's layout (channels-last memory
    stays channels-last), or out.
    """
    size, alpha, beta, k = _check_arguments(input, size, alpha, beta, k)
    return lrn_forward(input, size, alpha, beta, k, out)


def local_response_norm_backward(grad_output, input, size, alpha=1e-4, beta=0.75, k=1.0):
    """Gradient of local_response_norm(input, size, alpha, beta, k) with respect
    to input, given grad_output (the gradient of the output). Returns an array
    in the input's layout.

        dx_j = dy_j * s_j**-beta
               - 2 * alpha * beta / size * x_j * sum_c dy_c * x_c * s_c**(-beta - 1)

    over the channels c whose window contains j (c from j - (size-1)//2 to
    j + size//2). The scale s is recomputed from input rather than stored.
    """
    size, alpha, beta, k = _check_arguments(input, size, alpha, beta, k)
    return lrn_backward(grad_output, input, size, alpha, beta, k)


# ------------------------------------------------------------------ helpers
# (LocalResponseNorm, whose coefficients were checked at construction, calls
# check_input, lrn_forward and lrn_backward directly: a tiny call's time is mostly
# Python.)

def lrn_forward(x, size, alpha, beta, k, out=None):
    """local_response_norm of a checked input (check_input) and arguments."""
    check_out(x, out)
    view, channels_last = input_view(x)
    target, y_view = output_for(x, channels_last, out)
    if x.size > 0:
        kernels.lrn_forward(view, y_view, size, alpha, beta, k, threads_for(x.size))
    return deliver(target, out)


def lrn_backward(grad_output, x, size, alpha, beta, k):
    """local_response_norm_backward of a checked input (check_input) and arguments."""
    check_grad_output(grad_output, x)
    view, channels_last = input_view(x)
    grad_view = kernel_view(grad_output, channels_last)
    grad_input, grad_input_view = output_for(x, channels_last)
    if x.size > 0:
        kernels.lrn_backward(view, grad_view, grad_input_view, size, alpha, beta, k,
                             threads_for(x.size))
    return grad_input


def check_coefficient(name, value):
    """alpha, beta or k: a real number."""
    if type(value) is float:   # the common case, without the costlier ABC check
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_input(x):
    """A float array of shape (N, C, *) with at least 3 dimensions."""
    check_float_array(x, "input")
    if x.ndim < 3:
        raise ValueError(
            f"local_response_norm expects an input of shape (N, C, *) with at least 3 "
            f"dimensions, got {x.ndim}-D shape {x.shape}"
        )


def _check_arguments(x, size, alpha, beta, k):
    check_input(x)
    return (check_count("size", size), check_coefficient("alpha", alpha),
            check_coefficient("beta", beta), check_coefficient("k", k))
