"""Layer normalization and RMS normalization: statistics per row over the
trailing normalized_shape dims, an affine parameter per element of the row.

    layer_norm: y = (x - mean) / sqrt(var + eps) * weight + bias
    rms_norm:   y = x / sqrt(mean(x**2) + eps) * weight

Each has torch's forward (layer_norm, rms_norm), a native_* form that also
returns the per-row statistics, and a backward taking those statistics.
Statistics are float64 arrays with one value per row, shaped like the
input's leading dims (x.shape[:-len(normalized_shape)]).

Fusions (additions to torch's API):
  * activation= (None, "relu", "silu", "gelu" or "gelu_tanh") on every form:
    the output is act(y), computed in the same pass; the backward forms take
    the same activation (and, for layer_norm, the bias) and include its
    derivative, recomputing y from the input and statistics.
  * add_layer_norm / add_rms_norm(x, residual, ...) -> (y, h): h = x + residual
    and y = norm(h), in one pass over memory (a transformer block's residual
    stream). Their backward forms take h and return the gradient with respect
    to h, which is the gradient for x and for residual alike, with grad_h (the
    gradient flowing into h from elsewhere, e.g. the residual stream) added.
"""
import numpy as np

from .._activation import activation_code, check_activation
from .._kernels import kernels
from .._layout import is_kernel_array
from .._memory import empty as empty_output
from .._overflow import refit_rows
from .._threads import threads_for
from .._validation import check_float_array, check_grad_output, check_like, check_out
from ._rows import (
    as_shape, check_eps_value, check_param, check_stat, check_trailing, contiguous, param_or,
    prod,
)

__all__ = [
    "layer_norm", "native_layer_norm", "layer_norm_backward",
    "rms_norm", "native_rms_norm", "rms_norm_backward",
    "add_layer_norm", "native_add_layer_norm", "add_layer_norm_backward",
    "add_rms_norm", "native_add_rms_norm", "add_rms_norm_backward",
]


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, activation=None,
               out=None):
    """torch.nn.functional.layer_norm for NumPy arrays: normalize over the last
    len(normalized_shape) dims. Returns a new C-contiguous array (or out),
    act(output) with an activation."""
    return native_layer_norm(input, normalized_shape, weight, bias, eps, activation=activation,
                             out=out)[0]


def native_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *,
                      activation=None, out=None):
    """Like torch.native_layer_norm: returns (output, mean, rstd), the per-row
    float64 mean and 1/sqrt(var + eps) to pass to layer_norm_backward."""
    shape = as_shape(normalized_shape)
    _, act = check_rows_forward(input, None, shape, weight, bias, eps, activation, out,
                                "layer_norm")
    y, _, mean, rstd = rows_forward(input, None, shape, weight, bias, eps, True, out, act)
    return y, mean, rstd


def layer_norm_backward(grad_output, input, normalized_shape, mean, rstd, weight=None, *,
                        bias=None, activation=None):
    """Gradients of layer_norm: returns (grad_input, grad_weight, grad_bias).

    input is the forward's input, mean/rstd what native_layer_norm returned.
    grad_weight = sum over rows of dy * xhat, grad_bias = sum of dy, both of
    shape normalized_shape in the input's dtype (computed even when the
    parameters are None, as if weight were ones). With the forward's
    activation, pass its bias too: dy is first multiplied by act'(y), y
    recomputed from input.
    """
    return _backward(grad_output, input, normalized_shape, mean, rstd, weight, bias, activation,
                     None, True, "layer_norm_backward")


def add_layer_norm(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5, *,
                   activation=None, out=None):
    """Fused residual add and layer_norm: returns (y, h) with h = input + residual
    and y = layer_norm(h) (act of it with an activation), in one pass over
    memory. out= receives y; h is a new C-contiguous array."""
    y, h, _, _ = native_add_layer_norm(input, residual, normalized_shape, weight, bias, eps,
                                       activation=activation, out=out)
    return y, h


