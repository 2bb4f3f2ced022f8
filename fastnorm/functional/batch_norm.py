"""Batch normalization: statistics per channel over the batch and spatial axes.

    y = (x - mean[c]) / sqrt(var[c] + eps) * weight[c] + bias[c]

Forward entry points mirror torch: batch_norm(...) returns the output and
updates running_mean/running_var in place; native_batch_norm(...) also returns
the statistics it normalized with, which batch_norm_backward(...) needs.

activation= (None, "relu", "silu", "gelu" or "gelu_tanh") fuses an activation:
the output is act(y), computed in the same pass, and backward includes its
derivative ("gelu" is the exact erf form, "gelu_tanh" torch's tanh approximation).
"""
import numpy as np

from .._activation import activation_code, check_activation
from .._kernels import kernels
from .._overflow import overflowed_channels
from .._layout import contiguous, deliver, input_view, kernel_view, output_for
from .._threads import threads_for
from .._validation import (
    check_float_array, check_grad_output, check_out, check_vector,
)

__all__ = ["batch_norm", "native_batch_norm", "batch_norm_backward"]


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, activation=None, out=None):
    """torch.nn.functional.batch_norm for NumPy arrays of shape (N, C, *).

    In training, normalizes with the batch statistics and, when running_mean
    and running_var are given, updates them in place:
        running = (1 - momentum) * running + momentum * batch_stat
    with the unbiased batch variance. Otherwise normalizes with the running
    statistics. Returns the output (a new array in the input's layout, or out),
    act(output) with an activation.
    """
    return native_batch_norm(input, weight, bias, running_mean, running_var, training,
                             momentum, eps, activation=activation, out=out)[0]


def native_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps,
                      *, activation=None, out=None):
    """Like torch.native_batch_norm: returns (output, save_mean, save_invstd).

    save_mean and save_invstd are float64 (C,) arrays: the batch mean and
    1/sqrt(biased var + eps) in training, the running ones otherwise. Pass
    them to batch_norm_backward (with the same weight, bias and activation).
    """
    x = input
    _check_forward(x, weight, bias, running_mean, running_var, training, momentum, eps, out)
    act = activation_code(check_activation(activation))
    channels = x.shape[1]
    count = x.size // channels
    view, channels_last = input_view(x)
    target, y_view = output_for(x, channels_last, out)
    n_threads = threads_for(x.size)
    if training:
        weight64 = _per_channel(weight, channels, 1.0)
        bias64 = _per_channel(bias, channels, 0.0)
        stats = np.empty((3, channels))
        mean, var, invstd = stats
        if count > 0:
            kernels.channel_forward_train(view, weight64, bias64, float(eps), y_view, mean, var,
                                          n_threads, act)
            # huge values overflow the kernels' sums: see _overflow.py
            if kernels.channel_invstd(mean, var, eps, invstd) and overflowed_channels(
                    view, mean, var):
                kernels.channel_invstd(mean, var, eps, invstd)
                kernels.channel_normalize(view, mean, weight64 * invstd, bias64, y_view,
                                          n_threads, act)
            if running_mean is not None:
                kernels.channel_update_running(running_mean, running_var, mean, var, count,
                                               momentum)
        else:
            mean[:], var[:] = 0.0, 1.0
            invstd[:] = 1.0 / np.sqrt(1.0 + eps)
    else:
        coefficients = np.empty((4, channels))
        kernels.channel_eval_coefficients(_contiguous(running_mean), _contiguous(running_var),
                                          _contiguous(weight), _contiguous(bias), float(eps),
                                          coefficients)
        mean, invstd, scale, shift = coefficients
        if count > 0:
            kernels.channel_normalize(view, mean, scale, shift, y_view, n_threads, act)
    return deliver(target, out), mean, invstd


def batch_norm_backward(grad_output, input, save_mean, save_invstd, weight=None, training=True,
                        *, bias=None, activation=None):
    """Gradients of native_batch_norm: returns (grad_input, grad_weight, grad_bias).

    input is the forward's input; save_mean/save_invstd what native_batch_norm
    returned. training=True differentiates through the batch statistics;
    training=False treats them as constants (eval mode). grad_weight and
    grad_bias are in the input's dtype (computed as if weight were ones when
    it is None). grad_input has the input's layout. With the forward's
    activation, pass its bias too: the pre-activation values are recomputed from
    input (nothing else is stored), and the gradients include act's derivative.
    """
    x = input
    _check_backward(grad_output, x, save_mean, save_invstd, weight)
    check_vector(x, bias, "bias", x.shape[1])
    act = activation_code(check_activation(activation))
    channels = x.shape[1]
    view, channels_last = input_view(x)
    grad_view = kernel_view(grad_output, channels_last)
    grad_input, grad_input_view = output_for(x, channels_last)
    sum_dy = np.zeros(channels)
    sum_dy_xmu = np.zeros(channels)
    if x.size > 0:
        kernels.channel_backward(view, grad_view, np.require(save_mean, np.float64, "CA"),
                                 np.require(save_invstd, np.float64, "CA"),
                                 _per_channel(weight, channels, 1.0), bool(training),
                                 grad_input_view, sum_dy, sum_dy_xmu, threads_for(x.size), act,
                                 _per_channel(bias, channels, 0.0))
    grad_weight = (sum_dy_xmu * save_invstd).astype(x.dtype)
    grad_bias = sum_dy.astype(x.dtype)
    return grad_input, grad_weight, grad_bias


# ------------------------------------------------------------------ helpers

def _check_forward(x, weight, bias, running_mean, running_var, training, momentum, eps, out,
                   check_batch_size=True):
    """Everything a forward needs, checked before any work. check_batch_size=False
    leaves the "more than 1 value per channel" rule to the caller (SyncBatchNorm
    applies it to the global batch)."""
    check_float_array(x, "input")
    if x.ndim < 2:
        raise ValueError(f"batch_norm expects an input of shape (N, C, *), got {x.ndim}-D shape {x.shape}")
    channels = x.shape[1]
    if channels < 1:
        raise ValueError(f"batch_norm expects at least one channel, got shape {x.shape}")
    check_vector(x, weight, "weight", channels)
    check_vector(x, bias, "bias", channels)
    check_vector(x, running_mean, "running_mean", channels)
    check_vector(x, running_var, "running_var", channels)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")
    if running_mean is not None and training:
        for name, buf in (("running_mean", running_mean), ("running_var", running_var)):
            if not buf.flags.writeable:
                raise ValueError(f"{name} is read-only but training updates it in place")
    if check_batch_size and training and x.size == channels:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input of shape {x.shape}"
        )
    if not (eps >= 0):
        raise ValueError(f"eps must be >= 0, got {eps}")
    if training and running_mean is not None and not (0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    check_out(x, out)


def _check_backward(grad_output, x, save_mean, save_invstd, weight):
    check_float_array(x, "input")
    check_grad_output(grad_output, x)
    channels = x.shape[1]
    check_vector(x, weight, "weight", channels)
    for name, stat in (("save_mean", save_mean), ("save_invstd", save_invstd)):
        if not isinstance(stat, np.ndarray) or stat.shape != (channels,):
            raise ValueError(f"{name} must be an array of shape ({channels},)")


def _contiguous(vector):
    """A per-channel vector (or None) as contiguous, aligned memory for a kernel."""
    return None if vector is None else contiguous(vector)


def _per_channel(param, channels, default):
    """A float64 copy of a per-channel parameter (or the default when it is None)."""
    if param is None:
        return np.full(channels, default)
    return param.astype(np.float64)
