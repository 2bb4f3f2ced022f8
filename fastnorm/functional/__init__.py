"""Functional forms of fastnorm's layers, mirroring torch.nn.functional.

Each forward has torch's name and signature (plus a keyword-only out=), and a
documented backward entry point returning the gradients, so that users can
build their own layers. Layers call these; these call the kernels.
"""
from .batch_norm import batch_norm, batch_norm_backward, native_batch_norm
from .group_norm import (
    group_norm, group_norm_backward, instance_norm, instance_norm_backward, native_group_norm,
    native_instance_norm,
)
from .layer_norm import (
    add_layer_norm, add_layer_norm_backward, add_rms_norm, add_rms_norm_backward, layer_norm,
    layer_norm_backward, native_add_layer_norm, native_add_rms_norm, native_layer_norm,
    native_rms_norm, rms_norm, rms_norm_backward,
)
from .local_response_norm import local_response_norm, local_response_norm_backward
from .sync_batch_norm import native_sync_batch_norm, sync_batch_norm, sync_batch_norm_backward

__all__ = [
    "add_layer_norm", "add_layer_norm_backward", "native_add_layer_norm",
    "add_rms_norm", "add_rms_norm_backward", "native_add_rms_norm",
    "batch_norm", "batch_norm_backward", "native_batch_norm",
    "group_norm", "group_norm_backward", "native_group_norm",
    "instance_norm", "instance_norm_backward", "native_instance_norm",
    "layer_norm", "layer_norm_backward", "native_layer_norm",
    "local_response_norm", "local_response_norm_backward",
    "rms_norm", "rms_norm_backward", "native_rms_norm",
    "native_sync_batch_norm", "sync_batch_norm", "sync_batch_norm_backward",
]
