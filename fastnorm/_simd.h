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
#include <string.h>

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

/* Column kernels: `nrows` rows of `nc` contiguous channels, rows `stride`
 * values apart (channels-last data), one result per channel.
 *
 * Each channel has its own accumulator, so vectorizing needs no reordering:
 * the accumulators of a block of 2 vectors of channels live in registers for
 * all the rows (explicit GCC/Clang vectors of the build's native width; with
 * per-channel arrays in memory the loop would be bound by their loads and
 * stores), two rows per step so that add latency does not bound the loop.
 * Callers pass at most FN_COLUMN_ROWS rows, so each working-precision
 * accumulator sums at most FN_COLUMN_ROWS / 2 terms before the result is
 * handed over in float64.
 */
#define FN_COLUMN_ROWS 32
#ifdef __AVX__
#define FN_VBYTES 32
#else
#define FN_VBYTES 16
#endif
typedef float fn_vec_f32 __attribute__((vector_size(FN_VBYTES)));
typedef double fn_vec_f64 __attribute__((vector_size(FN_VBYTES)));

#define FN_DEFINE_COLUMN_KERNELS(T, SUFFIX)                                              \
    typedef fn_vec_##SUFFIX fn_v_##SUFFIX;                                                \
    enum { FN_VL_##SUFFIX = FN_VBYTES / sizeof(T) };                                      \
    static inline __attribute__((always_inline)) fn_v_##SUFFIX fn_load_##SUFFIX(const T* p) { \
        fn_v_##SUFFIX v;                                                                  \
        memcpy(&v, p, sizeof v);                                                          \
        return v;                                                                         \
    }                                                                                     \
    /* Exact per-channel moments of the rows: two passes (the rows stay in cache).      \
     * mean[c], m2[c] = mean and sum of squared deviations, in float64. */               \
    static inline void fn_cols_moments_##SUFFIX(const T* x, ptrdiff_t nrows,              \
                                                ptrdiff_t stride, ptrdiff_t nc,           \
                                                double* mean, double* m2) {               \
        const ptrdiff_t vl = FN_VL_##SUFFIX;                                              \
        const double inv_n = 1.0 / (double)nrows; /* multiply: divisions would dominate */ \
        ptrdiff_t c = 0;                                                                  \
        for (; c + 2 * vl <= nc; c += 2 * vl) {                                           \
            fn_v_##SUFFIX sum[2][2] = {{{0}}}, shift[2], d[2][2] = {{{0}}}, q[2][2] = {{{0}}}; \
            for (ptrdiff_t r = 0; r < nrows; r += 2)                                      \
                for (int k = 0; k < 2 && r + k < nrows; k++)                              \
                    for (int h = 0; h < 2; h++)                                           \
                        sum[k][h] += fn_load_##SUFFIX(x + (r + k) * stride + c + h * vl); \
            for (int h = 0; h < 2; h++)                                                   \
                shift[h] = (sum[0][h] + sum[1][h]) * (T)inv_n;                           \
            for (ptrdiff_t r = 0; r < nrows; r += 2)                                      \
                for (int k = 0; k < 2 && r + k < nrows; k++)                              \
                    for (int h = 0; h < 2; h++) {                                         \
                        fn_v_##SUFFIX a =                                                 \
                            fn_load_##SUFFIX(x + (r + k) * stride + c + h * vl) - shift[h]; \
                        d[k][h] += a;                                                     \
                        q[k][h] += a * a;                                                 \
                    }                                                                     \
            for (int h = 0; h < 2; h++)                                                   \
                for (ptrdiff_t j = 0; j < vl; j++) {                                      \
                    double sd = (double)d[0][h][j] + (double)d[1][h][j];                  \
                    double sq = (double)q[0][h][j] + (double)q[1][h][j];                  \
                    double centered = sq - sd * (sd * inv_n);                             \
                    mean[c + h * vl + j] = (double)shift[h][j] + sd * inv_n;              \
                    m2[c + h * vl + j] = centered > 0 ? centered : 0;                     \
                }                                                                         \
        }                                                                                 \
        for (; c < nc; c++) {                                                             \
            double total = 0, sd = 0, sq = 0, shift_c;                                    \
            for (ptrdiff_t r = 0; r < nrows; r++) total += (double)x[r * stride + c];     \
            shift_c = total * inv_n;                                                      \
            for (ptrdiff_t r = 0; r < nrows; r++) {                                       \
                double v = (double)x[r * stride + c] - shift_c;                           \
                sd += v;                                                                  \
                sq += v * v;                                                              \
            }                                                                             \
            mean[c] = shift_c + sd * inv_n;                                               \
            m2[c] = sq - sd * (sd * inv_n) > 0 ? sq - sd * (sd * inv_n) : 0;              \
        }                                                                                 \
    }                                                                                     \
    /* sum_g[c] += sum_r g, sum_gd[c] += sum_r g*((x - mean_hi[c]) - mean_lo[c]) */        \
    static inline void fn_cols_grad_sums_##SUFFIX(const T* x, const T* g, ptrdiff_t nrows,\
                                                  ptrdiff_t stride, ptrdiff_t nc,         \
                                                  const T* mean_hi, const T* mean_lo,     \
                                                  double* sum_g, double* sum_gd) {        \
        const ptrdiff_t vl = FN_VL_##SUFFIX;                                              \
        ptrdiff_t c = 0;                                                                  \
        for (; c + 2 * vl <= nc; c += 2 * vl) {                                           \
            fn_v_##SUFFIX hi[2], lo[2], gs[2][2] = {{{0}}}, ps[2][2] = {{{0}}};           \
            for (int h = 0; h < 2; h++) {                                                 \
                hi[h] = fn_load_##SUFFIX(mean_hi + c + h * vl);                           \
                lo[h] = fn_load_##SUFFIX(mean_lo + c + h * vl);                           \
            }                                                                             \
            for (ptrdiff_t r = 0; r < nrows; r += 2)                                      \
                for (int k = 0; k < 2 && r + k < nrows; k++)                              \
                    for (int h = 0; h < 2; h++) {                                         \
                        ptrdiff_t at = (r + k) * stride + c + h * vl;                     \
                        fn_v_##SUFFIX gv = fn_load_##SUFFIX(g + at);                      \
                        gs[k][h] += gv;                                                   \
                        ps[k][h] += gv * ((fn_load_##SUFFIX(x + at) - hi[h]) - lo[h]);    \
                    }                                                                     \
            for (int h = 0; h < 2; h++)                                                   \
                for (ptrdiff_t j = 0; j < vl; j++) {                                      \
                    sum_g[c + h * vl + j] += (double)gs[0][h][j] + (double)gs[1][h][j];   \
                    sum_gd[c + h * vl + j] += (double)ps[0][h][j] + (double)ps[1][h][j];  \
                }                                                                         \
        }                                                                                 \
        for (; c < nc; c++)                                                               \
            for (ptrdiff_t r = 0; r < nrows; r++) {                                       \
                double gv = (double)g[r * stride + c];                                    \
                sum_g[c] += gv;                                                           \
                sum_gd[c] += gv * (double)((x[r * stride + c] - mean_hi[c]) - mean_lo[c]); \
            }                                                                             \
    }

FN_DEFINE_COLUMN_KERNELS(float, f32)
FN_DEFINE_COLUMN_KERNELS(double, f64)

#undef FN_DEFINE_COLUMN_KERNELS

#endif /* FASTNORM_SIMD_H */
