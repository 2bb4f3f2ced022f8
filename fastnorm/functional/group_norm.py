"""Group normalization and instance normalization of (N, C, *) arrays.

    group_norm:    statistics per (sample, group of C/G channels) over the
                   group's channels and all spatial positions;
    instance_norm: statistics per (sample, channel) over the spatial positions
                   (GroupNorm with one channel per group), optionally updating
                   running statistics averaged over the batch; with
                   use_input_stats=False it normalizes with the running ones.
    y = (x - mean) / sqrt(var + eps) * weight[c] + bias[c]

Channels-last memory (x_nhwc.transpose(0, 3, 1, 2)) is processed in place and
the output keeps that layout. Each form has a native_* twin that also returns
the statistics, and a backward taking them. Statistics are float64 (N, G)
arrays (N, C for instance_norm with input statistics).

activation= (None, "relu", "silu", "gelu" or "gelu_tanh"; beyond torch's API)
fuses an activation: the output is act(y), computed in the same pass; the
backward forms take the same activation and the bias and include its derivative.
"""
import numpy as np

from .._activation import activation_code, check_activation
from .._kernels import kernels
from .._memory import empty as empty_output
from .._overflow import refit_rows
from .._layout import (
    channels_to_last, contiguous, deliver, is_channels_last, is_kernel_array, kernel_view,
    output_for,
)
from .._threads import threads_for
from .._validation import check_float_array, check_grad_output, check_out
from ._rows import check_eps_value, check_param, check_stat, param_or, prod
from .batch_norm import batch_norm_backward, native_batch_norm

__all__ = [
    "group_norm", "native_group_norm", "group_norm_backward",
    "instance_norm", "native_instance_norm", "instance_norm_backward",
]


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *, activation=None,
               out=None):
    """torch.nn.functional.group_norm for NumPy arrays of shape (N, C, *)
    (act of the output with an activation)."""
    return native_group_norm(input, num_groups, weight, bias, eps, activation=activation,
                             out=out)[0]


def native_group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *, activation=None,
                      out=None):
    """group_norm returning (output, mean, rstd): float64 (N, G) statistics
    (rstd = 1/sqrt(var + eps)) to pass to group_norm_backward."""
    check_group_input(input, num_groups, weight, bias, "group_norm")
    check_eps_value(eps)
    act = activation_code(check_activation(activation))
    check_out(input, out)
    y, mean, rstd, _ = groups_forward(input, num_groups, weight, bias, eps, out, act=act)
    return y, mean, rstd


def group_norm_backward(grad_output, input, num_groups, mean, rstd, weight=None, *, bias=None,
                        activation=None):
    """Gradients of group_norm: returns (grad_input, grad_weight, grad_bias).

    grad_weight = sum over batch and space of dy * xhat, grad_bias = sum of dy,
    per channel in the input's dtype (computed as if weight were ones when it
    is None). grad_input has the input's layout. With the forward's activation,
    pass its bias too: dy is first multiplied by act'(y), y recomputed from input.
    """
    check_group_input(input, num_groups, weight, bias, "group_norm_backward")
    check_grad_output(grad_output, input)
    act = activation_code(check_activation(activation))
    count = input.shape[0] * num_groups
    mean = check_stat(mean, "mean", count)
    rstd = check_stat(rstd, "rstd", count)
    return groups_backward(grad_output, input, num_groups, weight, mean, rstd, act, bias)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, *, activation=None, out=None):
    """torch.nn.functional.instance_norm for NumPy arrays of shape (N, C, *).

    use_input_stats=True normalizes each (sample, channel) with its own
    statistics and, when running_mean/running_var are given, updates them in
    place with the batch average of the instance statistics (unbiased variance):
        running = (1 - momentum) * running + momentum * batch_average
    use_input_stats=False normalizes with the running statistics.
    """
    return native_instance_norm(input, running_mean, running_var, weight, bias,
                                use_input_stats, momentum, eps, activation=activation,
                                out=out)[0]


