"""Loads the compiled kernels: the widest build the CPU can run, else the baseline.

The builds compile the same sources (see setup.py): avx512, then avx2 (AVX2+FMA), then
generic. FASTNORM_ISA=generic or FASTNORM_ISA=avx2 caps the choice, e.g. to compare
builds or to test the narrower ones on a wide CPU.
"""
import importlib
import os

try:
    from . import _ext_generic as generic
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "fastnorm's compiled kernels are not built. Install the package with "
        "`pip install .` (or `pip install -e .` for development; re-run it after "
        "editing a .pyx/.pxi/.pxd file)."
    ) from exc

# widest first: (name, whether this CPU runs it)
BUILDS = (("avx512", generic.cpu_has_avx512), ("avx2", generic.cpu_has_avx2_fma),
          ("generic", lambda: True))


def _pick_build(cap):
    """(name, module) of the widest build at or below `cap` that is built and runs here."""
    names = [name for name, _ in BUILDS]
    if cap not in names:
        cap = names[0]
    for name, runs_here in BUILDS[names.index(cap):]:
        if name == "generic":
            return name, generic
        if runs_here():
            try:
                return name, importlib.import_module(f"._ext_{name}", __package__)
            except ImportError:  # pragma: no cover - built without the variant
                continue
    return "generic", generic  # pragma: no cover - the loop always ends at generic


ISA, kernels = _pick_build(os.environ.get("FASTNORM_ISA", "").strip().lower())

OPENMP_ENABLED = kernels.OPENMP_ENABLED
