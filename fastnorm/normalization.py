"""LayerNorm, RMSNorm and GroupNorm: PyTorch's per-sample normalization layers
for NumPy arrays. Their statistics come from the input alone, so train and
eval mode compute the same thing."""
import numpy as np

from . import functional as F
from ._layout import kernel_ready
from ._module import NormLayer, check_count, check_eps
from ._validation import check_channels, check_float_array, check_grad_output, check_out
from .functional._rows import as_shape, contiguous
from .functional.layer_norm import check_rows_input, rms_eps, rows_backward, rows_forward

__all__ = ["LayerNorm", "RMSNorm", "GroupNorm"]


class _RowNorm(NormLayer):
    """Shared by LayerNorm and RMSNorm: per-row statistics over the trailing
    normalized_shape dims, a parameter per element of normalized_shape."""

    _centered = True

    def forward(self, input, out=None):
        shape = self.normalized_shape
        check_rows_input(input, shape, self.weight, self.bias, type(self).__name__)
        if out is not None:
            check_out(input, out)
        x = contiguous(input)
        eps = self.eps if self._centered else rms_eps(x.dtype, self.eps)
        y, mean, rstd = rows_forward(x, shape, self.weight, self.bias, eps, self._centered, out)
        self._saved = (x, mean, rstd)
        return y

    def _backward(self, grad_output, saved):
        x, mean, rstd = saved
        check_grad_output(grad_output, x)
        grad_input, grad_weight, grad_bias = rows_backward(
            grad_output, x, self.normalized_shape, self.weight, mean, rstd, self._centered)
        grads = {}
        if self.weight is not None:
            grads["weight"] = grad_weight
        if self.bias is not None:
            grads["bias"] = grad_bias
        return grad_input, grads


class LayerNorm(_RowNorm):
    """Layer normalization over the last len(normalized_shape) dims of (*, *normalized_shape)."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, *,
                 dtype=np.float32):
        super().__init__(dtype)
        self.normalized_shape = as_shape(normalized_shape)
        self.eps = check_eps(eps)
        self.elementwise_affine = bool(elementwise_affine)
        shape = self.normalized_shape
        self.weight = np.ones(shape, self.dtype) if self.elementwise_affine else None
        self.bias = np.zeros(shape, self.dtype) if self.elementwise_affine and bias else None

    def extra_repr(self):
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")


class RMSNorm(_RowNorm):
    """RMS normalization: y = x / sqrt(mean(x**2) + eps) * weight over the last
    len(normalized_shape) dims; eps=None means finfo(input dtype).eps."""

    _parameter_names = ("weight",)
    _centered = False
    bias = None

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, *, dtype=np.float32):
        super().__init__(dtype)
        self.normalized_shape = as_shape(normalized_shape)
        self.eps = None if eps is None else check_eps(eps)
        self.elementwise_affine = bool(elementwise_affine)
        shape = self.normalized_shape
        self.weight = np.ones(shape, self.dtype) if self.elementwise_affine else None

    def extra_repr(self):
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")


class GroupNorm(NormLayer):
    """Group normalization of (N, C, *) input: statistics per sample and group of
    C/num_groups channels; a weight and bias per channel. Channels-last memory
    is processed in place and the output keeps that layout."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, *, dtype=np.float32):
        super().__init__(dtype)
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
        x = kernel_ready(input)
        y, mean, rstd = F.native_group_norm(x, self.num_groups, self.weight, self.bias, self.eps,
                                            out=out)
        self._saved = (x, mean, rstd)
        return y

    def _backward(self, grad_output, saved):
        x, mean, rstd = saved
        grad_input, grad_weight, grad_bias = F.group_norm_backward(
            grad_output, x, self.num_groups, mean, rstd, self.weight)
        grads = {"weight": grad_weight, "bias": grad_bias} if self.affine else {}
        return grad_input, grads

    def extra_repr(self):
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"