def native_instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                         use_input_stats=True, momentum=0.1, eps=1e-5, *, activation=None,
                         out=None):
    """instance_norm returning (output, mean, rstd) for instance_norm_backward:
    float64 (N, C) instance statistics, or (C,) running ones when
    use_input_stats=False."""
    x = input
    check_instance_input(x, running_mean, running_var, weight, bias, use_input_stats, momentum,
                         eps)
    activation = check_activation(activation)
    check_out(x, out)
    return instance_forward(x, running_mean, running_var, weight, bias, use_input_stats,
                            momentum, eps, activation, out)


def instance_forward(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps,
                     activation, out):
    """native_instance_norm of checked arguments (activation: a checked name or None).
    The InstanceNorm layers call it directly: their parameters, eps and momentum were
    checked at construction, and a tiny call's time is mostly Python."""
    if not use_input_stats:
        return native_batch_norm(x, weight, bias, running_mean, running_var, False, 0.0, eps,
                                 activation=activation, out=out)
    act = activation_code(activation)
    channels = x.shape[1]
    tracking = running_mean is not None
    y, mean, rstd, var = groups_forward(x, channels, weight, bias, eps, out, want_var=tracking,
                                        act=act)
    if tracking and x.size:
        spatial = x.size // (x.shape[0] * channels)
        batch_mean = mean.mean(axis=0)
        batch_var = (var * (spatial / (spatial - 1))).mean(axis=0)
        running_mean[...] = (1.0 - momentum) * running_mean + momentum * batch_mean
        running_var[...] = (1.0 - momentum) * running_var + momentum * batch_var
    return y, mean, rstd


def instance_norm_backward(grad_output, input, mean, rstd, weight=None, use_input_stats=True,
                           *, bias=None, activation=None):
    """Gradients of instance_norm: returns (grad_input, grad_weight, grad_bias).

    mean/rstd are what native_instance_norm returned for the same
    use_input_stats. With use_input_stats=False the (running) statistics are
    constants, as in torch's eval mode. With the forward's activation, pass its
    bias too.
    """
    x = input
    check_float_array(x, "input")
    if x.ndim < 2:
        raise ValueError("instance_norm_backward expects an input of shape (N, C, *), "
                         f"got {x.shape}")
    if not use_input_stats:
        return batch_norm_backward(grad_output, x, mean, rstd, weight, training=False, bias=bias,
                                   activation=activation)
    return group_norm_backward(grad_output, x, x.shape[1], mean, rstd, weight, bias=bias,
                               activation=activation)


# ------------------------------------------------------------------ checks

def check_group_input(x, num_groups, weight, bias, what):
    check_float_array(x, "input")
    if x.ndim < 2:
        raise ValueError(f"{what} expects an input of shape (N, C, *), "
                         f"got {x.ndim}-D shape {x.shape}")
    channels = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
    if num_groups < 1 or channels % num_groups:
        raise ValueError(
            f"{what}: the input's {channels} channels (shape {x.shape}) are not divisible "
            f"into num_groups={num_groups} groups"
        )
    check_param(x, weight, "weight", (channels,))
    check_param(x, bias, "bias", (channels,))