def native_add_layer_norm(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5, *,
                          activation=None, out=None):
    """add_layer_norm returning (y, h, mean, rstd): the statistics of h, for
    add_layer_norm_backward."""
    shape = as_shape(normalized_shape)
    _, act = check_rows_forward(input, residual, shape, weight, bias, eps, activation, out,
                                "add_layer_norm")
    return rows_forward(input, residual, shape, weight, bias, eps, True, out, act)


def add_layer_norm_backward(grad_output, h, normalized_shape, mean, rstd, weight=None,
                            grad_h=None, *, bias=None, activation=None):
    """Gradients of add_layer_norm: returns (grad, grad_weight, grad_bias).

    h, mean, rstd are what native_add_layer_norm returned. grad is the gradient
    with respect to h plus grad_h when given (h's gradient from its other uses):
    the gradient for input and for residual alike. grad_weight and grad_bias
    are those of layer_norm_backward.
    """
    return _backward(grad_output, h, normalized_shape, mean, rstd, weight, bias, activation,
                     grad_h, True, "add_layer_norm_backward")


def rms_norm(input, normalized_shape, weight=None, eps=None, *, activation=None, out=None):
    """torch.nn.functional.rms_norm for NumPy arrays. eps=None means
    numpy.finfo(input.dtype).eps, as in torch. act(output) with an activation."""
    return native_rms_norm(input, normalized_shape, weight, eps, activation=activation,
                           out=out)[0]


def native_rms_norm(input, normalized_shape, weight=None, eps=None, *, activation=None,
                    out=None):
    """rms_norm returning (output, rstd): rstd = 1/sqrt(mean(x**2) + eps) per row,
    float64, to pass to rms_norm_backward."""
    shape = as_shape(normalized_shape)
    eps, act = check_rows_forward(input, None, shape, weight, None, eps, activation, out,
                                  "rms_norm", rms=True)
    y, _, _, rstd = rows_forward(input, None, shape, weight, None, eps, False, out, act)
    return y, rstd


def rms_norm_backward(grad_output, input, normalized_shape, rstd, weight=None, *,
                      activation=None):
    """Gradients of rms_norm: returns (grad_input, grad_weight); grad_weight is
    sum over rows of dy * x * rstd, shape normalized_shape, the input's dtype.
    With the forward's activation, dy is first multiplied by act'(y)."""
    grad_input, grad_weight, _ = _backward(grad_output, input, normalized_shape, None, rstd,
                                           weight, None, activation, None, False,
                                           "rms_norm_backward")
    return grad_input, grad_weight


def add_rms_norm(input, residual, normalized_shape, weight=None, eps=None, *, activation=None,
                 out=None):
    """Fused residual add and rms_norm: returns (y, h) with h = input + residual
    and y = rms_norm(h) (act of it with an activation), in one pass over memory."""
    y, h, _ = native_add_rms_norm(input, residual, normalized_shape, weight, eps,
                                  activation=activation, out=out)
    return y, h


def native_add_rms_norm(input, residual, normalized_shape, weight=None, eps=None, *,
                        activation=None, out=None):
    """add_rms_norm returning (y, h, rstd): rstd of h, for add_rms_norm_backward."""
    shape = as_shape(normalized_shape)
    eps, act = check_rows_forward(input, residual, shape, weight, None, eps, activation, out,
                                  "add_rms_norm", rms=True)
    y, h, _, rstd = rows_forward(input, residual, shape, weight, None, eps, False, out, act)
    return y, h, rstd


def add_rms_norm_backward(grad_output, h, normalized_shape, rstd, weight=None, grad_h=None, *,
                          activation=None):
    """Gradients of add_rms_norm: returns (grad, grad_weight), grad the gradient
    with respect to h (input and residual alike) plus grad_h when given."""
    grad, grad_weight, _ = _backward(grad_output, h, normalized_shape, None, rstd, weight, None,
                                     activation, grad_h, False, "add_rms_norm_backward")
    return grad, grad_weight


