"""LayerNorm, RMSNorm and GroupNorm: PyTorch's per-sample normalization layers
for NumPy arrays. Their statistics come from the input alone, so train and
eval mode compute the same thing.

Fusions (keywords beyond torch's): activation=None | "relu" | "silu" | "gelu" |
"gelu_tanh" applies the activation to the output in the same pass (backward
includes its derivative); LayerNorm and RMSNorm also take layer(x, residual=r)
-> (y, h), h = x + r, y = norm(h), and then backward(grad_y, grad_h=None)."""
import numpy as np

from . import functional as F
from ._activation import activation_code, activation_repr, check_activation
from ._layout import kernel_ready
from ._module import NormLayer, check_count, check_eps
from ._validation import (check_channels, check_float_array, check_grad_output, check_like,
                          check_out)
from .functional._rows import as_shape, check_param
from .functional.group_norm import groups_forward
from .functional.layer_norm import check_rows_forward, rows_backward, rows_forward

__all__ = ["LayerNorm", "RMSNorm", "GroupNorm"]


class _RowNorm(NormLayer):
    """Shared by LayerNorm and RMSNorm: per-row statistics over the trailing
    normalized_shape dims, a parameter per element of normalized_shape."""

    _centered = True

    def forward(self, input, out=None, *, residual=None):
        """The normalized input (act of it with an activation). With residual=r
        (an array like input), returns (y, h): h = input + r and y = norm(h),
        computed in one pass; backward then gives the gradient with respect to h."""
        shape = self.normalized_shape
        eps, act = check_rows_forward(input, residual, shape, self.weight, self.bias, self.eps,
                                      self.activation, out, type(self).__name__,
                                      rms=not self._centered)
        y, normalized, mean, rstd = rows_forward(input, residual, shape, self.weight, self.bias,
                                                 eps, self._centered, out, act)
        self._saved = (normalized, mean, rstd, residual is not None)
        return y if residual is None else (y, normalized)

    def backward(self, grad_output, grad_h=None):
        """Gradient w.r.t. the last forward's input; after forward(x, residual=r),
        w.r.t. h (the gradient for x and for r alike) with grad_h, the gradient
        reaching h from elsewhere (e.g. the residual stream), added when given.
        Also sets self.grads."""
        return super().backward(grad_output, grad_h=grad_h)

    def _backward(self, grad_output, saved, grad_h=None):
        x, mean, rstd, fused_add = saved
        check_grad_output(grad_output, x)
        if grad_h is not None:
            if not fused_add:
                raise ValueError("grad_h is accepted only after a forward with residual=")
            check_like(grad_h, x, "grad_h", "h")
        grad_input, grad_weight, grad_bias = rows_backward(
            grad_output, x, self.normalized_shape, self.weight, mean, rstd, self._centered,
            activation_code(self.activation), self.bias, grad_h)
        grads = {}
        if self.weight is not None:
            grads["weight"] = grad_weight
        if self.bias is not None:
            grads["bias"] = grad_bias
        return grad_input, grads

    def extra_repr(self):
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}"
                + activation_repr(self.activation))


class LayerNorm(_RowNorm):
    """Layer normalization over the last len(normalized_shape) dims of (*, *normalized_shape)."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, *,
                 activation=None, dtype=np.float32):
        super().__init__(dtype)
        self.normalized_shape = as_shape(normalized_shape)
        self.eps = check_eps(eps)
        self.elementwise_affine = bool(elementwise_affine)
        self.activation = check_activation(activation)
        shape = self.normalized_shape
        self.weight = np.ones(shape, self.dtype) if self.elementwise_affine else None
        self.bias = np.zeros(shape, self.dtype) if self.elementwise_affine and bias else None


class RMSNorm(_RowNorm):
    """RMS normalization: y = x / sqrt(mean(x**2) + eps) * weight over the last
    len(normalized_shape) dims; eps=None means finfo(input dtype).eps."""

    _parameter_names = ("weight",)
    _centered = False
    bias = None

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, *, activation=None,
                 dtype=np.float32):
        super().__init__(dtype)
        self.normalized_shape = as_shape(normalized_shape)
        self.eps = None if eps is None else check_eps(eps)
        self.elementwise_affine = bool(elementwise_affine)
        self.activation = check_activation(activation)
        shape = self.normalized_shape
        self.weight = np.ones(shape, self.dtype) if self.elementwise_affine else None


class GroupNorm(NormLayer):
    """Group normalization of (N, C, *) input: statistics per sample and group of
    C/num_groups channels; a weight and bias per channel. Channels-last memory
    is processed in place and the output keeps that layout."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, *, activation=None,
                 dtype=np.float32):
        super().__init__(dtype)
        self.activation = check_activation(activation)
        self.num_groups = check_count("num_groups", num_groups)
        self.num_channels = check_count("num_channels", num_channels)
        if self.num_channels % self.num_groups:
            raise ValueError(
                f"num_channels must be divisible by num_groups, got num_channels="
                f"{self.num_channels} and num_groups={self.num_groups}"
            )
        self.eps = check_eps(eps)
        self.affine = bool(affine)
        self.weight = np.ones(self.num_channels, self.dtype) if self.affine else None
        self.bias = np.zeros(self.num_channels, self.dtype) if self.affine else None

    def forward(self, input, out=None):
        check_float_array(input)
        if input.ndim < 2:
            raise ValueError(
                f"GroupNorm expected input of shape (N, C, *), got shape {input.shape}")
        check_channels(input, self.num_channels, "GroupNorm")
        check_param(input, self.weight, "weight", (self.num_channels,))
        check_param(input, self.bias, "bias", (self.num_channels,))
        check_out(input, out)
        x = kernel_ready(input)
        # the rest of native_group_norm's checks hold by construction (__init__)
        y, mean, rstd, _ = groups_forward(x, self.num_groups, self.weight, self.bias, self.eps,
                                          out, act=activation_code(self.activation))
        self._saved = (x, mean, rstd)
        return y

    def _backward(self, grad_output, saved):
        x, mean, rstd = saved
        grad_input, grad_weight, grad_bias = F.group_norm_backward(
            grad_output, x, self.num_groups, mean, rstd, self.weight, bias=self.bias,
            activation=self.activation)
        grads = {"weight": grad_weight, "bias": grad_bias} if self.affine else {}
        return grad_input, grads

    def extra_repr(self):
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"
                + activation_repr(self.activation))
