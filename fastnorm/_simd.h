/* Vectorized reduction primitives for the Cython kernels.
 *
 * Why C: a float reduction (s += x[i]) vectorizes only if the compiler may
 * reorder the additions. We never build with -ffast-math, and Cython cannot
 * emit the one pragma that grants exactly this permission for one loop:
 * `omp simd reduction(+: ...)` (compiled with -fopenmp or -fopenmp-simd).
 * The order then depends on the build's vector width, never on the thread
 * count, so results are reproducible.
 *
 * Blocked accumulation: values are summed in the working precision over
 * blocks of FN_BLOCK (a few terms per vector lane, so float32 loses almost
 * nothing), and block sums are added in float64. That keeps the inner loop
 * at full float32 vector width while the total is accumulated in float64.
 *
 * Each primitive exists for float and double input (suffix _f32 / _f64).
 * Differences from a mean are formed as (x - mean_hi) - mean_lo: with the
 * mean split into a working-precision head and tail, float32 data far from
 * zero (mean 1e4, std 1) are centered without losing their low bits.
 */
#ifndef FASTNORM_SIMD_H
#define FASTNORM_SIMD_H

#include <stddef.h>

#define FN_BLOCK 128

#define FN_DEFINE_REDUCTIONS(T, SUFFIX)                                                \
    /* sum(x) */                                                                         \
    static inline double fn_sum_##SUFFIX(const T* x, ptrdiff_t n) {                     \
        double total = 0;                                                                \
        for (ptrdiff_t b = 0; b < n; b += FN_BLOCK) {                                    \
            const T* xb = x + b;                                                         \
            ptrdiff_t m = n - b < FN_BLOCK ? n - b : FN_BLOCK;                           \
            T s = 0;                                                                     \
            _Pragma("omp simd simdlen(16) reduction(+: s)")                              \
            for (ptrdiff_t i = 0; i < m; i++) s += xb[i];                                \
            total += (double)s;                                                          \
        }                                                                                \
        return total;                                                                    \
    }                                                                                    \
    /* *sum_d += sum(d), *sum_dd += sum(d*d) with d = (x - mean_hi) - mean_lo */       \
    static inline void fn_centered_sums_##SUFFIX(const T* x, ptrdiff_t n, T mean_hi,     \
                                                 T mean_lo, double* sum_d,              \
                                                 double* sum_dd) {                      \
        double total_d = 0, total_dd = 0;                                                \
        for (ptrdiff_t b = 0; b < n; b += FN_BLOCK) {                                    \
            const T* xb = x + b;                                                         \
            ptrdiff_t m = n - b < FN_BLOCK ? n - b : FN_BLOCK;                           \
            T s = 0, q = 0;                                                              \
            _Pragma("omp simd simdlen(16) reduction(+: s, q)")                           \
            for (ptrdiff_t i = 0; i < m; i++) {                                          \
                T d = (xb[i] - mean_hi) - mean_lo;                                       \
                s += d;                                                                  \
                q += d * d;                                                              \
            }                                                                            \
            total_d += (double)s;                                                        \
            total_dd += (double)q;                                                       \
        }                                                                                \
        *sum_d += total_d;                                                               \
        *sum_dd += total_dd;                                                             \
    }                                                                                    \
    /* *sum_g += sum(g), *sum_gd += sum(g*d) with d = (x - mean_hi) - mean_lo */       \
    static inline void fn_grad_sums_##SUFFIX(const T* x, const T* g, ptrdiff_t n,        \
                                             T mean_hi, T mean_lo, double* sum_g,       \
                                             double* sum_gd) {                          \
        double total_g = 0, total_gd = 0;                                                \
        for (ptrdiff_t b = 0; b < n; b += FN_BLOCK) {                                    \
            const T* xb = x + b;                                                         \
            const T* gb = g + b;                                                         \
            ptrdiff_t m = n - b < FN_BLOCK ? n - b : FN_BLOCK;                           \
            T s = 0, q = 0;                                                              \
            _Pragma("omp simd simdlen(16) reduction(+: s, q)")                           \
            for (ptrdiff_t i = 0; i < m; i++) {                                          \
                s += gb[i];                                                              \
                q += gb[i] * ((xb[i] - mean_hi) - mean_lo);                              \
            }                                                                            \
            total_g += (double)s;                                                        \
            total_gd += (double)q;                                                       \
        }                                                                                \
        *sum_g += total_g;                                                               \
        *sum_gd += total_gd;                                                             \
    }

FN_DEFINE_REDUCTIONS(float, f32)
FN_DEFINE_REDUCTIONS(double, f64)

#undef FN_DEFINE_REDUCTIONS

#endif /* FASTNORM_SIMD_H */
