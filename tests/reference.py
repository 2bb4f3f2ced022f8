"""Plain float64 NumPy reference implementations of the normalization layers.

This module is the test-suite's oracle.  It is written to be *read*: every
function follows the textbook formula with explicit axis reductions, means and
variances are computed in two passes (mean first, then the mean of squared
deviations), and everything is done in float64.  It does not import torch or
fastnorm.

Conventions shared by all functions
-----------------------------------
* Inputs are converted with ``np.asarray(x, dtype=np.float64)``; results are
  new float64 arrays.  Arguments are never modified.
* ``x`` of BatchNorm / GroupNorm / InstanceNorm / LRN has shape (N, C, *),
  channel axis 1.  LayerNorm / RMSNorm normalize over the trailing
  ``normalized_shape`` dimensions.
* ``weight`` (gamma) and ``bias`` (beta) may be ``None``, meaning 1 and 0.
* Backward functions return the gradient w.r.t. the input and the gradients
  w.r.t. the affine parameters *always*, computed as if the parameter were
  present (gamma=1 / beta=0 when it is None).  A caller whose layer has no such
  parameter simply ignores that entry.
* ``var`` denotes the biased variance (divide by m), which is what the
  normalization uses; the running variance is updated with the unbiased one
  (divide by m - 1), as in PyTorch.

Notation: m is the number of elements a statistic is taken over,
mu = (1/m) sum x,  var = (1/m) sum (x - mu)^2,  invstd = 1 / sqrt(var + eps),
xhat = (x - mu) * invstd,  y = gamma * xhat + beta.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

__all__ = [
    "BatchNormResult",
    "InstanceNormResult",
    "batch_norm_forward",
    "batch_norm_backward",
    "layer_norm_forward",
    "layer_norm_backward",
    "rms_norm_forward",
    "rms_norm_backward",
    "group_norm_forward",
    "group_norm_backward",
    "instance_norm_forward",
    "instance_norm_backward",
    "local_response_norm_forward",
    "local_response_norm_backward",
    "finite_difference_grad",
]


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------

def _f64(a):
    """None stays None, anything else becomes a float64 ndarray."""
    if a is None:
        return None
    return np.asarray(a, dtype=np.float64)


def _channel_shape(x):
    """Shape that broadcasts a per-channel vector (C,) against x (N, C, *)."""
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def _per_channel(v, x, fill):
    """Per-channel parameter (C,) reshaped for broadcasting; None -> fill."""
    if v is None:
        v = np.full(x.shape[1], fill, dtype=np.float64)
    return _f64(v).reshape(_channel_shape(x))


def _mean_var(x, axes):
    """Two-pass mean and biased variance over ``axes`` (kept as size-1 dims)."""
    mean = np.mean(x, axis=axes, keepdims=True)
    var = np.mean((x - mean) ** 2, axis=axes, keepdims=True)
    return mean, var


def _normalized_shape(normalized_shape):
    if isinstance(normalized_shape, (int, np.integer)):
        return (int(normalized_shape),)
    return tuple(int(s) for s in normalized_shape)


def _trailing_axes(x, normalized_shape):
    ns = _normalized_shape(normalized_shape)
    if len(ns) == 0 or len(ns) > x.ndim or x.shape[x.ndim - len(ns):] != ns:
        raise ValueError(f"input shape {x.shape} does not end with normalized_shape {ns}")
    return tuple(range(x.ndim - len(ns), x.ndim)), ns


# --------------------------------------------------------------------------
# BatchNorm
# --------------------------------------------------------------------------

class BatchNormResult(NamedTuple):
    """Result of :func:`batch_norm_forward` (also unpacks as a tuple).

    y                    normalized output, x's shape
    running_mean         updated running mean (C,), or None if not updated
    running_var          updated running variance (C,), or None if not updated
    mean                 (C,) mean used for normalizing (batch or running)
    var                  (C,) variance used for normalizing (biased batch var, or running var)
    num_batches_tracked  updated counter (num_batches_tracked + 1 when the
                         running stats were updated, else unchanged)
    """
    y: np.ndarray
    running_mean: Optional[np.ndarray]
    running_var: Optional[np.ndarray]
    mean: np.ndarray
    var: np.ndarray
    num_batches_tracked: int


def _running_update(old, new, momentum, num_batches_tracked):
    """PyTorch's running-statistic update.

    momentum given:  r <- (1 - momentum) * r + momentum * new
    momentum None:   cumulative average, factor = 1 / (num_batches_tracked + 1)
                     (num_batches_tracked is the count *before* this batch).
    """
    if momentum is None:
        factor = 1.0 / (num_batches_tracked + 1)
    else:
        factor = float(momentum)
    return (1.0 - factor) * old + factor * new


def batch_norm_forward(x, weight, bias, eps, running_mean=None, running_var=None,
                       training=True, momentum=0.1, num_batches_tracked=0):
    """BatchNorm forward for x of shape (N, C, *).

    Statistics per channel c over the m = N * prod(spatial) elements of
    x[:, c, ...]:
        mean_c = (1/m) sum x,   var_c = (1/m) sum (x - mean_c)^2   (biased)
        y = (x - mean_c) / sqrt(var_c + eps) * weight_c + bias_c

    training=True: batch statistics are used; if running_mean/running_var are
    given they are updated (new arrays are returned, the arguments are not
    modified) with the *unbiased* variance var_c * m / (m - 1):
        r <- (1 - momentum) * r + momentum * batch_stat
    momentum=None means a cumulative average with factor
    1 / (num_batches_tracked + 1).

    training=False: running_mean/running_var are used.  If they are None, the
    batch statistics are used instead (PyTorch's behaviour for
    track_running_stats=False), and nothing is updated.

    Returns a :class:`BatchNormResult` (y, running_mean, running_var, mean,
    var, num_batches_tracked).
    """
    x = _f64(x)
    if x.ndim < 2:
        raise ValueError("batch_norm expects (N, C, *) input")
    running_mean = _f64(running_mean)
    running_var = _f64(running_var)
    have_running = running_mean is not None and running_var is not None
    axes = (0,) + tuple(range(2, x.ndim))
    m = x.size // x.shape[1]

    if training or not have_running:
        mean, var = _mean_var(x, axes)
        mean = mean.reshape(-1)
        var = var.reshape(-1)
    else:
        mean, var = running_mean.copy(), running_var.copy()

    new_rm = new_rv = None
    nbt = num_batches_tracked
    if training and have_running:
        if m <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {x.shape}")
        unbiased_var = var * m / (m - 1)
        new_rm = _running_update(running_mean, mean, momentum, num_batches_tracked)
        new_rv = _running_update(running_var, unbiased_var, momentum, num_batches_tracked)
        nbt = num_batches_tracked + 1

    cs = _channel_shape(x)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean.reshape(cs)) * invstd.reshape(cs)
    y = xhat * _per_channel(weight, x, 1.0) + _per_channel(bias, x, 0.0)
    return BatchNormResult(y, new_rm, new_rv, mean, var, nbt)


def batch_norm_backward(x, grad_out, weight, eps, training=True, running_var=None,
                        running_mean=None):
    """BatchNorm backward.  Returns (grad_input, grad_weight, grad_bias).

    Per channel, with m elements, dy = grad_out, g = weight_c:

    training (batch statistics; also used when running stats are None):
        grad_bias   = sum dy
        grad_weight = sum dy * xhat = invstd * sum dy * (x - mean)
        grad_input  = g * invstd * (dy - (1/m) sum dy
                                    - (x - mean) * invstd^2 * (1/m) sum dy * (x - mean))
      (centered sums: sum dy and sum dy*(x - mean), never sum dy*x)

    eval (fixed running statistics; needs running_mean and running_var):
        grad_input  = dy * g / sqrt(running_var + eps)
        grad_weight = sum dy * (x - running_mean) / sqrt(running_var + eps)
        grad_bias   = sum dy
    """
    x = _f64(x)
    dy = _f64(grad_out)
    axes = (0,) + tuple(range(2, x.ndim))
    cs = _channel_shape(x)
    g = _per_channel(weight, x, 1.0)
    m = x.size // x.shape[1]

    if training or running_var is None:
        mean, var = _mean_var(x, axes)
        invstd = 1.0 / np.sqrt(var + eps)
        xc = x - mean
        sum_dy = np.sum(dy, axis=axes, keepdims=True)
        sum_dy_xc = np.sum(dy * xc, axis=axes, keepdims=True)
        grad_input = g * invstd * (dy - sum_dy / m - xc * invstd ** 2 * sum_dy_xc / m)
        grad_weight = (sum_dy_xc * invstd).reshape(-1)
        grad_bias = sum_dy.reshape(-1)
    else:
        if running_mean is None:
            raise ValueError("eval-mode batch_norm_backward needs running_mean and running_var")
        invstd = (1.0 / np.sqrt(_f64(running_var) + eps)).reshape(cs)
        xhat = (x - _f64(running_mean).reshape(cs)) * invstd
        grad_input = dy * g * invstd
        grad_weight = np.sum(dy * xhat, axis=axes)
        grad_bias = np.sum(dy, axis=axes)
    return grad_input, grad_weight, grad_bias


# --------------------------------------------------------------------------
# LayerNorm
# --------------------------------------------------------------------------

def layer_norm_forward(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """LayerNorm forward.  Returns y.

    Statistics per row over the trailing dims D = normalized_shape (m = prod D):
        y = (x - mean) / sqrt(var + eps) * weight + bias
    with weight, bias of shape normalized_shape (elementwise affine).
    """
    x = _f64(x)
    axes, ns = _trailing_axes(x, normalized_shape)
    mean, var = _mean_var(x, axes)
    y = (x - mean) / np.sqrt(var + eps)
    if weight is not None:
        y = y * _f64(weight).reshape(ns)
    if bias is not None:
        y = y + _f64(bias).reshape(ns)
    return y


def layer_norm_backward(x, grad_out, normalized_shape, weight=None, eps=1e-5):
    """LayerNorm backward.  Returns (grad_input, grad_weight, grad_bias).

    Per row (m elements), g = dy * weight:
        grad_input  = invstd * (g - (1/m) sum g - xhat * (1/m) sum g * xhat)
                    = invstd * (g - (1/m) sum g
                                - (x - mean) * invstd^2 * (1/m) sum g * (x - mean))
    Summed over all leading (row) dims:
        grad_weight = sum dy * xhat,   grad_bias = sum dy   (shape normalized_shape)
    """
    x = _f64(x)
    dy = _f64(grad_out)
    axes, ns = _trailing_axes(x, normalized_shape)
    lead = tuple(range(x.ndim - len(ns)))
    m = int(np.prod(ns))
    w = np.ones(ns) if weight is None else _f64(weight).reshape(ns)

    mean, var = _mean_var(x, axes)
    invstd = 1.0 / np.sqrt(var + eps)
    xc = x - mean
    g = dy * w
    sum_g = np.sum(g, axis=axes, keepdims=True)
    sum_g_xc = np.sum(g * xc, axis=axes, keepdims=True)
    grad_input = invstd * (g - sum_g / m - xc * invstd ** 2 * sum_g_xc / m)
    grad_weight = np.sum(dy * xc * invstd, axis=lead)
    grad_bias = np.sum(dy, axis=lead)
    return grad_input, grad_weight, grad_bias


# --------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------

def _rms_eps(x, eps):
    """eps=None means finfo(x.dtype).eps of the *given* input's dtype (PyTorch)."""
    if eps is not None:
        return float(eps)
    dt = np.asarray(x).dtype
    if not np.issubdtype(dt, np.floating):
        dt = np.dtype(np.float64)
    return float(np.finfo(dt).eps)


