"""The floor: plain NumPy layers, written the way a NumPy user would.

They work in the input's dtype with NumPy's own (single-threaded) reductions,
keep what backward needs from forward, and follow fastnorm's layer protocol
(layer(x), layer.backward(dy), train()/eval(), named_parameters()), so the
runner times them exactly like fastnorm. They are for timing, not accuracy
(tests/reference.py is the float64 oracle).
"""
import numpy as np

from fastnorm import NormLayer

__all__ = ["FLOORS"]


def _standardize(x, axes, eps, center=True):
    """(x - mean) / sqrt(var + eps) over axes (two-pass), and the invstd used."""
    xc = x - x.mean(axis=axes, keepdims=True) if center else x
    invstd = 1.0 / np.sqrt(np.mean(xc * xc, axis=axes, keepdims=True) + eps)
    return xc * invstd, invstd


def _standardize_backward(g, xhat, invstd, axes, center=True):
    """dL/dx given g = dL/dxhat, through the statistics taken over axes."""
    projection = np.mean(g * xhat, axis=axes, keepdims=True)
    if center:
        g = g - g.mean(axis=axes, keepdims=True)
    return invstd * (g - xhat * projection)


class _FloorLayer(NormLayer):
    """fastnorm's layer protocol (calling, train/eval, parameters); the maths below is NumPy."""

    def forward(self, x):  # pragma: no cover - each floor layer defines its own
        raise NotImplementedError


class _AxisNorm(_FloorLayer):
    """Normalize over some axes of a view of x, then an elementwise affine.

    Subclasses say which view and axes carry the statistics (_stat_view,
    _stat_axes) and how the parameters broadcast (_param_shape).
    """

    center = True

    def _stat_view(self, x):
        return x

    def _param_axes(self, x):
        """Axes summed for the parameter gradients."""
        shape = self._param_shape(x)
        return tuple(i for i, n in enumerate(shape) if n == 1)

    def _normalize(self, x):
        view = self._stat_view(x)
        xhat, invstd = _standardize(view, self._stat_axes(view), self.eps, self.center)
        return xhat.reshape(x.shape), invstd

    def forward(self, x):
        xhat, invstd = self._normalize(x)
        self._saved = (xhat, invstd, True)
        return self._affine(xhat)

    def _affine(self, xhat):
        if self.weight is None:
            return xhat
        y = xhat * self.weight.reshape(self._param_shape(xhat))
        if getattr(self, "bias", None) is not None:
            y += self.bias.reshape(self._param_shape(xhat))
        return y

    def backward(self, dy):
        xhat, invstd, through_stats = self._saved
        g = dy
        if self.weight is not None:
            g = dy * self.weight.reshape(self._param_shape(dy))
            axes = self._param_axes(dy)
            self.grads = {"weight": np.sum(dy * xhat, axis=axes)}
            if getattr(self, "bias", None) is not None:
                self.grads["bias"] = np.sum(dy, axis=axes)
        if not through_stats:
            return g * invstd
        g_view, xhat_view = self._stat_view(g), self._stat_view(xhat)
        grad = _standardize_backward(g_view, xhat_view, invstd, self._stat_axes(g_view), self.center)
        return grad.reshape(dy.shape)


class _PerChannel(_AxisNorm):
    """Parameters of shape (C,) on axis 1 of (N, C, *)."""

    def _param_shape(self, x):
        return (1, x.shape[1]) + (1,) * (x.ndim - 2)

    def _param_axes(self, x):
        return (0,) + tuple(range(2, x.ndim))