def _backward(grad_output, x, normalized_shape, mean, rstd, weight, bias, activation, grad_h,
              centered, what):
    """Every backward form: checks, then rows_backward."""
    shape = as_shape(normalized_shape)
    check_rows_input(x, shape, weight, bias, what)
    check_grad_output(grad_output, x)
    if grad_h is not None:
        check_like(grad_h, x, "grad_h", "h")
    act = activation_code(check_activation(activation))
    rows = x.size // prod(shape) if prod(shape) else prod(x.shape[:x.ndim - len(shape)])
    mean = check_stat(mean, "mean", rows) if centered else None
    rstd = check_stat(rstd, "rstd", rows)
    return rows_backward(grad_output, x, shape, weight, mean, rstd, centered, act, bias, grad_h)


# ------------------------------------------------------------- shared steps
# Also used by the LayerNorm/RMSNorm layers, which know their shapes already.

def rms_eps(dtype, eps):
    return float(np.finfo(dtype).eps) if eps is None else eps


def check_rows_input(x, shape, weight, bias, what):
    check_float_array(x, "input")
    check_trailing(x, shape, what)
    check_param(x, weight, "weight", shape)
    check_param(x, bias, "bias", shape)


def check_rows_forward(x, residual, shape, weight, bias, eps, activation, out, what, rms=False):
    """Every check of a row-family forward; returns (eps, the activation's kernel code),
    eps=None resolved for RMSNorm (rms=True)."""
    check_rows_input(x, shape, weight, bias, what)
    if residual is not None:
        check_like(residual, x, "residual", "the input")
    if rms:
        eps = rms_eps(x.dtype, eps)
    check_eps_value(eps)
    act = activation_code(check_activation(activation))
    check_out(x, out)
    if out is not None and residual is not None and np.may_share_memory(out, residual):
        raise ValueError("out must not overlap the residual (h is computed from it)")
    return eps, act


def rows_forward(x, residual, shape, weight, bias, eps, centered, out, act=0):
    """Checked input -> (output, normalized, mean or None, rstd); statistics shaped
    like the leading dims. normalized is the C-contiguous array the statistics are
    of (for backward): x, or h = x + residual with a residual."""
    lead = x.shape[:x.ndim - len(shape)]
    size = prod(shape)
    x = contiguous(x)
    y = out if out is not None and is_kernel_array(out) else empty_output(x.shape, x.dtype)
    h = None
    if residual is not None:
        residual = contiguous(residual)
        h = empty_output(x.shape, x.dtype)
    rows = x.size // size if size else prod(lead)
    rstd = np.empty(lead)
    mean = np.empty(lead) if centered else None
    if x.size:
        weight, bias = param_or(weight, size, x.dtype, 1), param_or(bias, size, x.dtype, 0)
        overflowed = kernels.row_forward(x, weight, bias, rows, 1, size, 1, False, centered,
                                         eps, y, mean, rstd, None, threads_for(x.size), act,
                                         residual, h)
        if overflowed and not act:  # huge values: see _overflow.py (fused activations: not refit)
            refit_rows(x if residual is None else h, y, weight, bias, mean, rstd, None, eps)
    else:  # no values: statistics of empty rows are undefined
        rstd.fill(np.nan)
        if mean is not None:
            mean.fill(np.nan)
    if out is not None and y is not out:
        np.copyto(out, y)
        y = out
    return y, (x if h is None else h), mean, rstd


def rows_backward(grad_output, x, shape, weight, mean, rstd, centered, act=0, bias=None,
                  grad_h=None):
    """Checked arguments -> (grad_input, grad_weight, grad_bias or None)."""
    size = prod(shape)
    x = contiguous(x)
    dy = contiguous(grad_output)
    grad_input = empty_output(x.shape, x.dtype)
    grad_weight = np.empty(shape, x.dtype)
    grad_bias = np.empty(shape, x.dtype) if centered else None
    if x.size:
        kernels.row_backward(x, dy, param_or(weight, size, x.dtype, 1), x.size // size, 1, size,
                             1, False, centered, mean, rstd, grad_input, grad_weight, grad_bias,
                             threads_for(x.size), act, param_or(bias, size, x.dtype, 0),
                             None if grad_h is None else contiguous(grad_h))
    else:
        grad_weight[...] = 0
        if grad_bias is not None:
            grad_bias[...] = 0
    return grad_input, grad_weight, grad_bias