def rms_norm_forward(x, normalized_shape, weight=None, eps=None):
    """RMSNorm forward.  Returns y.

        rms = sqrt(mean(x^2 over the trailing dims) + eps)
        y = x / rms * weight
    eps=None means np.finfo(x.dtype).eps for the dtype of the x passed in
    (float32 input -> 1.19e-7), as torch does; pass eps explicitly to be sure.
    """
    eps = _rms_eps(x, eps)
    x = _f64(x)
    axes, ns = _trailing_axes(x, normalized_shape)
    ms = np.mean(x * x, axis=axes, keepdims=True)
    y = x / np.sqrt(ms + eps)
    if weight is not None:
        y = y * _f64(weight).reshape(ns)
    return y


def rms_norm_backward(x, grad_out, normalized_shape, weight=None, eps=None):
    """RMSNorm backward.  Returns (grad_input, grad_weight).

    With r = 1 / sqrt(mean(x^2) + eps), g = dy * weight, m = prod(normalized_shape):
        d r / d x_j = -r^3 x_j / m
        grad_input  = r * g - x * r^3 * (1/m) sum g * x
        grad_weight = sum over leading dims of dy * x * r
    eps=None as in :func:`rms_norm_forward`.
    """
    eps = _rms_eps(x, eps)
    x = _f64(x)
    dy = _f64(grad_out)
    axes, ns = _trailing_axes(x, normalized_shape)
    lead = tuple(range(x.ndim - len(ns)))
    m = int(np.prod(ns))
    w = np.ones(ns) if weight is None else _f64(weight).reshape(ns)

    r = 1.0 / np.sqrt(np.mean(x * x, axis=axes, keepdims=True) + eps)
    g = dy * w
    sum_gx = np.sum(g * x, axis=axes, keepdims=True)
    grad_input = r * g - x * r ** 3 * sum_gx / m
    grad_weight = np.sum(dy * x * r, axis=lead)
    return grad_input, grad_weight


