"""The float row forward's primitives stay inlined into its row loop (AVX2/AVX-512 builds, gcc).

gcc decides inlining against the whole translation unit's budget, so a change anywhere in
the kernels can move these primitives out of line. It happened twice: fn_affine_out_f32
once, the float block_moments (a .constprop clone) in this session's activation change.
Both times LayerNorm (8,512,768) forward ran 1.26-1.45 ms instead of 0.85-0.99 ms, with
the same instructions. This test fails on such a build, before any benchmark does. (The
double block_moments is out of line in the good build too.)
"""
import shutil
import subprocess

import pytest

from fastnorm import _kernels

MUST_BE_INLINED = (
    "fn_affine_out_f32",                                     # the forward's output loop
    "__pyx_fuse_0__pyx_f_8fastnorm_7_common_block_moments",  # float unit moments
)


def test_float_row_forward_primitives_are_inlined():
    if _kernels.ISA not in ("avx2", "avx512"):
        pytest.skip("the baseline build is not the tuned one")
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    path = _kernels.kernels.__file__
    with open(path, "rb") as f:
        if b"GCC: (" not in f.read():
            pytest.skip("pinned for gcc builds only")
    listing = subprocess.run([nm, path], capture_output=True, text=True, check=True).stdout
    names = {line.split()[-1] for line in listing.splitlines() if line.strip()}
    out_of_line = sorted(n for n in names if n.startswith(MUST_BE_INLINED))
    assert not out_of_line, f"compiled out of line: {out_of_line} (see this file's docstring)"
