# Every kernel family, included by each instruction-set build (_ext_*.pyx).
# One file per reduction layout; shared helpers live in _common.pxd.

from fastnorm._openmp cimport FASTNORM_HAVE_OPENMP, omp_get_max_threads, omp_set_num_threads

cdef extern from *:
    """
    #if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    static int fastnorm_cpu_has_avx2_fma(void) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
    #else
    static int fastnorm_cpu_has_avx2_fma(void) { return 0; }
    #endif
    """
    int fastnorm_cpu_has_avx2_fma() noexcept nogil


OPENMP_ENABLED = bool(FASTNORM_HAVE_OPENMP)


def cpu_has_avx2_fma():
    """True when this CPU can run the AVX2+FMA build."""
    return bool(fastnorm_cpu_has_avx2_fma())


def openmp_max_threads():
    """omp_get_max_threads() of the calling thread (1 without OpenMP)."""
    return omp_get_max_threads()


def openmp_set_num_threads(int n):
    omp_set_num_threads(n)


include "_channel.pxi"
include "_activation.pxi"
include "_rows.pxi"
include "_lrn.pxi"
include "_relayout.pxi"
