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

#include <math.h>
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

/* LocalResponseNorm's power for beta = 0.75 in float32:
 *     out[i] = mul[i] * s^-0.75   (or s^-1.75 when plus_one; mul = NULL means 1),
 *     s = k + a * (suffix[i] + prefix[i]),
 * with the window sums (suffix + prefix) in float64 (_f64) or float32 (_f32)
 * and s rounded to float32. Two chores ride along in the same loop:
 *   grow (unless NULL): first prefix[i] += grow[i]^2 -- the window's newest
 *     channel, read here for the first time, so that its loads overlap the
 *     arithmetic instead of stalling a loop of their own;
 *   prefetch (unless NULL): the n floats there are requested one cache line
 *     per 16 values, early enough for the next call and spread out so that
 *     the miss queues never overflow.
 * With AVX2+FMA, r = 1/sqrt(s) comes from the hardware estimate (12 bits)
 * refined by one second-order step, r1 = r0 * (1 + e/2 + 3e^2/8) with
 * e = 1 - s*r0^2, whose truncation error O(e^3) ~ 1e-11 is far below float
 * rounding; then s^-0.75 = r * sqrt(r) and s^-1.75 = s^-0.75 * r^2. That is
 * within ~2 ulp, like the portable 1 / (sqrt(s) * sqrt(sqrt(s))), and about
 * three times faster (one square root instead of two plus a division).
 * The estimate needs a normal s: zero, subnormal, infinite and NaN s take the
 * portable formula. When k >= FLT_MIN and a >= 0 (the usual case), s >= k, so
 * only an infinite or NaN s can occur, and it makes the fast result NaN: the
 * loop just ORs a NaN mask and redoes the NaN values afterwards. Otherwise
 * every vector is checked. A partial vector at the end is padded, so
 * every element gets the same arithmetic wherever it sits in a row.
 * (Non-temporal stores of out were tried: with the prefetches they were
 * slower, at one thread and at two.) */
static inline float fn_pow075_portable(float s, int plus_one) {
    float root = sqrtf(s);
    return 1.0f / (root * sqrtf(root) * (plus_one ? s : 1.0f));
}

