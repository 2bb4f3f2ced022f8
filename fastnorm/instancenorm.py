"""InstanceNorm1d/2d/3d: PyTorch's instance normalization layers for NumPy arrays.

Statistics per (sample, channel) over the spatial positions. With
track_running_stats=True, training also updates running statistics averaged
over the batch (as PyTorch does) and eval mode normalizes with them. Unlike
PyTorch, momentum=None keeps a cumulative average instead of never updating,
counting its batches in num_batches_tracked (which PyTorch leaves at 0, as we
do with a numeric momentum, so state dicts match PyTorch's there). Unbatched
(C, *) input is accepted. activation= (None, "relu", "silu", "gelu" or
"gelu_tanh") applies an activation to the output in the same pass; backward
includes its derivative.
"""
import numpy as np

from . import functional as F
from ._activation import activation_repr, check_activation
from ._layout import kernel_ready
from ._module import ChannelStatsLayer
from ._validation import check_channels, check_float_array, check_out
from .functional._rows import check_param
from .functional.group_norm import check_instance_arrays, instance_forward

__all__ = ["InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


class _InstanceNorm(ChannelStatsLayer):
    _spatial_dims = 0

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False,
                 track_running_stats=False, *, activation=None, dtype=np.float32):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, dtype)
        self.activation = check_activation(activation)

    def _batched(self, x):
        """True for (N, C, *spatial) input, False for unbatched (C, *spatial)."""
        check_float_array(x)
        batched_ndim = self._spatial_dims + 2
        if x.ndim not in (batched_ndim - 1, batched_ndim):
            raise ValueError(
                f"{type(self).__name__} expected {batched_ndim - 1}D (unbatched) or "
                f"{batched_ndim}D (batched) input, got {x.ndim}D input of shape {x.shape}"
            )
        return x.ndim == batched_ndim

    def forward(self, input, out=None):
        """Instance statistics in training (updating the running ones when
        tracked); the running statistics in eval mode when they are tracked."""
        batched = self._batched(input)
        check_out(input, out)
        x = input if batched else input[None]
        check_channels(x, self.num_features, type(self).__name__)
        check_param(x, self.weight, "weight", (self.num_features,))
        check_param(x, self.bias, "bias", (self.num_features,))
        use_input_stats = self.training or not self.track_running_stats
        updates = self.training and self.track_running_stats
        check_instance_arrays(x, self.running_mean, self.running_var, use_input_stats)
        x = kernel_ready(x)
        # the rest of native_instance_norm's checks hold by construction (__init__)
        y, mean, rstd = instance_forward(
            x, self.running_mean, self.running_var, self.weight, self.bias, use_input_stats,
            self._momentum_now() if updates else 0.0, self.eps, self.activation,
            out if batched or out is None else out[None],
        )
        if updates and x.size and self.momentum is None:   # the cumulative average's count
            self._count_batch()
        self._saved = (x, mean, rstd, use_input_stats, batched)
        if out is not None:
            return out
        return y if batched else y[0]

    def _momentum_now(self):
        """This step's update factor: momentum, or 1/steps for a cumulative average."""
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked + 1)
        return self.momentum

    def _backward(self, grad_output, saved):
        x, mean, rstd, use_input_stats, batched = saved
        if not batched:
            check_float_array(grad_output, "grad_output")
            if grad_output.shape != x.shape[1:]:
                raise ValueError(
                    f"grad_output must have the forward input's shape {x.shape[1:]}, "
                    f"got {grad_output.shape}"
                )
            grad_output = grad_output[None]
        grad_input, grad_weight, grad_bias = F.instance_norm_backward(
            grad_output, x, mean, rstd, self.weight, use_input_stats, bias=self.bias,
            activation=self.activation)
        grads = {"weight": grad_weight, "bias": grad_bias} if self.affine else {}
        return (grad_input if batched else grad_input[0]), grads

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}"
                + activation_repr(self.activation))


class InstanceNorm1d(_InstanceNorm):
    """Instance normalization of (N, C, L) or unbatched (C, L) input."""

    _spatial_dims = 1


class InstanceNorm2d(_InstanceNorm):
    """Instance normalization of (N, C, H, W) or (C, H, W) input (NCHW or channels-last)."""

    _spatial_dims = 2


class InstanceNorm3d(_InstanceNorm):
    """Instance normalization of (N, C, D, H, W) or (C, D, H, W) input."""

    _spatial_dims = 3
