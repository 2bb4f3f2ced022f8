"""Functional forms of fastnorm's layers, mirroring torch.nn.functional.

Each forward has torch's name and signature (plus a keyword-only out=), and a
documented backward entry point returning the gradients, so that users can
build their own layers. Layers call these; these call the kernels.
"""
from .batch_norm import batch_norm, batch_norm_backward, native_batch_norm
from .local_response_norm import local_response_norm, local_response_norm_backward
from .sync_batch_norm import native_sync_batch_norm, sync_batch_norm, sync_batch_norm_backward

__all__ = ["batch_norm", "batch_norm_backward", "native_batch_norm"]
__all__ += ["native_sync_batch_norm", "sync_batch_norm", "sync_batch_norm_backward"]
__all__ += ["local_response_norm", "local_response_norm_backward"]