# --------------------------------------------------------------------------
# GroupNorm
# --------------------------------------------------------------------------

def _grouped(x, num_groups):
    """View (N, C, *) as (N, G, C/G, prod(spatial))."""
    n, c = x.shape[0], x.shape[1]
    if c % num_groups != 0:
        raise ValueError(f"num_channels {c} is not divisible by num_groups {num_groups}")
    return x.reshape(n, num_groups, c // num_groups, -1)


def group_norm_forward(x, num_groups, weight=None, bias=None, eps=1e-5):
    """GroupNorm forward for x of shape (N, C, *).  Returns y.

    Channels are split into G = num_groups consecutive groups of C/G channels.
    Statistics per (n, group) over the C/G channels x all spatial positions:
        y = (x - mean_{n,g}) / sqrt(var_{n,g} + eps) * weight_c + bias_c
    """
    x = _f64(x)
    xg = _grouped(x, num_groups)
    mean, var = _mean_var(xg, (2, 3))
    xhat = ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape)
    return xhat * _per_channel(weight, x, 1.0) + _per_channel(bias, x, 0.0)


def group_norm_backward(x, grad_out, num_groups, weight=None, eps=1e-5):
    """GroupNorm backward.  Returns (grad_input, grad_weight, grad_bias).

    Per (n, group), m = C/G * prod(spatial) elements, g = dy * weight_c:
        grad_input  = invstd * (g - (1/m) sum g
                                - (x - mean) * invstd^2 * (1/m) sum g * (x - mean))
    Per channel c (sum over n and spatial):
        grad_weight = sum dy * xhat,   grad_bias = sum dy
    """
    x = _f64(x)
    dy = _f64(grad_out)
    g = dy * _per_channel(weight, x, 1.0)

    xg = _grouped(x, num_groups)
    gg = _grouped(g, num_groups)
    m = xg.shape[2] * xg.shape[3]
    mean, var = _mean_var(xg, (2, 3))
    invstd = 1.0 / np.sqrt(var + eps)
    xc = xg - mean
    sum_g = np.sum(gg, axis=(2, 3), keepdims=True)
    sum_g_xc = np.sum(gg * xc, axis=(2, 3), keepdims=True)
    grad_input = invstd * (gg - sum_g / m - xc * invstd ** 2 * sum_g_xc / m)
    grad_input = grad_input.reshape(x.shape)

    xhat = (xc * invstd).reshape(x.shape)
    axes = (0,) + tuple(range(2, x.ndim))
    grad_weight = np.sum(dy * xhat, axis=axes)
    grad_bias = np.sum(dy, axis=axes)
    return grad_input, grad_weight, grad_bias


