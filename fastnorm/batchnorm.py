"""BatchNorm1d/2d/3d: PyTorch's batch normalization layers for NumPy arrays."""
import numpy as np

from . import functional as F
from ._activation import activation_repr, check_activation
from ._layout import kernel_ready
from ._module import ChannelStatsLayer
from ._validation import check_channels, check_float_array

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class _BatchNorm(ChannelStatsLayer):
    """Shared by BatchNorm1d/2d/3d (and SyncBatchNorm); they differ only in the
    input ranks they accept.

    activation (keyword: None, "relu", "silu", "gelu" or "gelu_tanh") is applied
    to the output in the same pass; backward includes its derivative."""

    _input_ranks = ()  # accepted input ndim values; empty means any >= 2

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, activation=None, dtype=np.float32):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, dtype)
        self.activation = check_activation(activation)

    def _check_input(self, x):
        check_float_array(x)
        if self._input_ranks and x.ndim not in self._input_ranks:
            expected = " or ".join(f"{r}D" for r in self._input_ranks)
            raise ValueError(f"{type(self).__name__} expected {expected} input, got {x.ndim}D input of shape {x.shape}")
        if x.ndim < 2:
            raise ValueError(f"{type(self).__name__} expected input of shape (N, C, *), got shape {x.shape}")
        check_channels(x, self.num_features, type(self).__name__)

    def _momentum_now(self):
        """The update factor for this step: momentum, or 1/steps for a cumulative average."""
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked + 1)
        return self.momentum

    def forward(self, input, out=None):
        """Normalize with batch statistics in training (updating the running ones
        when tracked) and with the running statistics in eval mode."""
        self._check_input(input)
        x = kernel_ready(input)
        use_batch_stats = self.training or self.running_mean is None
        updates = self.training and self.running_mean is not None
        y, mean, invstd = F.native_batch_norm(
            x, self.weight, self.bias, self.running_mean, self.running_var, use_batch_stats,
            self._momentum_now() if updates else 0.0, self.eps, activation=self.activation, out=out,
        )
        if updates and x.size > 0:
            self._count_batch()
        self._saved = (x, mean, invstd, use_batch_stats)
        return y

    def _backward(self, grad_output, saved):
        x, mean, invstd, use_batch_stats = saved
        grad_input, grad_weight, grad_bias = F.batch_norm_backward(
            grad_output, x, mean, invstd, self.weight, training=use_batch_stats, bias=self.bias,
            activation=self.activation,
        )
        grads = {"weight": grad_weight, "bias": grad_bias} if self.affine else {}
        return grad_input, grads

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}"
                + activation_repr(self.activation))


class BatchNorm1d(_BatchNorm):
    """Batch normalization over (N, C) or (N, C, L) input."""

    _input_ranks = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch normalization over (N, C, H, W) input (NCHW or channels-last memory)."""

    _input_ranks = (4,)


class BatchNorm3d(_BatchNorm):
    """Batch normalization over (N, C, D, H, W) input (NCDHW or channels-last memory)."""

    _input_ranks = (5,)
