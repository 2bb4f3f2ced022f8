# OpenMP shim: the same code compiles with and without OpenMP.
#
# Without OpenMP, Cython's prange becomes a serial loop and these stand-ins
# report a single thread, so the package still builds and runs (serially).

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define FASTNORM_HAVE_OPENMP 1
    #else
    #define FASTNORM_HAVE_OPENMP 0
    static int omp_get_max_threads(void) { return 1; }
    static void omp_set_num_threads(int n) { (void)n; }
    #endif
    """
    bint FASTNORM_HAVE_OPENMP
    int omp_get_max_threads() noexcept nogil
    void omp_set_num_threads(int n) noexcept nogil