# --------------------------------------------------------------------------
# InstanceNorm
# --------------------------------------------------------------------------

class InstanceNormResult(NamedTuple):
    """Result of :func:`instance_norm_forward` (also unpacks as a tuple).

    y                    output, x's shape
    running_mean         updated running mean (C,), or None if not updated
    running_var          updated running variance (C,), or None if not updated
    mean                 (N, C) per-instance means used (running mean broadcast when
                         use_input_stats=False)
    var                  (N, C) per-instance biased variances used (likewise)
    num_batches_tracked  num_batches_tracked + 1 if the running stats were updated,
                         else unchanged (PyTorch itself never increments it for
                         InstanceNorm; it is only needed for momentum=None)
    """
    y: np.ndarray
    running_mean: Optional[np.ndarray]
    running_var: Optional[np.ndarray]
    mean: np.ndarray
    var: np.ndarray
    num_batches_tracked: int


def instance_norm_forward(x, weight=None, bias=None, eps=1e-5, running_mean=None,
                          running_var=None, use_input_stats=True, momentum=0.1,
                          num_batches_tracked=0):
    """InstanceNorm forward for batched x of shape (N, C, *).

    (For an unbatched (C, *) input, call with x[None] and take y[0].)

    use_input_stats=True: statistics per (n, c) over the spatial positions
    (m = prod(spatial)):
        y = (x - mean_{n,c}) / sqrt(var_{n,c} + eps) * weight_c + bias_c
    If running_mean/running_var are given they are updated (new arrays are
    returned) with the batch average of the per-instance statistics, the
    variance being the unbiased one var_{n,c} * m / (m - 1):
        r_c <- (1 - momentum) * r_c + momentum * (1/N) sum_n stat_{n,c}
    momentum=None means a cumulative average with factor
    1 / (num_batches_tracked + 1) (fastnorm's choice; PyTorch never updates
    when momentum is None).

    use_input_stats=False: y = (x - running_mean_c) / sqrt(running_var_c + eps)
    * weight_c + bias_c, nothing updated.

    Returns an :class:`InstanceNormResult`.
    """
    x = _f64(x)
    if x.ndim < 2:
        raise ValueError("instance_norm expects (N, C, *) input")
    n, c = x.shape[0], x.shape[1]
    running_mean = _f64(running_mean)
    running_var = _f64(running_var)
    cs = _channel_shape(x)
    spatial = tuple(range(2, x.ndim))
    m = x.size // (n * c) if n * c else 0

    new_rm = new_rv = None
    nbt = num_batches_tracked
    if use_input_stats:
        mean, var = _mean_var(x, spatial)  # (N, C, 1, ...)
        if running_mean is not None and running_var is not None:
            if m <= 1:
                raise ValueError(
                    f"Expected more than 1 spatial element when training, got input size {x.shape}")
            batch_mean = np.mean(mean.reshape(n, c), axis=0)
            batch_unbiased_var = np.mean(var.reshape(n, c) * m / (m - 1), axis=0)
            new_rm = _running_update(running_mean, batch_mean, momentum, num_batches_tracked)
            new_rv = _running_update(running_var, batch_unbiased_var, momentum,
                                     num_batches_tracked)
            nbt = num_batches_tracked + 1
    else:
        if running_mean is None or running_var is None:
            raise ValueError("use_input_stats=False needs running_mean and running_var")
        mean = np.broadcast_to(running_mean.reshape(cs), (n, c) + (1,) * len(spatial))
        var = np.broadcast_to(running_var.reshape(cs), (n, c) + (1,) * len(spatial))

    xhat = (x - mean) / np.sqrt(var + eps)
    y = xhat * _per_channel(weight, x, 1.0) + _per_channel(bias, x, 0.0)
    return InstanceNormResult(y, new_rm, new_rv, np.array(mean).reshape(n, c),
                              np.array(var).reshape(n, c), nbt)


