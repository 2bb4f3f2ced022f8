/* Fused activations: act(z) and its derivative, elementwise, vectorizable.
 *
 * Kernels compute the normalized, affine-transformed value z in their own
 * layout (into the output buffer), then call these on the same short run
 * while it is still in L1:
 *   fn_activate_T(y, n, act)          y = act(y)                 (forward)
 *   fn_act_grad_T(z, dy, g, n, act)   g = dy * act'(z), g may be z (backward)
 * The activation is chosen once per call by `act` (FN_ACT_*); each case is
 * its own `omp simd` loop over inline arithmetic, so nothing branches per
 * element and the compiler vectorizes it.
 *
 * glibc's exp/erf/tanh are scalar calls unless built with -ffast-math (which
 * we never use), so exp is our own: n = round(x / ln2), r = x - n*ln2 (ln2
 * split in two so n*ln2_hi is exact), a Taylor polynomial on |r| <= ln2/2,
 * then a multiplication by 2^n built from exponent bits, in two factors so
 * overflow (inf) and gradual underflow come out right. Error: about 1 ulp.
 *
 *   relu       max(z, 0) (NaN stays NaN); derivative 0 where z <= 0
 *   silu       z * sigmoid(z)
 *   gelu_tanh  torch's approximate="tanh": 0.5 z (1 + tanh(u)),
 *              u = sqrt(2/pi) (z + 0.044715 z^3), computed as z * sigmoid(2u)
 *              (the same value without the cancellation of 1 + tanh near -1)
 *   gelu       exact: z * Phi(z), Phi the standard normal CDF = erfc(-z/sqrt2)/2.
 *              float32: erfc by Numerical Recipes' erfc approximation (relative
 *              error < 1.2e-7 everywhere, and Phi = erfc/2 or 1 - erfc/2 keeps it
 *              relative), vectorized. float64: libm's erfc (double-accurate, but
 *              a scalar call: float64 gelu is the one activation not vectorized).
 */
#ifndef FASTNORM_ACTIVATIONS_H
#define FASTNORM_ACTIVATIONS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum {
    FN_ACT_NONE = 0,
    FN_ACT_RELU = 1,
    FN_ACT_SILU = 2,
    FN_ACT_GELU = 3,
    FN_ACT_GELU_TANH = 4
};

#define FN_INLINE static inline __attribute__((always_inline))
#define FN_CLAMP(v, lo, hi) ((v) < (lo) ? (lo) : ((v) > (hi) ? (hi) : (v))) /* NaN stays */

/* ------------------------------------------------------------------ exp */

FN_INLINE float fn_f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, sizeof f); return f; }
FN_INLINE uint32_t fn_f32_bits(float f) { uint32_t u; memcpy(&u, &f, sizeof u); return u; }
FN_INLINE double fn_f64_from_bits(uint64_t u) { double f; memcpy(&f, &u, sizeof f); return f; }
FN_INLINE uint64_t fn_f64_bits(double f) { uint64_t u; memcpy(&u, &f, sizeof u); return u; }

/* round(v) for |v| < 2^22 (float) / 2^51 (double): adding 1.5 * 2^mant drops the fraction */
#define FN_SHIFTER_f32 0x1.8p23f
#define FN_SHIFTER_f64 0x1.8p52

/* 2^n for an integral n within the normal exponent range, without a
 * float-to-int conversion: n's integer sits in the low bits of n + shifter. */
FN_INLINE float fn_exp2i_f32(float n) {
    uint32_t k = fn_f32_bits(n + FN_SHIFTER_f32) - fn_f32_bits(FN_SHIFTER_f32);
    return fn_f32_from_bits((k + 127u) << 23);
}
FN_INLINE double fn_exp2i_f64(double n) {
    uint64_t k = fn_f64_bits(n + FN_SHIFTER_f64) - fn_f64_bits(FN_SHIFTER_f64);
    return fn_f64_from_bits((k + 1023u) << 52);
}

