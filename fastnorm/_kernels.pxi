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
    /* libgcc's checks include the OS's: AVX-512 counts only when XCR0 saves its state */
    static int fastnorm_cpu_has_avx512(void) {
        return fastnorm_cpu_has_avx2_fma() && __builtin_cpu_supports("avx512f")
            && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw")
            && __builtin_cpu_supports("avx512dq");
    }
    #else
    static int fastnorm_cpu_has_avx2_fma(void) { return 0; }
    static int fastnorm_cpu_has_avx512(void) { return 0; }
    #endif
    """
    int fastnorm_cpu_has_avx2_fma() noexcept nogil
    int fastnorm_cpu_has_avx512() noexcept nogil


OPENMP_ENABLED = bool(FASTNORM_HAVE_OPENMP)


def cpu_has_avx2_fma():
    """True when this CPU can run the AVX2+FMA build."""
    return bool(fastnorm_cpu_has_avx2_fma())


def cpu_has_avx512():
    """True when this CPU can run the AVX-512 build (AVX2, FMA, AVX-512 F/VL/BW/DQ)."""
    return bool(fastnorm_cpu_has_avx512())


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