def instance_norm_backward(x, grad_out, weight=None, eps=1e-5, running_mean=None,
                           running_var=None, use_input_stats=True):
    """InstanceNorm backward.  Returns (grad_input, grad_weight, grad_bias).

    use_input_stats=True: per (n, c), m = prod(spatial), g = dy * weight_c:
        grad_input = invstd * (g - (1/m) sum g
                               - (x - mean) * invstd^2 * (1/m) sum g * (x - mean))
    (the running-statistics update does not affect gradients.)
    use_input_stats=False (fixed running stats):
        grad_input = dy * weight_c / sqrt(running_var_c + eps)
    In both cases, per channel (sum over n and spatial):
        grad_weight = sum dy * xhat,   grad_bias = sum dy
    """
    x = _f64(x)
    dy = _f64(grad_out)
    spatial = tuple(range(2, x.ndim))
    cs = _channel_shape(x)
    g = dy * _per_channel(weight, x, 1.0)

    if use_input_stats:
        m = x.size // (x.shape[0] * x.shape[1])
        mean, var = _mean_var(x, spatial)
        invstd = 1.0 / np.sqrt(var + eps)
        xc = x - mean
        sum_g = np.sum(g, axis=spatial, keepdims=True)
        sum_g_xc = np.sum(g * xc, axis=spatial, keepdims=True)
        grad_input = invstd * (g - sum_g / m - xc * invstd ** 2 * sum_g_xc / m)
        xhat = xc * invstd
    else:
        if running_mean is None or running_var is None:
            raise ValueError("use_input_stats=False needs running_mean and running_var")
        invstd = 1.0 / np.sqrt(_f64(running_var).reshape(cs) + eps)
        grad_input = g * invstd
        xhat = (x - _f64(running_mean).reshape(cs)) * invstd

    axes = (0,) + spatial
    grad_weight = np.sum(dy * xhat, axis=axes)
    grad_bias = np.sum(dy, axis=axes)
    return grad_input, grad_weight, grad_bias