def check_instance_input(x, running_mean, running_var, weight, bias, use_input_stats, momentum,
                         eps):
    check_group_input(x, 1, weight, bias, "instance_norm")
    check_eps_value(eps)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if not use_input_stats and running_mean is None:
        raise ValueError("running_mean and running_var are required when use_input_stats=False")
    if use_input_stats and running_mean is not None and (
            momentum is None or not 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    check_instance_arrays(x, running_mean, running_var, use_input_stats)


def check_instance_arrays(x, running_mean, running_var, use_input_stats):
    """The checks of an instance norm that depend on the input (the layers' share of
    check_instance_input): running statistics of its dtype and channels, more than one
    spatial element when normalizing with its own statistics, and running statistics
    that can then be updated in place."""
    channels = x.shape[1]
    check_param(x, running_mean, "running_mean", (channels,))
    check_param(x, running_var, "running_var", (channels,))
    if not use_input_stats:
        return
    if prod(x.shape[2:]) == 1:
        raise ValueError(
            f"Expected more than 1 spatial element when training, got input of shape {x.shape}"
        )
    if running_mean is not None:
        for name, buf in (("running_mean", running_mean), ("running_var", running_var)):
            if not buf.flags.writeable:
                raise ValueError(f"{name} is read-only but use_input_stats updates it in place")


# -------------------------------------------------------------- kernels

def groups_forward(x, num_groups, weight, bias, eps, out, want_var=False, act=0):
    """Checked input -> (output, mean, rstd, var or None), statistics (N, G)."""
    n, channels = x.shape[0], x.shape[1]
    spatial = prod(x.shape[2:])
    empty = np.full if x.size == 0 else _empty   # statistics of empty groups are NaN
    mean = empty((n, num_groups), np.nan)
    rstd = empty((n, num_groups), np.nan)
    var = empty((n, num_groups), np.nan) if want_var else None
    weight = param_or(weight, channels, x.dtype, 1)
    bias = param_or(bias, channels, x.dtype, 0)
    threads = threads_for(x.size)
    if is_channels_last(x):
        target, view = output_for(x, True, out)
        if x.size:
            overflowed = kernels.groups_cl_forward(
                _channels_last_view(x), weight, bias, n, spatial, channels, num_groups, eps,
                view.reshape(n, spatial, channels), mean, rstd, var, threads, act)
            if overflowed and not act:  # huge values: see _overflow.py (activations: not refit)
                refit = contiguous(target)  # refit_rows works on (N, C, *) memory
                refit_rows(contiguous(x), refit, weight, bias, mean, rstd, var, eps,
                           num_groups, spatial)
                target[...] = refit
        return deliver(target, out), mean, rstd, var
    x = contiguous(x)
    y = out if out is not None and is_kernel_array(out) else empty_output(x.shape, x.dtype)
    if x.size:
        overflowed = kernels.row_forward(x, weight, bias, n * num_groups, channels // num_groups,
                                         spatial, num_groups, True, True, eps, y, mean, rstd,
                                         var, threads, act)
        if overflowed and not act:  # huge values: see _overflow.py (fused activations: not refit)
            refit_rows(x, y, weight, bias, mean, rstd, var, eps, num_groups, spatial)
    return deliver(y, out), mean, rstd, var


def groups_backward(grad_output, x, num_groups, weight, mean, rstd, act=0, bias=None):
    n, channels = x.shape[0], x.shape[1]
    spatial = prod(x.shape[2:])
    weight = param_or(weight, channels, x.dtype, 1)
    bias = param_or(bias, channels, x.dtype, 0)
    grad_weight = np.zeros(channels, x.dtype)
    grad_bias = np.zeros(channels, x.dtype)
    threads = threads_for(x.size)
    if is_channels_last(x):
        grad_input, grad_view = output_for(x, True)
        if x.size:
            dy = kernel_view(grad_output, True)
            kernels.groups_cl_backward(_channels_last_view(x), dy.reshape(n, spatial, channels),
                                       weight, n, spatial, channels, num_groups, mean, rstd,
                                       grad_view.reshape(n, spatial, channels), grad_weight,
                                       grad_bias, threads, act, bias)
        return grad_input, grad_weight, grad_bias
    x = contiguous(x)
    dy = contiguous(grad_output)
    grad_input = empty_output(x.shape, x.dtype)
    if x.size:
        kernels.row_backward(x, dy, weight, n * num_groups, channels // num_groups, spatial,
                             num_groups, True, True, mean, rstd, grad_input, grad_weight,
                             grad_bias, threads, act, bias)
    return grad_input, grad_weight, grad_bias


def _empty(shape, _fill):
    return np.empty(shape)


def _channels_last_view(x):
    """(N, S, C) C-contiguous view of channels-last memory (no copy)."""
    return channels_to_last(x).reshape(x.shape[0], -1, x.shape[1])
