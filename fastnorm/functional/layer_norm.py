"""Layer normalization and RMS normalization: statistics per row over the
trailing normalized_shape dims, an affine parameter per element of the row.

    layer_norm: y = (x - mean) / sqrt(var + eps) * weight + bias
    rms_norm:   y = x / sqrt(mean(x**2) + eps) * weight

Each has torch's forward (layer_norm, rms_norm), a native_* form that also
returns the per-row statistics, and a backward taking those statistics.
Statistics are float64 arrays with one value per row, shaped like the
input's leading dims (x.shape[:-len(normalized_shape)]).
"""
import numpy as np

from .._kernels import kernels
from .._overflow import refit_rows
from .._threads import threads_for
from .._validation import check_float_array, check_grad_output, check_out
from ._rows import (
    as_shape, check_eps_value, check_param, check_stat, check_trailing, contiguous, param_or,
    prod,
)

__all__ = [
    "layer_norm", "native_layer_norm", "layer_norm_backward",
    "rms_norm", "native_rms_norm", "rms_norm_backward",
]


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None):
    """torch.nn.functional.layer_norm for NumPy arrays: normalize over the last
    len(normalized_shape) dims. Returns a new C-contiguous array (or out)."""
    return native_layer_norm(input, normalized_shape, weight, bias, eps, out=out)[0]


def native_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None):
    """Like torch.native_layer_norm: returns (output, mean, rstd), the per-row
    float64 mean and 1/sqrt(var + eps) to pass to layer_norm_backward."""
    shape = as_shape(normalized_shape)
    check_rows_input(input, shape, weight, bias, "layer_norm")
    check_eps_value(eps)
    check_out(input, out)
    return rows_forward(input, shape, weight, bias, eps, True, out)


def layer_norm_backward(grad_output, input, normalized_shape, mean, rstd, weight=None):
    """Gradients of layer_norm: returns (grad_input, grad_weight, grad_bias).

    input is the forward's input, mean/rstd what native_layer_norm returned.
    grad_weight = sum over rows of dy * xhat, grad_bias = sum of dy, both of
    shape normalized_shape in the input's dtype (computed even when the
    parameters are None, as if weight were ones).
    """
    shape = as_shape(normalized_shape)
    check_rows_input(input, shape, weight, None, "layer_norm_backward")
    check_grad_output(grad_output, input)
    rows = input.size // prod(shape) if prod(shape) else prod(input.shape[:input.ndim - len(shape)])
    mean = check_stat(mean, "mean", rows)
    rstd = check_stat(rstd, "rstd", rows)
    return rows_backward(grad_output, input, shape, weight, mean, rstd, True)


def rms_norm(input, normalized_shape, weight=None, eps=None, *, out=None):
    """torch.nn.functional.rms_norm for NumPy arrays. eps=None means
    numpy.finfo(input.dtype).eps, as in torch."""
    return native_rms_norm(input, normalized_shape, weight, eps, out=out)[0]


def native_rms_norm(input, normalized_shape, weight=None, eps=None, *, out=None):
    """rms_norm returning (output, rstd): rstd = 1/sqrt(mean(x**2) + eps) per row,
    float64, to pass to rms_norm_backward."""
    shape = as_shape(normalized_shape)
    check_rows_input(input, shape, weight, None, "rms_norm")
    eps = rms_eps(input.dtype, eps)
    check_eps_value(eps)
    check_out(input, out)
    y, _, rstd = rows_forward(input, shape, weight, None, eps, False, out)
    return y, rstd


def rms_norm_backward(grad_output, input, normalized_shape, rstd, weight=None):
    """Gradients of rms_norm: returns (grad_input, grad_weight); grad_weight is
    sum over rows of dy * x * rstd, shape normalized_shape, the input's dtype."""
    shape = as_shape(normalized_shape)
    check_rows_input(input, shape, weight, None, "rms_norm_backward")
    check_grad_output(grad_output, input)
    rows = input.size // prod(shape) if prod(shape) else prod(input.shape[:input.ndim - len(shape)])
    rstd = check_stat(rstd, "rstd", rows)
    grad_input, grad_weight, _ = rows_backward(grad_output, input, shape, weight, None, rstd, False)
    return grad_input, grad_weight


# ------------------------------------------------------------- shared steps
# Also used by the LayerNorm/RMSNorm layers, which know their shapes already.

def rms_eps(dtype, eps):
    return float(np.finfo(dtype).eps) if eps is None else eps


def check_rows_input(x, shape, weight, bias, what):
    check_float_array(x, "input")
    check_trailing(x, shape, what)
    check_param(x, weight, "weight", shape)
    check_param(x, bias, "bias", shape)


def rows_forward(x, shape, weight, bias, eps, centered, out):
    """Checked input -> (output, mean or None, rstd); statistics shaped like the leading dims."""
    lead = x.shape[:x.ndim - len(shape)]
    size = prod(shape)
    x = contiguous(x)
    y = out if out is not None and out.flags.c_contiguous else np.empty(x.shape, x.dtype)
    rows = x.size // size if size else prod(lead)
    rstd = np.empty(lead)
    mean = np.empty(lead) if centered else None
    if x.size:
        weight, bias = param_or(weight, size, x.dtype, 1), param_or(bias, size, x.dtype, 0)
        kernels.row_forward(x, weight, bias, rows, 1, size, 1, False, centered, eps, y, mean,
                            rstd, None, threads_for(x.size))
        refit_rows(x, y, weight, bias, mean, rstd, None, eps)   # huge values: see _overflow.py
    else:  # no values: statistics of empty rows are undefined
        rstd.fill(np.nan)
        if mean is not None:
            mean.fill(np.nan)
    if out is not None and y is not out:
        np.copyto(out, y)
        y = out
    return y, mean, rstd


def rows_backward(grad_output, x, shape, weight, mean, rstd, centered):
    """Checked arguments -> (grad_input, grad_weight, grad_bias or None)."""
    size = prod(shape)
    x = contiguous(x)
    dy = contiguous(grad_output)
    grad_input = np.empty(x.shape, x.dtype)
    grad_weight = np.empty(shape, x.dtype)
    grad_bias = np.empty(shape, x.dtype) if centered else None
    if x.size:
        kernels.row_backward(x, dy, param_or(weight, size, x.dtype, 1), x.size // size, 1, size,
                             1, False, centered, mean, rstd, grad_input, grad_weight, grad_bias,
                             threads_for(x.size))
    else:
        grad_weight[...] = 0
        if grad_bias is not None:
            grad_bias[...] = 0
    return grad_input, grad_weight, grad_bias
