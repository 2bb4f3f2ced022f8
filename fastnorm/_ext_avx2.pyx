# cython: language_level=3
# The kernels compiled with -mavx2 -mfma (see setup.py); imported only on a
# CPU that has both (fastnorm/_kernels.py checks).
include "_kernels.pxi"
