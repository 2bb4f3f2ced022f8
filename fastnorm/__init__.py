"""fastnorm: fast CPU normalization layers for NumPy arrays, with PyTorch's semantics.

    import fastnorm as fn
    bn = fn.BatchNorm2d(64)
    y = bn(x)                 # x: (N, 64, H, W) float32, NCHW or channels-last
    dx = bn.backward(dy)      # bn.grads holds {"weight": ..., "bias": ...}
"""
from . import functional
from . import _kernels
from ._module import NormLayer, StateDictError
from ._threads import get_num_threads, set_num_threads
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .normalization import GroupNorm, LayerNorm, RMSNorm
from . import comm
from .sync_batchnorm import SyncBatchNorm
from .lrn import LocalResponseNorm

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "NormLayer", "StateDictError", "functional",
    "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LayerNorm", "RMSNorm",
    "get_num_threads", "set_num_threads", "show_config",
]
__all__ += ["SyncBatchNorm", "comm"]
from .fold import fold_batchnorm
from .interop import from_torch
__all__ += ["fold_batchnorm", "from_torch"]
__all__ += ["LocalResponseNorm"]


def show_config():
    """Print the version, the build (OpenMP, compiler flags, kernel variant) and threads."""
    try:
        from ._build_config import BUILD_CONFIG
    except ImportError:  # pragma: no cover - built by other means than setup.py
        BUILD_CONFIG = {}
    openmp = _kernels.OPENMP_ENABLED
    lines = [
        f"fastnorm {__version__}",
        f"  OpenMP:          {'enabled' if openmp else 'disabled (single-threaded build)'}",
        f"  kernel variant:  {_kernels.ISA} (compiled: {', '.join(BUILD_CONFIG.get('variants', {})) or 'unknown'})",
        f"  compile flags:   {' '.join(BUILD_CONFIG.get('compile_args', [])) or 'unknown'}",
        f"  threads:         {get_num_threads()}",
    ]
    print("\n".join(lines))
