# cython: language_level=3
# The kernels, compiled for the baseline instruction set of the platform.
# _ext_avx2.pyx and _ext_avx512.pyx compile the very same sources with AVX2 and FMA
# (and AVX-512) enabled;
# fastnorm/_kernels.py picks the build the CPU can run.
include "_kernels.pxi"