static inline int fn_pow075_s_is_normal(double k, double a) {
    return k >= 1.1754943508222875e-38 && k <= 3.4028234663852886e+38 && a >= 0;
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <float.h>
#include <stdint.h>

static inline __m256 fn_pow075_8(__m256 s, int plus_one) {
    __m256 r0 = _mm256_rsqrt_ps(s);
    __m256 e = _mm256_fnmadd_ps(_mm256_mul_ps(s, r0), r0, _mm256_set1_ps(1.0f));
    __m256 poly = _mm256_fmadd_ps(e, _mm256_set1_ps(0.375f), _mm256_set1_ps(0.5f));
    __m256 r = _mm256_fmadd_ps(_mm256_mul_ps(r0, e), poly, r0);
    __m256 out = _mm256_mul_ps(r, _mm256_sqrt_ps(r));
    return plus_one ? _mm256_mul_ps(out, _mm256_mul_ps(r, r)) : out;
}

/* lanes of s that are not normal numbers take the portable formula */
static inline __m256 fn_pow075_8_checked(__m256 s, int plus_one) {
    __m256 out = fn_pow075_8(s, plus_one);
    __m256 bad = _mm256_or_ps(_mm256_cmp_ps(s, _mm256_set1_ps(FLT_MIN), _CMP_NGE_UQ),
                              _mm256_cmp_ps(s, _mm256_set1_ps(FLT_MAX), _CMP_GT_OQ));
    if (_mm256_movemask_ps(bad)) {
        float sv[8], ov[8];
        _mm256_storeu_ps(sv, s);
        _mm256_storeu_ps(ov, out);
        for (int j = 0; j < 8; j++)
            if (!(sv[j] >= FLT_MIN && sv[j] <= FLT_MAX)) ov[j] = fn_pow075_portable(sv[j], plus_one);
        out = _mm256_loadu_ps(ov);
    }
    return out;
}

/* prefix += grow^2 and s for 8 positions, with float64 or float32 window sums */
static inline __m256 fn_lrn_scale8_f64(const double* suffix, double* prefix, const float* grow,
                                       double k, double a) {
    __m256d kv = _mm256_set1_pd(k), av = _mm256_set1_pd(a);
    __m256d plo = _mm256_loadu_pd(prefix), phi = _mm256_loadu_pd(prefix + 4);
    if (grow) {
        __m256d glo = _mm256_cvtps_pd(_mm_loadu_ps(grow)), ghi = _mm256_cvtps_pd(_mm_loadu_ps(grow + 4));
        plo = _mm256_fmadd_pd(glo, glo, plo);
        phi = _mm256_fmadd_pd(ghi, ghi, phi);
        _mm256_storeu_pd(prefix, plo);
        _mm256_storeu_pd(prefix + 4, phi);
    }
    __m256d lo = _mm256_fmadd_pd(av, _mm256_add_pd(_mm256_loadu_pd(suffix), plo), kv);
    __m256d hi = _mm256_fmadd_pd(av, _mm256_add_pd(_mm256_loadu_pd(suffix + 4), phi), kv);
    return _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
}

static inline __m256 fn_lrn_scale8_f32(const float* suffix, float* prefix, const float* grow,
                                       double k, double a) {
    __m256 p = _mm256_loadu_ps(prefix);
    if (grow) {
        __m256 g = _mm256_loadu_ps(grow);
        p = _mm256_fmadd_ps(g, g, p);
        _mm256_storeu_ps(prefix, p);
    }
    return _mm256_fmadd_ps(_mm256_set1_ps((float)a), _mm256_add_ps(_mm256_loadu_ps(suffix), p),
                           _mm256_set1_ps((float)k));
}

static inline float fn_lrn_scale1_f64(const double* suffix, const double* prefix, double k,
                                      double a) {
    return (float)fma(a, *suffix + *prefix, k);
}

static inline float fn_lrn_scale1_f32(const float* suffix, const float* prefix, double k,
                                      double a) {
    return fmaf((float)a, *suffix + *prefix, (float)k);
}

#define FN_DEFINE_LRN_POW075(T, SUFFIX)                                                  \
    /* 8 values from i on; `partial` < 8 of them go through padded copies */              \
    static inline __m256 fn_lrn_pow075_8_##SUFFIX(const T* suffix, T* prefix,           \
                                                  const float* grow, const float* mul,  \
                                                  ptrdiff_t i, ptrdiff_t partial,       \
                                                  double k, double a, int plus_one,     \
                                                  int checked) {                        \
        T sp[8] = {0}, pp[8] = {0};                                                      \
        float gp[8] = {0}, mp[8] = {0};                                                  \
        __m256 s, v;                                                                     \
        if (partial) {                                                                   \
            for (ptrdiff_t j = 0; j < partial; j++) {                                    \
                sp[j] = suffix[i + j];                                                   \
                pp[j] = prefix[i + j];                                                   \
                if (grow) gp[j] = grow[i + j];                                           \
                if (mul) mp[j] = mul[i + j];                                             \
            }                                                                            \
            s = fn_lrn_scale8_##SUFFIX(sp, pp, grow ? gp : NULL, k, a);                  \
            for (ptrdiff_t j = 0; j < partial; j++) prefix[i + j] = pp[j];               \
        } else {                                                                         \
            s = fn_lrn_scale8_##SUFFIX(suffix + i, prefix + i, grow ? grow + i : NULL, k, a); \
        }                                                                                \
        v = checked ? fn_pow075_8_checked(s, plus_one) : fn_pow075_8(s, plus_one);       \
        if (mul) v = _mm256_mul_ps(v, partial ? _mm256_loadu_ps(mp) : _mm256_loadu_ps(mul + i)); \
        return v;                                                                        \
    }                                                                                    \
    static inline void fn_lrn_pow075_part_##SUFFIX(const T* suffix, T* prefix,          \
                                                   const float* grow, const float* mul, \
                                                   float* out, ptrdiff_t i, ptrdiff_t m, \
                                                   double k, double a, int plus_one) {  \
        float ov[8];                                                                     \
        _mm256_storeu_ps(ov, fn_lrn_pow075_8_##SUFFIX(suffix, prefix, grow, mul, i, m, k, a, \
                                                      plus_one, 1));                     \
        for (ptrdiff_t j = 0; j < m; j++) out[i + j] = ov[j];                            \
    }                                                                                    \
    static inline void fn_lrn_pow075_##SUFFIX(const T* suffix, T* prefix, const float* grow, \
                                              const float* mul, float* out, ptrdiff_t n, \
                                              double k, double a, int plus_one,         \
                                              const float* prefetch) {                  \
        int checked = !fn_pow075_s_is_normal(k, a);                                      \
        __m256 nan_seen = _mm256_setzero_ps();                                           \
        ptrdiff_t i = 0, j;                                                              \
        for (; i + 8 <= n; i += 8) {                                                     \
            if (prefetch && (i & 15) == 0) __builtin_prefetch(prefetch + i, 0, 3);       \
            __m256 v = fn_lrn_pow075_8_##SUFFIX(suffix, prefix, grow, mul, i, 0, k, a,   \
                                                plus_one, checked);                      \
            nan_seen = _mm256_or_ps(nan_seen, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));        \
            _mm256_storeu_ps(out + i, v);                                                \
        }                                                                                \
        if (i < n) fn_lrn_pow075_part_##SUFFIX(suffix, prefix, grow, mul, out, i, n - i, k, a, \
                                               plus_one);                                \
        if (prefetch)                                                                    \
            for (j = i; j < n; j += 16) __builtin_prefetch(prefetch + j, 0, 3);          \
        if (!checked && _mm256_movemask_ps(nan_seen)) {                                  \
            /* an infinite or NaN s (or a NaN multiplier): the portable formula */      \
            for (j = 0; j < n; j++)                                                      \
                if (isnan(out[j]))                                                       \
                    out[j] = (mul ? mul[j] : 1.0f) * fn_pow075_portable(                 \
                        fn_lrn_scale1_##SUFFIX(suffix + j, prefix + j, k, a), plus_one); \
        }                                                                                \
    }
#else
#define FN_DEFINE_LRN_POW075(T, SUFFIX)                                                  \
    static inline void fn_lrn_pow075_##SUFFIX(const T* suffix, T* prefix, const float* grow, \
                                              const float* mul, float* out, ptrdiff_t n, \
                                              double k, double a, int plus_one,         \
                                              const float* prefetch) {                  \
        T kt = (T)k, at = (T)a;                                                          \
        (void)prefetch;                                                                  \
        for (ptrdiff_t i = 0; i < n; i++) {                                              \
            if (grow) prefix[i] = prefix[i] + (T)grow[i] * (T)grow[i];                   \
            out[i] = (mul ? mul[i] : 1.0f) *                                             \
                     fn_pow075_portable((float)(kt + at * (suffix[i] + prefix[i])), plus_one); \
        }                                                                                \
    }
#endif

FN_DEFINE_LRN_POW075(double, f64)
FN_DEFINE_LRN_POW075(float, f32)

#undef FN_DEFINE_LRN_POW075

#endif /* FASTNORM_SIMD_H */
