"""Loads the compiled kernels: the AVX2+FMA build when the CPU has it, else the baseline.

Both builds compile the same sources (see setup.py). FASTNORM_ISA=generic forces
the baseline build, e.g. to compare the two.
"""
import os

try:
    from . import _ext_generic as generic
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "fastnorm's compiled kernels are not built. Install the package with "
        "`pip install .` (or `pip install -e .` for development; re-run it after "
        "editing a .pyx/.pxi/.pxd file)."
    ) from exc

kernels = generic
ISA = "generic"
if os.environ.get("FASTNORM_ISA", "").strip().lower() != "generic" and generic.cpu_has_avx2_fma():
    try:
        from . import _ext_avx2 as kernels

        ISA = "avx2"
    except ImportError:  # pragma: no cover - built without the variant
        pass

OPENMP_ENABLED = kernels.OPENMP_ENABLED
