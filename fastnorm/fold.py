"""Folding an eval-mode BatchNorm into the linear or convolution layer before it."""
import numpy as np

from ._validation import check_float_array

__all__ = ["fold_batchnorm"]


def fold_batchnorm(weight, bias, bn, channel_axis=0):
    """New (weight, bias) of the layer before an eval-mode BatchNorm, so that
    layer(x) with them equals bn(layer(x)) (like torch's fuse_conv_bn_eval):

        scale = bn.weight / sqrt(bn.running_var + bn.eps)
        weight' = weight * scale  (along channel_axis)
        bias'   = (bias - bn.running_mean) * scale + bn.bias

    weight: the layer's weight, its output channels along channel_axis (0 for
    Linear and Conv*, 1 for ConvTranspose*). bias: its bias (C,) or None (zeros).
    bn: a fastnorm BatchNorm1d/2d/3d/SyncBatchNorm in eval mode with running
    statistics, or a torch.nn BatchNorm module (converted with from_torch).
    Computed in float64; both results are new arrays in weight's dtype, and no
    input is modified.
    """
    bn = _as_fastnorm_batchnorm(bn)
    check_float_array(weight, "weight")
    channels = bn.num_features
    if not -weight.ndim <= channel_axis < weight.ndim:
        raise ValueError(f"channel_axis {channel_axis} is out of range for a weight of shape "
                         f"{weight.shape}")
    if weight.shape[channel_axis] != channels:
        raise ValueError(f"weight has {weight.shape[channel_axis]} output channels along axis "
                         f"{channel_axis} (shape {weight.shape}) but the BatchNorm has {channels}")
    if bias is not None:
        check_float_array(bias, "bias")
        if bias.shape != (channels,):
            raise ValueError(f"bias must have shape ({channels},), got {bias.shape}")
    scale = _per_channel(bn.weight, channels, 1.0) / np.sqrt(
        bn.running_var.astype(np.float64) + bn.eps)
    shape = [1] * weight.ndim
    shape[channel_axis] = channels
    new_weight = (weight.astype(np.float64) * scale.reshape(shape)).astype(weight.dtype)
    old_bias = _per_channel(bias, channels, 0.0)
    new_bias = ((old_bias - bn.running_mean.astype(np.float64)) * scale
                + _per_channel(bn.bias, channels, 0.0)).astype(weight.dtype)
    return new_weight, new_bias


def _as_fastnorm_batchnorm(bn):
    from .batchnorm import _BatchNorm

    if not isinstance(bn, _BatchNorm):
        if type(bn).__module__.startswith("torch"):
            from .interop import from_torch

            bn = from_torch(bn)
        if not isinstance(bn, _BatchNorm):
            raise TypeError(f"bn must be a BatchNorm layer, got {type(bn).__name__}")
    if bn.training:
        raise ValueError("fold_batchnorm folds an eval-mode BatchNorm: call bn.eval() first")
    if bn.running_mean is None:
        raise ValueError("fold_batchnorm needs running statistics (track_running_stats=True)")
    if getattr(bn, "activation", None) is not None:
        raise ValueError(f"fold_batchnorm cannot fold the BatchNorm's activation "
                         f"{bn.activation!r} into a linear layer")
    return bn


def _per_channel(values, channels, default):
    if values is None:
        return np.full(channels, default)
    return np.asarray(values, dtype=np.float64)