class BatchNorm(_PerChannel):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, *, dtype=np.float32):
        super().__init__(dtype)
        self.eps, self.momentum = eps, momentum
        self.weight = np.ones(num_features, self.dtype)
        self.bias = np.zeros(num_features, self.dtype)
        self.running_mean = np.zeros(num_features, self.dtype)
        self.running_var = np.ones(num_features, self.dtype)

    def _stat_axes(self, x):
        return (0,) + tuple(range(2, x.ndim))

    def forward(self, x):
        if self.training:
            self._update_running(x)
            return super().forward(x)
        shape = self._param_shape(x)
        invstd = (1.0 / np.sqrt(self.running_var + self.eps)).reshape(shape)
        xhat = (x - self.running_mean.reshape(shape)) * invstd
        self._saved = (xhat, invstd, False)
        return self._affine(xhat)

    def _update_running(self, x):
        axes = self._stat_axes(x)
        count = x.size // x.shape[1]
        mean = x.mean(axis=axes)
        unbiased = x.var(axis=axes) * (count / (count - 1))
        self.running_mean *= 1 - self.momentum
        self.running_mean += self.momentum * mean
        self.running_var *= 1 - self.momentum
        self.running_var += self.momentum * unbiased


class InstanceNorm(_PerChannel):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False, *, dtype=np.float32):
        super().__init__(dtype)
        self.eps = eps
        self.weight = np.ones(num_features, self.dtype) if affine else None
        self.bias = np.zeros(num_features, self.dtype) if affine else None

    def _stat_axes(self, x):
        return tuple(range(2, x.ndim))


class GroupNorm(_PerChannel):
    def __init__(self, num_groups, num_channels, eps=1e-5, *, dtype=np.float32):
        super().__init__(dtype)
        self.num_groups, self.eps = num_groups, eps
        self.weight = np.ones(num_channels, self.dtype)
        self.bias = np.zeros(num_channels, self.dtype)

    def _stat_view(self, x):
        return x.reshape(x.shape[0], self.num_groups, -1)

    def _stat_axes(self, view):
        return (2,)


class LayerNorm(_AxisNorm):
    def __init__(self, normalized_shape, eps=1e-5, *, dtype=np.float32):
        super().__init__(dtype)
        self.normalized_shape = tuple(np.atleast_1d(normalized_shape))
        self.eps = eps
        self.weight = np.ones(self.normalized_shape, self.dtype)
        self.bias = np.zeros(self.normalized_shape, self.dtype)

    def _stat_axes(self, x):
        return tuple(range(x.ndim - len(self.normalized_shape), x.ndim))

    def _param_shape(self, x):
        return self.normalized_shape


class RMSNorm(LayerNorm):
    center = False
    _parameter_names = ("weight",)

    def __init__(self, normalized_shape, eps=None, *, dtype=np.float32):
        super().__init__(normalized_shape, np.finfo(dtype).eps if eps is None else eps, dtype=dtype)
        self.bias = None


class LocalResponseNorm(_FloorLayer):
    """b_c = a_c / (k + alpha/size * sum of a^2 over the channel window)^beta,
    window sums from a cumulative sum over the channel axis."""

    _parameter_names = ()

    def __init__(self, size, alpha=1e-4, beta=0.75, k=1.0, *, dtype=np.float32):
        super().__init__(dtype)
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def _window_sum(self, a, before, after):
        """sum of a over channels [c - before, c + after], zero outside."""
        pad = [(0, 0)] * a.ndim
        pad[1] = (before + 1, after)
        cumulative = np.cumsum(np.pad(a, pad), axis=1)
        channels = a.shape[1]
        return cumulative[:, self.size:self.size + channels] - cumulative[:, :channels]

    def forward(self, x):
        sums = self._window_sum(x * x, self.size // 2, (self.size - 1) // 2)
        scale = self.k + (self.alpha / self.size) * sums
        self._saved = (x, scale)
        return x * scale ** -self.beta

    def backward(self, dy):
        x, scale = self._saved
        t = dy * x * scale ** (-self.beta - 1)
        mirrored = self._window_sum(t, (self.size - 1) // 2, self.size // 2)
        return dy * scale ** -self.beta - (2 * self.alpha * self.beta / self.size) * x * mirrored


FLOORS = {
    "batch": BatchNorm,
    "instance": InstanceNorm,
    "group": GroupNorm,
    "layer": LayerNorm,
    "rms": RMSNorm,
    "lrn": LocalResponseNorm,
}