# --------------------------------------------------------------------------
# LocalResponseNorm
# --------------------------------------------------------------------------

def _lrn_window(c, size, num_channels):
    """Channels c' in the window of output channel c, clipped to [0, C):
    c - size//2 <= c' <= c + (size-1)//2  (zero padding outside)."""
    lo = max(0, c - size // 2)
    hi = min(num_channels - 1, c + (size - 1) // 2)
    return range(lo, hi + 1)


def _lrn_scale(x, size, alpha, k):
    """s_c = k + alpha/size * sum_{c' in window(c)} a_{c'}^2, shape of x."""
    num_channels = x.shape[1]
    sq = x * x
    s = np.empty_like(x)
    for c in range(num_channels):
        acc = np.zeros_like(x[:, 0])
        for cp in _lrn_window(c, size, num_channels):
            acc = acc + sq[:, cp]
        s[:, c] = k + alpha / size * acc
    return s


def local_response_norm_forward(x, size, alpha=1e-4, beta=0.75, k=1.0):
    """LocalResponseNorm forward for x of shape (N, C, *) with >= 3 dims.  Returns y.

        s_c = k + alpha/size * sum_{c'=c-size//2}^{c+(size-1)//2} a_{c'}^2
        b_c = a_c / s_c^beta
    Channels outside [0, C) count as zero (the sum is always divided by size).
    """
    x = _f64(x)
    if x.ndim < 3:
        raise ValueError(f"local_response_norm expects >= 3 dims, got {x.ndim}")
    s = _lrn_scale(x, size, alpha, k)
    return x / s ** beta


def local_response_norm_backward(x, grad_out, size, alpha=1e-4, beta=0.75, k=1.0):
    """LocalResponseNorm backward.  Returns grad_input.

    Derivation (everything at one (n, spatial) position; W(c) is the window of
    output channel c, i.e. c - size//2 <= c' <= c + (size-1)//2):

        b_c = a_c * s_c^(-beta),  s_c = k + (alpha/size) * sum_{c' in W(c)} a_{c'}^2

        d s_c / d a_j = (2 alpha / size) * a_j * [j in W(c)]
        d b_c / d a_j = [c == j] * s_c^(-beta)
                        - beta * a_c * s_c^(-beta-1) * d s_c / d a_j

    so, with g = grad_out,

        grad a_j = sum_c g_c * d b_c / d a_j
                 = g_j * s_j^(-beta)
                   - (2 alpha beta / size) * a_j
                     * sum_{c : j in W(c)} g_c * a_c * s_c^(-beta-1)

    and  j in W(c)  <=>  j - (size-1)//2 <= c <= j + size//2  (clipped to [0, C)),
    the mirrored window (it differs from W(j) when size is even).
    """
    x = _f64(x)
    g = _f64(grad_out)
    if x.ndim < 3:
        raise ValueError(f"local_response_norm expects >= 3 dims, got {x.ndim}")
    num_channels = x.shape[1]
    s = _lrn_scale(x, size, alpha, k)
    t = g * x * s ** (-beta - 1.0)  # t_c = g_c a_c s_c^(-beta-1)

    grad_input = np.empty_like(x)
    for j in range(num_channels):
        lo = max(0, j - (size - 1) // 2)
        hi = min(num_channels - 1, j + size // 2)
        acc = np.zeros_like(x[:, 0])
        for c in range(lo, hi + 1):
            acc = acc + t[:, c]
        grad_input[:, j] = (g[:, j] * s[:, j] ** (-beta)
                            - 2.0 * alpha * beta / size * x[:, j] * acc)
    return grad_input


# --------------------------------------------------------------------------
# finite differences
# --------------------------------------------------------------------------

def finite_difference_grad(f, x, grad_out, h=1e-6):
    """Central-difference gradient of  L(x) = sum(f(x) * grad_out)  w.r.t. x.

        dL/dx_i ~= (L(x + h e_i) - L(x - h e_i)) / (2 h)

    ``f`` maps a float64 array of x's shape to an array (of grad_out's shape).
    For a weight or bias gradient, pass the parameter as ``x`` and close over
    the input, e.g. ``finite_difference_grad(lambda w: fwd(x, w, b), w, dy)``.
    x is copied, never modified.  Returns a float64 array of x's shape.
    """
    x = np.array(x, dtype=np.float64)  # a private copy
    grad_out = _f64(grad_out)
    grad = np.zeros_like(x)
    flat_x = x.reshape(-1)  # view into the copy
    flat_g = grad.reshape(-1)
    for i in range(flat_x.size):
        orig = flat_x[i]
        flat_x[i] = orig + h
        plus = np.sum(_f64(f(x)) * grad_out)
        flat_x[i] = orig - h
        minus = np.sum(_f64(f(x)) * grad_out)
        flat_x[i] = orig
        flat_g[i] = (plus - minus) / (2.0 * h)
    return grad
