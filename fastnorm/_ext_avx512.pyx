# cython: language_level=3
# The kernels compiled with -mavx2 -mfma and AVX-512 F/VL/BW/DQ (see setup.py):
# the AVX2 build's code, given 32 vector registers and the EVEX forms; imported
# only on a CPU (and OS) that has them all (fastnorm/_kernels.py checks).
include "_kernels.pxi"
