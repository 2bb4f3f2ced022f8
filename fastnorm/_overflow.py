"""Statistics that overflowed in the kernels, recomputed without overflow.

The kernels add blocks of float32 values in float32 (full vector width, see
_simd.h), so squares of deviations above ~1.8e19 overflow and the variance of
perfectly finite float32 data comes back inf, or NaN from inf - inf. float64
kernels hit the same wall near 1e154 (their squares), where the true variance
may still be finite. Such data are rare, so nothing is checked inside the hot
loops: afterwards, a non-finite statistic of all-finite data marks its unit
(channel, row or group), which is recomputed here in float64 after scaling by
a power of two, so that no intermediate overflows. Units holding NaN or inf
keep their NaN: that is the input poisoning its own statistics, on purpose.
"""
import numpy as np


def scaled_moments(units, centered=True):
    """Per row of the 2-D array units: (mean, biased variance) in float64, or
    (zeros, mean of squares) when not centered. Only what no float64 can hold
    overflows (a variance above ~1.8e308 is inf, as the reference's is)."""
    x = np.asarray(units, dtype=np.float64)
    peak = np.max(np.abs(x), axis=1, keepdims=True)
    scale = np.ldexp(1.0, np.frexp(peak)[1])     # a power of two above |x|: exact division
    scale[peak == 0] = 1.0
    scaled = x / scale
    mean = scaled.mean(axis=1, keepdims=True) if centered else np.zeros_like(peak)
    spread = np.square(scaled - mean).mean(axis=1)
    scale = scale[:, 0]
    return mean[:, 0] * scale, spread * scale * scale


def overflowed_channels(view, mean, var):
    """Fix mean/var (C,) in place for the channels of the kernel view (N, C, S)
    whose statistics overflowed; True when any changed (their output must then
    be computed again)."""
    bad = np.flatnonzero(~(np.isfinite(mean) & np.isfinite(var)))
    if bad.size == 0:
        return False
    units = np.moveaxis(view[:, bad, :], 1, 0).reshape(bad.size, -1)
    finite = np.isfinite(units).all(axis=1)
    if not finite.any():
        return False
    bad, units = bad[finite], units[finite]
    mean[bad], var[bad] = scaled_moments(units)
    return True


def overflowed_rows(mean, rstd):
    """Rows (of the statistics' shape) whose statistics came out non-finite."""
    bad = ~(rstd > 0)          # 1/sqrt(inf) = 0; NaN fails the test too
    if mean is not None:
        bad |= ~np.isfinite(mean)
    return bad


def refit_rows(x, y, weight, bias, mean, rstd, var, eps, groups=1, spatial=None):
    """Rows whose statistics overflowed in row_forward: recompute their mean,
    rstd (and var when given) and output in place.

    x, y: C-contiguous, rstd.size rows. weight/bias as the kernel got them:
    one value per row element (LayerNorm/RMSNorm), or, given spatial, one per
    channel of (N, C, spatial) data in `groups` groups (row r is group r % groups).
    mean is None for RMSNorm (not centered). A variance of inf gives rstd = 0."""
    rstd_flat = rstd.reshape(-1)
    bad = overflowed_rows(mean, rstd).reshape(-1)
    if not bad.any():
        return
    rows = rstd_flat.size
    x2, y2 = x.reshape(rows, -1), y.reshape(rows, -1)
    bad = np.flatnonzero(bad)
    bad = bad[np.isfinite(x2[bad]).all(axis=1)]
    if bad.size == 0:
        return
    centered = mean is not None
    row_mean, spread = scaled_moments(x2[bad], centered)
    row_rstd = 1.0 / np.sqrt(spread + eps)
    rstd_flat[bad] = row_rstd
    if centered:
        mean.reshape(-1)[bad] = row_mean
    if var is not None:
        var.reshape(-1)[bad] = spread
    w, b = (_per_element(p, groups, spatial) for p in (weight, bias))
    which = bad % w.shape[0]
    xhat = (x2[bad] - row_mean[:, None]) * row_rstd[:, None]
    y2[bad] = xhat * w[which] + b[which]


def _per_element(param, groups, spatial):
    """(P, D) float64: row r of the data uses row r % P."""
    param = np.asarray(param, dtype=np.float64)
    if spatial is None:
        return param.reshape(1, -1)
    return np.repeat(param.reshape(groups, -1), spatial, axis=1)