FN_INLINE float fn_exp_f32(float x) {
    /* beyond the clamp, exp is 0 or inf in float32 anyway: n in [-150, 129] */
    float xc = FN_CLAMP(x, -104.0f, 89.0f);
    float n = (xc * 1.44269504088896341f + FN_SHIFTER_f32) - FN_SHIFTER_f32;
    float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f; /* Cephes' ln2 = hi - lo */
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    /* 2^n as 2^n1 * 2^n2, each factor a normal number */
    float n1 = (n * 0.5f + FN_SHIFTER_f32) - FN_SHIFTER_f32;
    return p * fn_exp2i_f32(n1) * fn_exp2i_f32(n - n1);
}

FN_INLINE double fn_exp_f64(double x) {
    double xc = FN_CLAMP(x, -746.0, 710.0); /* n in [-1077, 1025] */
    double n = (xc * 1.4426950408889634 + FN_SHIFTER_f64) - FN_SHIFTER_f64;
    double r = (xc - n * 6.93145751953125e-1) - n * 1.42860682030941723212e-6;
    double p = 1.0 / 6227020800.0; /* 1/13! */
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    double n1 = (n * 0.5 + FN_SHIFTER_f64) - FN_SHIFTER_f64;
    return p * fn_exp2i_f64(n1) * fn_exp2i_f64(n - n1);
}

/* ------------------------------------------------------ standard normal CDF */

FN_INLINE float fn_norm_cdf_f32(float z) {
    float u = z * -0.70710678118654752f; /* Phi(z) = erfc(u) / 2 */
    float a = fabsf(u);
    float t = 1.0f / (1.0f + 0.5f * a);
    float q = 0.17087277f;
    q = q * t - 0.82215223f;
    q = q * t + 1.48851587f;
    q = q * t - 1.13520398f;
    q = q * t + 0.27886807f;
    q = q * t - 0.18628806f;
    q = q * t + 0.09678418f;
    q = q * t + 0.37409196f;
    q = q * t + 1.00002368f;
    q = q * t - 1.26551223f;
    float half_erfc = 0.5f * t * fn_exp_f32(q - a * a); /* erfc(|u|) / 2 */
    return u >= 0.0f ? half_erfc : 1.0f - half_erfc;
}

FN_INLINE double fn_norm_cdf_f64(double z) { return 0.5 * erfc(z * -0.70710678118654752); }

/* ------------------------------------------- activations and derivatives */

#define FN_SQRT_2_OVER_PI 0.79788456080286536
#define FN_INV_SQRT_2PI 0.39894228040143268

/* Derivatives use s = sigmoid(v) = 1 / (1 + e), e = exp(-v), and 1 - s = e * s
 * (no cancellation when s is near 1). Beyond |z| = SILU_FLAT / GELU_TANH_FLAT
 * the activation is flat to working precision (and e still finite): z is
 * clamped there, so huge inputs give 0 or 1 instead of inf * 0. */
#define FN_DEFINE_ACTIVATION_MATH(T, SUFFIX, SILU_FLAT, GELU_TANH_FLAT)                   \
    FN_INLINE T fn_relu_##SUFFIX(T z) { return z < 0 ? (T)0 : z; }                       \
    FN_INLINE T fn_relu_grad_##SUFFIX(T z, T dy) { return z <= 0 ? (T)0 : dy; }          \
    FN_INLINE T fn_silu_##SUFFIX(T z) { return z / ((T)1 + fn_exp_##SUFFIX(-z)); }       \
    FN_INLINE T fn_silu_grad_##SUFFIX(T z, T dy) {                                        \
        T zc = FN_CLAMP(z, (T)-SILU_FLAT, (T)SILU_FLAT);                                  \
        T e = fn_exp_##SUFFIX(-zc);                                                       \
        T s = (T)1 / ((T)1 + e);                                                          \
        return dy * (s * ((T)1 + zc * (e * s)));                                          \
    }                                                                                     \
    /* tanh approximation: u = sqrt(2/pi) (z + 0.044715 z^3), gelu = z * sigmoid(2u) */   \
    FN_INLINE T fn_gelu_tanh_u_##SUFFIX(T zc) {                                           \
        return (T)FN_SQRT_2_OVER_PI * (zc + (T)0.044715 * zc * zc * zc);                  \
    }                                                                                     \
    FN_INLINE T fn_gelu_tanh_##SUFFIX(T z) {                                              \
        T zc = FN_CLAMP(z, (T)-GELU_TANH_FLAT, (T)GELU_TANH_FLAT);                        \
        return z / ((T)1 + fn_exp_##SUFFIX((T)-2 * fn_gelu_tanh_u_##SUFFIX(zc)));         \
    }                                                                                     \
    FN_INLINE T fn_gelu_tanh_grad_##SUFFIX(T z, T dy) {                                   \
        T zc = FN_CLAMP(z, (T)-GELU_TANH_FLAT, (T)GELU_TANH_FLAT);                        \
        T e = fn_exp_##SUFFIX((T)-2 * fn_gelu_tanh_u_##SUFFIX(zc));                       \
        T s = (T)1 / ((T)1 + e);                                                          \
        T du = (T)FN_SQRT_2_OVER_PI * ((T)1 + (T)(3 * 0.044715) * zc * zc);               \
        return dy * (s * ((T)1 + (T)2 * zc * (e * s) * du));                              \
    }                                                                                     \
    FN_INLINE T fn_gelu_##SUFFIX(T z) { return z * fn_norm_cdf_##SUFFIX(z); }             \
    FN_INLINE T fn_gelu_grad_##SUFFIX(T z, T dy) {                                        \
        T zc = FN_CLAMP(z, (T)-40, (T)40);                                                \
        T pdf = (T)FN_INV_SQRT_2PI * fn_exp_##SUFFIX((T)-0.5 * zc * zc);                  \
        return dy * (fn_norm_cdf_##SUFFIX(zc) + zc * pdf);                                \
    }

