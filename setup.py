"""Declares fastnorm's compiled extensions and picks their compiler flags.

Everything else about the package lives in pyproject.toml.

Environment switches (all optional):
  FASTNORM_NO_OPENMP=1  build without OpenMP (kernels run single-threaded).
  FASTNORM_NATIVE=1     add -march=native (the wheel then only runs on this CPU).
  FASTNORM_SANITIZE=1   AddressSanitizer + UndefinedBehaviorSanitizer build with Cython's
                        bounds checks on, for hardening runs (Python must then be started
                        with the ASan runtime preloaded: LD_PRELOAD=$(gcc -print-file-name=libasan.so)).

The kernels are compiled three times on x86-64: a baseline build, an AVX2+FMA build
and an AVX-512 build (the AVX2+FMA code with AVX-512 F/VL/BW/DQ enabled);
fastnorm/_kernels.py picks one at import time from the CPU's features. All builds
come from the same .pxi sources, so they compute the same maths.
"""
import os
import platform
import sys
import tempfile
import textwrap
import warnings

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools._distutils.ccompiler import new_compiler
from setuptools._distutils.errors import CompileError, LinkError
from setuptools._distutils.sysconfig import customize_compiler

BASE_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math"]  # never -ffast-math
# gcc's inlining limits, raised: it decides inlining against the budget of the whole
# unit (every kernel family is one unit per instruction set), so that an unrelated
# change elsewhere moved the float LayerNorm forward's block moments out of line and
# cost that forward 40-50% (tests/test_inlining.py checks the symbols). With these
# limits every `inline` function is inlined; the few that must not be are noinline.
GCC_INLINE_FLAGS = ["--param=max-inline-insns-single=1000", "--param=large-function-growth=400",
                    "--param=large-function-insns=8000", "--param=inline-unit-growth=200"]
X86_SIMD_FLAGS = ["-mavx2", "-mfma"]
# The same 32-byte vector code with AVX-512 enabled: gcc then has 32 vector registers,
# mask registers and the EVEX forms, which the fused activations' polynomial and select
# code uses. Kernels A/B in one process (the builds swapped, 8 interleaved rounds) on an
# Intel Xeon (Sapphire Rapids class) VM, 1 / 2 threads: LayerNorm (4096,768) + gelu
# forward 1.41x / 1.45x, backward 1.31x / 1.40x; + gelu_tanh 1.27x / 1.33x, 1.23x / 1.19x;
# BatchNorm2d (32,64,56,56) + silu forward 1.21x / 1.19x, + relu backward 1.11x / 1.35x.
# Without an activation 0.96-1.06x (every family). Preferring 512-bit vectors for gcc's
# own loops (-mprefer-vector-width=512) changed nothing measurable (0.96-1.05x).
# AMD Zen 5 (EPYC family 26) VM, the same A/B: LayerNorm + gelu forward 1.48x / 1.62x,
# backward 1.39x / 1.37x; BatchNorm2d + silu forward 1.36x / 1.26x, backward 1.18x / 1.09x;
# channels-last GroupNorm(32) + silu forward 1.19x / 1.20x, backward 1.13x / 1.08x. Without
# an activation 0.95-1.06x (LayerNorm and RMSNorm backward alone, six shapes: 0.96-1.01x).
X86_AVX512_FLAGS = X86_SIMD_FLAGS + ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq"]


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _compiles(source, flags, link=False):
    """Whether the compiler setuptools will use compiles (and links) source with flags."""
    compiler = new_compiler()
    customize_compiler(compiler)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe.c")
        with open(path, "w") as f:
            f.write(source)
        try:
            objects = compiler.compile([path], output_dir=tmp, extra_postargs=flags)
            if link:
                compiler.link_executable(objects, os.path.join(tmp, "probe"),
                                         extra_postargs=flags)
        except (CompileError, LinkError):
            return False
    return True


def _compiler_supports_openmp():
    """Compile and link a tiny OpenMP program."""
    source = textwrap.dedent(
        """
        #include <omp.h>
        int main(void) {
            int n = 0;
            #pragma omp parallel reduction(+:n)
            n += 1;
            return n > 0 ? 0 : 1;
        }
        """
    )
    return _compiles(source, ["-fopenmp"], link=True)


def _inline_flags():
    """GCC_INLINE_FLAGS when the compiler is gcc (clang would warn about each, or fail)."""
    if sys.platform == "win32":
        return []
    source = ("#if !defined(__GNUC__) || defined(__clang__)\n#error not gcc\n#endif\n"
              "int f(void) { return 0; }\n")
    return GCC_INLINE_FLAGS if _compiles(source, GCC_INLINE_FLAGS) else []


def _openmp_flags():
    if _env_flag("FASTNORM_NO_OPENMP"):
        return []
    if sys.platform == "win32":  # MSVC spells it differently; not built here
        return ["/openmp"]
    if _compiler_supports_openmp():
        return ["-fopenmp"]
    warnings.warn("the C compiler does not support OpenMP: fastnorm is built single-threaded")
    return []


def _simd_flags():
    """-fopenmp-simd honours the `omp simd` loops of _simd.h without the OpenMP runtime."""
    return [] if OPENMP or sys.platform == "win32" else ["-fopenmp-simd"]


def _is_x86_64():
    return platform.machine().lower() in {"x86_64", "amd64"}


OPENMP = _openmp_flags()
SIMD = _simd_flags()
INLINE = _inline_flags()
NATIVE = ["-march=native"] if _env_flag("FASTNORM_NATIVE") else []
SANITIZE = _env_flag("FASTNORM_SANITIZE")
SANITIZER_FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"] if SANITIZE else []
COMPILE_FLAGS = BASE_FLAGS + INLINE + OPENMP + SIMD + NATIVE + SANITIZER_FLAGS

# name of the kernel build -> extra compile flags for it
VARIANTS = {"generic": []}
if _is_x86_64() and not NATIVE:
    VARIANTS["avx2"] = X86_SIMD_FLAGS
    if _compiles("int f(void) { return 0; }\n", X86_AVX512_FLAGS):
        VARIANTS["avx512"] = X86_AVX512_FLAGS


def _write_build_config():
    """Record the build choices so fastnorm.show_config() can report them."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastnorm", "_build_config.py")
    config = {
        "openmp": bool(OPENMP),
        "compile_args": COMPILE_FLAGS,
        "variants": {name: flags for name, flags in VARIANTS.items()},
    }
    with open(path, "w") as f:
        f.write("# Generated by setup.py at build time; not tracked by git.\n")
        f.write(f"BUILD_CONFIG = {config!r}\n")


def _extensions():
    extensions = []
    for name, flags in VARIANTS.items():
        extensions.append(
            Extension(
                f"fastnorm._ext_{name}",
                [f"fastnorm/_ext_{name}.pyx"],
                include_dirs=[np.get_include(), "fastnorm"],
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
                extra_compile_args=COMPILE_FLAGS + flags,
                extra_link_args=OPENMP + SANITIZER_FLAGS,
            )
        )
    return cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "boundscheck": SANITIZE,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "nonecheck": False,
        },
    )


_write_build_config()
setup(ext_modules=_extensions())