FN_DEFINE_ACTIVATION_MATH(float, f32, 80, 10)   /* exp(87) < FLT_MAX */
FN_DEFINE_ACTIVATION_MATH(double, f64, 700, 20)

/* ------------------------------------------------------- elementwise runs */

#define FN_ACT_LOOP(STATEMENT)                       \
    do {                                             \
        _Pragma("omp simd")                          \
        for (ptrdiff_t i = 0; i < n; i++) STATEMENT; \
    } while (0)

#define FN_DEFINE_ACTIVATION_RUNS(T, SUFFIX)                                                   \
    /* y = act(y) over n contiguous values (FN_ACT_NONE: unchanged) */                         \
    static inline void fn_activate_##SUFFIX(T* y, ptrdiff_t n, int act) {                       \
        switch (act) {                                                                          \
        case FN_ACT_RELU: FN_ACT_LOOP(y[i] = fn_relu_##SUFFIX(y[i])); break;                    \
        case FN_ACT_SILU: FN_ACT_LOOP(y[i] = fn_silu_##SUFFIX(y[i])); break;                    \
        case FN_ACT_GELU: FN_ACT_LOOP(y[i] = fn_gelu_##SUFFIX(y[i])); break;                    \
        case FN_ACT_GELU_TANH: FN_ACT_LOOP(y[i] = fn_gelu_tanh_##SUFFIX(y[i])); break;          \
        default: break;                                                                         \
        }                                                                                       \
    }                                                                                           \
    /* g = dy * act'(z) over n contiguous values; g may be z (FN_ACT_NONE: g = dy) */          \
    static inline void fn_act_grad_##SUFFIX(const T* z, const T* dy, T* g, ptrdiff_t n,         \
                                            int act) {                                          \
        switch (act) {                                                                          \
        case FN_ACT_RELU: FN_ACT_LOOP(g[i] = fn_relu_grad_##SUFFIX(z[i], dy[i])); break;        \
        case FN_ACT_SILU: FN_ACT_LOOP(g[i] = fn_silu_grad_##SUFFIX(z[i], dy[i])); break;        \
        case FN_ACT_GELU: FN_ACT_LOOP(g[i] = fn_gelu_grad_##SUFFIX(z[i], dy[i])); break;        \
        case FN_ACT_GELU_TANH: FN_ACT_LOOP(g[i] = fn_gelu_tanh_grad_##SUFFIX(z[i], dy[i])); break; \
        default: if (g != dy) memmove(g, dy, (size_t)n * sizeof(T)); break;                     \
        }                                                                                       \
    }

FN_DEFINE_ACTIVATION_RUNS(float, f32)
FN_DEFINE_ACTIVATION_RUNS(double, f64)

#undef FN_DEFINE_ACTIVATION_MATH
#undef FN_DEFINE_ACTIVATION_RUNS

#endif /* FASTNORM_ACTIVATIONS_H */
