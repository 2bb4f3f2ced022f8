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
 * we never use), so exp is our own (fn_exp_neg_T, e^-x: a minimax polynomial
 * and one 2^n factor made from exponent bits, see there), and callers clamp
 * its argument once, to bounds chosen so that each limit comes out exact.
 *
 * Measured against long double (|z| <= 100 dense, every 1021st float32 bit
 * pattern, special values; tests/test_activation_accuracy.py checks the same
 * against float64), max |error| / max(|exact|, 0.25), float32 AVX2/generic:
 *   silu 2.2e-7 / 2.0e-7, silu' 2.4e-7, gelu_tanh 1.7e-7, gelu_tanh' 2.7e-7,
 *   gelu 2.9e-7 / 3.2e-7, gelu' 5.1e-7 / 5.5e-7 (1.4e-7 absolute where gelu'
 *   ~ 0.27, the cancellation of Phi(z) + z pdf(z) near z = -0.3; it was 5.3e-7
 *   before), float64 all <= 5.2e-16. Limits: act(-inf) = -0, act(+inf) = +inf,
 *   act'(+-inf) = 1 / 0 (within 1e-30), NaN gives NaN.
 *
 *   relu       max(z, 0) (NaN stays NaN); derivative 0 where z <= 0
 *   silu       z * sigmoid(z)
 *   gelu_tanh  torch's approximate="tanh": 0.5 z (1 + tanh(u)),
 *              u = sqrt(2/pi) (z + 0.044715 z^3), computed as z * sigmoid(2u)
 *              (the same value without the cancellation of 1 + tanh near -1)
 *   gelu       exact: z * Phi(z), Phi the standard normal CDF = erfc(-z/sqrt2)/2.
 *              float32: the upper tail Q as t G(t) exp(-z^2/2) (fn_norm_tail_f32),
 *              vectorized. float64: libm's erfc (double-accurate, but a scalar
 *              call: float64 gelu is the one activation not vectorized).
 */
#ifndef FASTNORM_ACTIVATIONS_H
#define FASTNORM_ACTIVATIONS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "_simd.h" /* fn_affine_out, fn_line_twin, fn_stream_copy */

enum {
    FN_ACT_NONE = 0,
    FN_ACT_RELU = 1,
    FN_ACT_SILU = 2,
    FN_ACT_GELU = 3,
    FN_ACT_GELU_TANH = 4
};

#define FN_INLINE static inline __attribute__((always_inline))

/* ------------------------------------------------------------------ exp */

FN_INLINE float fn_f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, sizeof f); return f; }
FN_INLINE uint32_t fn_f32_bits(float f) { uint32_t u; memcpy(&u, &f, sizeof u); return u; }
FN_INLINE double fn_f64_from_bits(uint64_t u) { double f; memcpy(&f, &u, sizeof f); return f; }
FN_INLINE uint64_t fn_f64_bits(double f) { uint64_t u; memcpy(&u, &f, sizeof u); return u; }

/* Adding 1.5 * 2^mant rounds to an integer n held in the low mantissa bits; the
 * extra bias (127 / 1023) puts n's biased exponent there, so shifting the bits
 * left by the mantissa width gives 2^n directly, one integer operation. */
#define FN_EXP_SHIFTER_f32 (0x1.8p23f + 127)
#define FN_EXP_SHIFTER_f64 (0x1.8p52 + 1023)

/* e^-x (the callers' form: the sign sits in the constants, which keeps their
 * clamps single min/max instructions) for x in [-88.7, 88.3] (callers clamp;
 * NaN gives NaN): 2^n p(r), n = round(-x / ln2), r = -x - n ln2 in
 * [-ln2/2, ln2/2]. p is a degree-5 polynomial, minimax (Lawson) for relative
 * error: 1.05e-7 with its float32 coefficients (degree 6 would be 3e-9 and cost
 * one more FMA per value without changing any activation's measured error
 * noticeably). With FMA, r takes one rounding: ln2's own float error adds
 * |n| 1.9e-9 relative, which matters only in far tails (|n| > 50), where the
 * activations are below their absolute ulp; without FMA ln2 is split in two so
 * n ln2_hi is exact. Measured against exp: within 2.1e-7 relative over the domain.
 * The scale is one factor, so the domain's ends saturate a little early:
 * n = 128 is the inf bit pattern (x < -88.38 gives +inf) and n = -127 is +0
 * (x > 87.68 gives 0 instead of a subnormal). */
FN_INLINE float fn_exp_neg_f32(float x) {
    float t = x * -1.44269504088896341f + FN_EXP_SHIFTER_f32;
    float n = t - FN_EXP_SHIFTER_f32;
#ifdef __FMA__
    float m = x + n * 0.693147182f; /* m = -r */
#else
    float m = (x + n * 0.693359375f) - n * 2.12194440e-4f; /* ln2 = hi - lo */
#endif
    float p = -0x1.106252p-7f; /* p(-m), coefficients with alternating signs */
    p = p * m + 0x1.572a66p-5f;
    p = p * m - 0x1.5557b0p-3f;
    p = p * m + 0x1.fffdfcp-2f;
    p = p * m - 1.0f;
    p = p * m + 1.0f;
    return p * fn_f32_from_bits(fn_f32_bits(t) << 23);
}

/* e^-x for x in [-710.1, 709.4], the same way: degree-11 polynomial (Chebyshev
 * fit, relative error ~1e-17, Taylor needed degree 13); x < -709.44 gives +inf,
 * x > 708.75 gives 0. */
FN_INLINE double fn_exp_neg_f64(double x) {
    double t = x * -1.4426950408889634 + FN_EXP_SHIFTER_f64;
    double n = t - FN_EXP_SHIFTER_f64;
    double m = (x + n * 6.93145751953125e-1) + n * 1.42860682030941723212e-6;
    double p = -0x1.af38a9b0ec855p-26;
    p = p * m + 0x1.289185613a3d6p-22;
    p = p * m - 0x1.71de0dae63bb3p-19;
    p = p * m + 0x1.a019b90d2ae7ap-16;
    p = p * m - 0x1.a01a01a7c41d5p-13;
    p = p * m + 0x1.6c16c1788bd90p-10;
    p = p * m - 0x1.11111111109b3p-7;
    p = p * m + 0x1.5555555553d63p-5;
    p = p * m - 0x1.5555555555556p-3;
    p = p * m + 0x1.0000000000001p-1;
    p = p * m - 1.0;
    p = p * m + 1.0;
    return p * fn_f64_from_bits(fn_f64_bits(t) << 52);
}

/* ------------------------------------------------------ standard normal CDF */

#define FN_SQRT_2_OVER_PI 0.79788456080286536
#define FN_INV_SQRT_2PI 0.39894228040143268

/* float32: Phi(z) = Q(-z) for z < 0 and 1 - Q(z) otherwise, Q(x) = P(X > x) the
 * upper tail, written Q(x) = t G(t) exp(-x^2/2) with t = 1 / (1 + 0.35 x): G is a
 * degree-8 polynomial fitted (Lawson) for minimax relative error over
 * x in [0, 13.25], 8.2e-8 with its float32 coefficients. The rounding of x^2
 * adds up to x^2 * 3e-8 relative in the far tail (gelu(-5) = -1.4e-6 is off by
 * 1e-12). One division and one exp per value, shared by the derivative:
 * returns Q(x) + w pdf(x) = e (t G(t) + w / sqrt(2 pi)), e = exp(-x^2/2) given,
 * w = 0 (forward) or -x (gelu' = Phi(z) + z pdf(z)). Takes x = |z| <= 13.25 (in
 * fn_exp_neg_f32's domain, and e = 0 there exactly). */
FN_INLINE float fn_norm_tail_f32(float x, float e, float w) {
    float t = 1.0f / (1.0f + 0.35f * x);
    float g = -0.029108852f;
    g = g * t + 0.14378785f;
    g = g * t - 0.25532654f;
    g = g * t + 0.15872121f;
    g = g * t - 0.022790227f;
    g = g * t + 0.10536899f;
    g = g * t + 0.11986914f;
    g = g * t + 0.13985670f;
    g = g * t + 0.13962170f;
    return e * (t * g + w * (float)FN_INV_SQRT_2PI);
}
#define FN_GELU_FLAT_f32 13.25f

/* float64: libm's erfc (double-accurate, but a scalar call: float64 gelu is the
 * one activation not vectorized). Phi(-37.5) ~ 1e-308, so 37.5 is flat too. */
FN_INLINE double fn_norm_cdf_f64(double z) { return 0.5 * erfc(z * -0.70710678118654752); }
#define FN_GELU_FLAT_f64 37.5

/* ------------------------------------------- activations and derivatives */

#define FN_MAX(v, lo) ((v) < (lo) ? (lo) : (v)) /* NaN stays NaN */
#define FN_MIN(v, hi) ((v) > (hi) ? (hi) : (v))
#define FN_CLAMP(v, lo, hi) FN_MIN(FN_MAX(v, lo), hi)

/* silu and gelu_tanh are z * s, s = sigmoid(v) = 1 / (1 + e), e = exp(-v), with
 * v = z (silu) or 2u, u = sqrt(2/pi) (z + 0.044715 z^3) (gelu_tanh, torch's
 * approximate="tanh": 0.5 z (1 + tanh(u)) without the cancellation near -1).
 *
 * Forward: y = zlo / (1 + e), zlo = max(z, lo) with exp(-lo) = inf, so y = -0
 * for z <= lo (the true value is below 1e-36 / 1e-300 there, and -inf gives -0,
 * not -inf / inf); v is also clamped at hi, where e is negligible against 1,
 * which keeps exp in its domain while huge and +inf z still give y = z.
 * Derivative: s (1 + z v'(z) (1 - s)) with 1 - s = e s (no cancellation when s
 * is near 1), one division for both; z is clamped to +-flat where the
 * derivative is flat to working precision (e stays finite, so the result is
 * 0 or 1, never inf * 0).
 *
 * The bounds are arguments, not literals: the runs pass them through
 * FN_OPAQUE, because gcc 12 folds a literal bound into the code after the
 * clamp and if-converts each case separately (compares, blends and duplicated
 * arithmetic, 25% slower); an opaque bound compiles to one maxps / minps. */
#define FN_DEFINE_ACTIVATION_MATH(T, SUFFIX)                                                  \
    FN_INLINE T fn_relu_##SUFFIX(T z) { return z < 0 ? (T)0 : z; }                           \
    FN_INLINE T fn_relu_grad_##SUFFIX(T z, T dy) { return z <= 0 ? (T)0 : dy; }              \
    FN_INLINE T fn_silu_##SUFFIX(T z, T lo, T hi) {                                           \
        T zlo = FN_MAX(z, lo);                                                                \
        return zlo / ((T)1 + fn_exp_neg_##SUFFIX(FN_MIN(zlo, hi)));                            \
    }                                                                                         \
    FN_INLINE T fn_silu_grad_##SUFFIX(T z, T dy, T flat) {                                    \
        T zc = FN_CLAMP(z, -flat, flat);                                                      \
        T e = fn_exp_neg_##SUFFIX(zc);                                                        \
        T s = (T)1 / ((T)1 + e);                                                              \
        return dy * (s * ((T)1 + zc * (e * s)));                                              \
    }                                                                                         \
    /* v = 2u = z (a + b z^2) */                                                              \
    FN_INLINE T fn_gelu_tanh_v_##SUFFIX(T z) {                                                \
        return z * ((T)(2 * FN_SQRT_2_OVER_PI) + (T)(2 * FN_SQRT_2_OVER_PI * 0.044715) * z * z); \
    }                                                                                         \
    /* lo: zlo's floor, vlo / vhi: v's clamp (exp(-vlo) = inf) */                             \
    FN_INLINE T fn_gelu_tanh_##SUFFIX(T z, T lo, T vlo, T vhi) {                              \
        T zlo = FN_MAX(z, lo);                                                                \
        T v = FN_CLAMP(fn_gelu_tanh_v_##SUFFIX(zlo), vlo, vhi);                               \
        return zlo / ((T)1 + fn_exp_neg_##SUFFIX(v));                                          \
    }                                                                                         \
    FN_INLINE T fn_gelu_tanh_grad_##SUFFIX(T z, T dy, T flat) {                               \
        T zc = FN_CLAMP(z, -flat, flat);                                                      \
        T e = fn_exp_neg_##SUFFIX(fn_gelu_tanh_v_##SUFFIX(zc));                                \
        T s = (T)1 / ((T)1 + e);                                                              \
        T dv = (T)(2 * FN_SQRT_2_OVER_PI) + (T)(6 * FN_SQRT_2_OVER_PI * 0.044715) * zc * zc;  \
        return dy * (s * ((T)1 + zc * (e * s) * dv));                                         \
    }

FN_DEFINE_ACTIVATION_MATH(float, f32)
FN_DEFINE_ACTIVATION_MATH(double, f64)

/* Bounds, float32: exp(88.5) = inf, exp(-80) ~ 1.8e-35 is normal and negligible
 * against 1; silu' is flat beyond |z| = 80, gelu_tanh' beyond 10 (|v(10)| = 87.3,
 * e finite and normal); gelu_tanh: v(-11) < -88.5. float64: exp(709.8) = inf,
 * exp(-700) ~ 1e-304; gelu_tanh': |v(20)| = 603; v(-25) < -709.8. */
#define FN_SILU_LO_f32 -88.5f
#define FN_SILU_HI_f32 80.0f
#define FN_SILU_FLAT_f32 80.0f
#define FN_GELU_TANH_LO_f32 -11.0f
#define FN_GELU_TANH_FLAT_f32 10.0f
#define FN_SILU_LO_f64 -709.8
#define FN_SILU_HI_f64 700.0
#define FN_SILU_FLAT_f64 700.0
#define FN_GELU_TANH_LO_f64 -25.0
#define FN_GELU_TANH_FLAT_f64 20.0

/* gelu = z Phi(z), gelu' = Phi(z) + z pdf(z), z clamped to +-flat = FN_GELU_FLAT
 * (below, gelu is -0 and both derivatives 0 or 1; +inf still gives +inf) */
FN_INLINE float fn_gelu_f32(float z, float flat) {
    float zlo = FN_MAX(z, -flat);
    float x = FN_MIN(fabsf(zlo), flat);
    float q = fn_norm_tail_f32(x, fn_exp_neg_f32(0.5f * x * x), 0.0f);
    return zlo * (zlo < 0.0f ? q : 1.0f - q);
}
FN_INLINE float fn_gelu_grad_f32(float z, float dy, float flat) {
    float zc = FN_CLAMP(z, -flat, flat);
    float x = fabsf(zc);
    float h = fn_norm_tail_f32(x, fn_exp_neg_f32(0.5f * x * x), -x);
    return dy * (zc < 0.0f ? h : 1.0f - h);
}
FN_INLINE double fn_gelu_f64(double z, double flat) {
    double zlo = FN_MAX(z, -flat);
    return zlo * fn_norm_cdf_f64(zlo);
}
FN_INLINE double fn_gelu_grad_f64(double z, double dy, double flat) {
    double zc = FN_CLAMP(z, -flat, flat);
    double pdf = FN_INV_SQRT_2PI * fn_exp_neg_f64(0.5 * zc * zc);
    return dy * (fn_norm_cdf_f64(zc) + zc * pdf);
}

/* ------------------------------------------------------- elementwise runs */

#define FN_ACT_LOOP(STATEMENT)                       \
    do {                                             \
        _Pragma("omp simd")                          \
        for (ptrdiff_t i = 0; i < n; i++) STATEMENT; \
    } while (0)

/* hides a bound's value from the optimizer (see FN_DEFINE_ACTIVATION_MATH); used
 * once per run, outside the loop */
#if defined(__GNUC__)
#define FN_OPAQUE(v) __asm__("" : "+m"(v))
#else
#define FN_OPAQUE(v) ((void)0)
#endif

/* g = dy * act'(Z) over i < n, one omp-simd loop per activation (FN_ACT_NONE: g = dy),
 * with act, n, g and dy in scope; Z an expression of i: the stored z[i], or z formed in
 * the same sweep from x, never stored (the backward's fused loops below). */
#define FN_ACT_GRAD_LOOP(T, SUFFIX, Z)                                                          \
    do {                                                                                        \
        T silu_flat = FN_SILU_FLAT_##SUFFIX, gelu_flat = FN_GELU_FLAT_##SUFFIX;                 \
        T tanh_flat = FN_GELU_TANH_FLAT_##SUFFIX;                                               \
        FN_OPAQUE(silu_flat); FN_OPAQUE(gelu_flat); FN_OPAQUE(tanh_flat);                       \
        switch (act) {                                                                          \
        case FN_ACT_RELU: FN_ACT_LOOP(g[i] = fn_relu_grad_##SUFFIX(Z, dy[i])); break;           \
        case FN_ACT_SILU: FN_ACT_LOOP(g[i] = fn_silu_grad_##SUFFIX(Z, dy[i], silu_flat)); break; \
        case FN_ACT_GELU: FN_ACT_LOOP(g[i] = fn_gelu_grad_##SUFFIX(Z, dy[i], gelu_flat)); break; \
        case FN_ACT_GELU_TANH:                                                                  \
            FN_ACT_LOOP(g[i] = fn_gelu_tanh_grad_##SUFFIX(Z, dy[i], tanh_flat));                \
            break;                                                                              \
        default: if (g != dy) FN_ACT_LOOP(g[i] = dy[i]); break;                                 \
        }                                                                                       \
    } while (0)

#define FN_DEFINE_ACTIVATION_RUNS(T, SUFFIX)                                                   \
    /* y = act(y) over n contiguous values (FN_ACT_NONE: unchanged). Not inlined: inlined \
       into its callers, LayerNorm (8,512,768) gelu_tanh forward ran 6% slower. */      \
    static __attribute__((noinline)) void fn_activate_##SUFFIX(T* y, ptrdiff_t n, int act) { \
        T lo, hi, vlo, flat;                                                                    \
        switch (act) {                                                                          \
        case FN_ACT_RELU: FN_ACT_LOOP(y[i] = fn_relu_##SUFFIX(y[i])); break;                    \
        case FN_ACT_SILU:                                                                       \
            lo = FN_SILU_LO_##SUFFIX, hi = FN_SILU_HI_##SUFFIX;                                 \
            FN_OPAQUE(lo); FN_OPAQUE(hi);                                                       \
            FN_ACT_LOOP(y[i] = fn_silu_##SUFFIX(y[i], lo, hi));                                 \
            break;                                                                              \
        case FN_ACT_GELU:                                                                       \
            flat = FN_GELU_FLAT_##SUFFIX;                                                       \
            FN_OPAQUE(flat);                                                                    \
            FN_ACT_LOOP(y[i] = fn_gelu_##SUFFIX(y[i], flat));                                   \
            break;                                                                              \
        case FN_ACT_GELU_TANH:                                                                  \
            lo = FN_GELU_TANH_LO_##SUFFIX, vlo = FN_SILU_LO_##SUFFIX, hi = FN_SILU_HI_##SUFFIX; \
            FN_OPAQUE(lo); FN_OPAQUE(vlo); FN_OPAQUE(hi);                                       \
            FN_ACT_LOOP(y[i] = fn_gelu_tanh_##SUFFIX(y[i], lo, vlo, hi));                       \
            break;                                                                              \
        default: break;                                                                         \
        }                                                                                       \
    }                                                                                           \
    /* g = dy * act'(z) over n contiguous values; g may be z or dy */                        \
    static inline void fn_act_grad_##SUFFIX(const T* z, const T* dy, T* g, ptrdiff_t n,         \
                                            int act) {                                          \
        FN_ACT_GRAD_LOOP(T, SUFFIX, z[i]);                                                      \
    }

FN_DEFINE_ACTIVATION_RUNS(float, f32)
FN_DEFINE_ACTIVATION_RUNS(double, f64)

/* The backward's g = dy * act'(z) with z formed in the same sweep, never stored:
 * z = ((x - mean_hi) - mean_lo) * scale * w + b (w, b per element) or
 * ((x - mean_hi) - mean_lo) * scale + shift (w NULL), fn_affine_out's arithmetic. */
#define FN_DEFINE_AFFINE_ACT_GRAD(T, SUFFIX)                                                   \
    static inline void fn_affine_act_grad_##SUFFIX(const T* restrict x, const T* dy, T* g,     \
                                                  const T* restrict w, const T* restrict b,    \
                                                  ptrdiff_t n, T mean_hi, T mean_lo, T scale,  \
                                                  T shift, int act) {                          \
        if (w)                                                                                  \
            FN_ACT_GRAD_LOOP(T, SUFFIX, (((x[i] - mean_hi) - mean_lo) * scale * w[i] + b[i]));  \
        else                                                                                    \
            FN_ACT_GRAD_LOOP(T, SUFFIX, (((x[i] - mean_hi) - mean_lo) * scale + shift));        \
    }
FN_DEFINE_AFFINE_ACT_GRAD(float, f32)
FN_DEFINE_AFFINE_ACT_GRAD(double, f64)

/* The same for n channels of a channels-last row, parameters per channel: z =
 * (x - mean_hi) * scale + shift, or x * scale + shift when mean_hi is NULL
 * (fn_channels_affine's arithmetic) */
#define FN_DEFINE_CHANNELS_ACT_GRAD(T, SUFFIX)                                                 \
    static inline void fn_channels_act_grad_##SUFFIX(const T* restrict x, const T* dy, T* g,   \
                                                    ptrdiff_t n, const T* restrict mean_hi,    \
                                                    const T* restrict scale,                   \
                                                    const T* restrict shift, int act) {        \
        if (mean_hi)                                                                            \
            FN_ACT_GRAD_LOOP(T, SUFFIX, ((x[i] - mean_hi[i]) * scale[i] + shift[i]));           \
        else                                                                                    \
            FN_ACT_GRAD_LOOP(T, SUFFIX, (x[i] * scale[i] + shift[i]));                          \
    }
FN_DEFINE_CHANNELS_ACT_GRAD(float, f32)
FN_DEFINE_CHANNELS_ACT_GRAD(double, f64)

/* The backward's per-run work with an activation, out of line: inlined into the
 * BatchNorm loops that call them, their eight activation loops made those loops'
 * plain (no activation) route 1-4% slower. */
#define FN_ACT_NOINLINE static __attribute__((noinline))

/* Values per piece below: a piece's g is formed, then used at once. Pieces this short
 * keep x, dy and g in L1 and let the loads of the next piece overlap the arithmetic of
 * this one. BatchNorm2d (32,64,56,56) + ReLU, one thread: with g formed for a whole run
 * of 3136 values, then summed, the sums took 1.8x the time of those without an
 * activation; in pieces, 0.93-1.0x. */
#define FN_ACT_PIECE 256

/* sum_g += sum(g), sum_gd += sum(g * ((x - mean_hi) - mean_lo)) over n values, g =
 * dy * act'(z) (z as in fn_affine_act_grad) formed and summed piece by piece: into g_out
 * when not NULL, else on the stack. The sums are the same either way. */
#define FN_DEFINE_ACT_RUN_BACKWARD(T, SUFFIX)                                                  \
    FN_ACT_NOINLINE void fn_act_grad_sums_##SUFFIX(const T* x, const T* dy, T* g_out,          \
                                                   ptrdiff_t n, T mean_hi, T mean_lo, T scale, \
                                                   T shift, int act, double* sum_g,            \
                                                   double* sum_gd) {                           \
        T piece[FN_ACT_PIECE];                                                                 \
        for (ptrdiff_t i = 0; i < n; i += FN_ACT_PIECE) {                                      \
            const ptrdiff_t m = n - i < FN_ACT_PIECE ? n - i : FN_ACT_PIECE;                   \
            T* g = g_out ? g_out + i : piece;                                                  \
            fn_affine_act_grad_##SUFFIX(x + i, dy + i, g, NULL, NULL, m, mean_hi, mean_lo,     \
                                        scale, shift, act);                                    \
            fn_row_grad_sums_##SUFFIX(x + i, g, NULL, m, mean_hi, mean_lo, sum_g, sum_gd);     \
        }                                                                                      \
    }                                                                                          \
    /* dx = k_dy * g + (k_x * ((x - mean_hi) - mean_lo) + k_0), g formed in dx piece by     \
     * piece (the values of fn_affine_backward on g written out whole) */                    \
    FN_ACT_NOINLINE void fn_act_affine_backward_##SUFFIX(const T* x, const T* dy, T* dx,       \
                                                         ptrdiff_t n, T mean_hi, T mean_lo,    \
                                                         T k_dy, T k_x, T k_0, T scale,        \
                                                         T shift, int act) {                   \
        for (ptrdiff_t i = 0; i < n; i += FN_ACT_PIECE) {                                      \
            const ptrdiff_t m = n - i < FN_ACT_PIECE ? n - i : FN_ACT_PIECE;                   \
            fn_affine_act_grad_##SUFFIX(x + i, dy + i, dx + i, NULL, NULL, m, mean_hi,         \
                                        mean_lo, scale, shift, act);                           \
            fn_affine_backward_##SUFFIX(x + i, dx + i, dx + i, m, mean_hi, mean_lo, k_dy, k_x, \
                                        k_0, 0);                                               \
        }                                                                                      \
    }
FN_DEFINE_ACT_RUN_BACKWARD(float, f32)
FN_DEFINE_ACT_RUN_BACKWARD(double, f64)

/* fn_cols_grad_sums of g = dy * act'(z) over channels-last rows (z as in
 * fn_channels_act_grad, coefficients of the nc channels), each row of g written to g
 * (laid out like x) just before it is summed, so that the next row's loads overlap this
 * row's arithmetic. The sums are those of g formed for all rows first;
 * act_rows_interleave (_activations.pxd) says when this order pays. */
#define FN_ACT_G_ROWS(SUFFIX, r, rows)                                                        \
    for (ptrdiff_t q_ = (r); q_ < (r) + (rows); q_++)                                          \
        fn_channels_act_grad_##SUFFIX(x + q_ * stride, dy + q_ * stride, g + q_ * stride, nc, \
                                      z_hi, z_scale, z_shift, act)
#define FN_ACT_G_ROWS_f32(r, rows) FN_ACT_G_ROWS(f32, r, rows)
#define FN_ACT_G_ROWS_f64(r, rows) FN_ACT_G_ROWS(f64, r, rows)
#define FN_DEFINE_COLS_ACT_GRAD_SUMS(T, SUFFIX)                                                \
    FN_ACT_NOINLINE void fn_cols_act_grad_sums_##SUFFIX(                                       \
        const T* x, const T* dy, T* g, ptrdiff_t nrows, ptrdiff_t stride, ptrdiff_t nc,       \
        const T* mean_hi, const T* mean_lo, const T* z_hi, const T* z_scale,                   \
        const T* z_shift, int act, double* sum_g, double* sum_gd) {                            \
        FN_COLS_GRAD_SUMS_BODY(T, FN_ACT_G_ROWS_##SUFFIX);                                     \
    }
FN_DEFINE_COLS_ACT_GRAD_SUMS(float, f32)
FN_DEFINE_COLS_ACT_GRAD_SUMS(double, f64)

/* y = relu(z), z as in fn_affine_out (w NULL: the scalar affine), in one sweep: relu is
 * too cheap to be worth a second sweep over y, unlike the other activations (fused into
 * one loop they measured 0.88-0.90x). BatchNorm2d (32,64,56,56) + relu eval, 1 thread:
 * 1.36 -> 1.20 ms, train 2.60 -> 2.46 ms; GroupNorm(32) (8,256,56,56) + relu 1.84 -> 1.77 ms. */
#define FN_DEFINE_AFFINE_RELU(T, SUFFIX)                                                       \
    static inline void fn_affine_relu_##SUFFIX(const T* restrict x, T* restrict y,              \
                                               const T* restrict w, const T* restrict b,        \
                                               ptrdiff_t n, T mean_hi, T mean_lo, T scale,      \
                                               T shift) {                                       \
        if (w)                                                                                  \
            FN_ACT_LOOP(y[i] = fn_relu_##SUFFIX(((x[i] - mean_hi) - mean_lo) * scale * w[i]     \
                                                + b[i]));                                       \
        else                                                                                    \
            FN_ACT_LOOP(y[i] = fn_relu_##SUFFIX(((x[i] - mean_hi) - mean_lo) * scale + shift)); \
    }                                                                                           \
    /* the same for n channels of a channels-last row, z = fn_channels_affine's          \
       (x - mean_hi) * scale + shift per channel (mean_hi NULL: x * scale + shift) */      \
    static inline void fn_channels_relu_##SUFFIX(const T* restrict x, T* restrict y,            \
                                                 ptrdiff_t n, const T* restrict mean_hi,        \
                                                 const T* restrict scale,                       \
                                                 const T* restrict shift) {                     \
        if (mean_hi)                                                                            \
            FN_ACT_LOOP(y[i] = fn_relu_##SUFFIX((x[i] - mean_hi[i]) * scale[i] + shift[i]));    \
        else                                                                                    \
            FN_ACT_LOOP(y[i] = fn_relu_##SUFFIX(x[i] * scale[i] + shift[i]));                   \
    }
FN_DEFINE_AFFINE_RELU(float, f32)
FN_DEFINE_AFFINE_RELU(double, f64)

/* A normalization's output with an activation, streamed: y = act(z) over n contiguous
 * values, z = fn_affine_out's, non-temporal stores (same values as in place). The
 * activation reads z back, so z is formed chunk by chunk in an L1 scratch placed at y's
 * offsets within a line, activated there and copied out (fn_stream_copy); chunks end on
 * y's line boundaries, so only the run's end lines are partial. Out of line, so that
 * the scratch stays out of the callers' frames (inlined, one A/B read their plain path
 * 12% slower; the machine's A/A spread was 8%). GroupNorm(32) (8,256,56,56) + silu
 * forward, 1 thread: 4.96 -> 3.97 ms; relu 2.97 -> 2.27 ms.
 * ahead (values, 0: none): each chunk also prefetches x's lines that far ahead into L2,
 * so that memory keeps reading the next row while the activation's arithmetic runs
 * (see forward_row in _rows.pxi). Chunks are short so that these prefetches come a
 * few lines at a time: 64 at once (chunks of 4 KiB) stalled on the outstanding
 * misses and ran 0.77-0.91x; chunks of 1 KiB without prefetches time as those of 4 KiB. */
#define FN_STREAM_ACT_CHUNK_BYTES 1024 /* 16 lines */
#define FN_DEFINE_AFFINE_ACT_STREAMED(T, SUFFIX)                                               \
    static __attribute__((noinline)) void fn_affine_act_streamed_##SUFFIX(                      \
        const T* x, T* y, const T* w, const T* b, ptrdiff_t n, T mean_hi, T mean_lo, T scale,   \
        T shift, int act, ptrdiff_t ahead) {                                                    \
        T scratch[(FN_STREAM_ACT_CHUNK_BYTES + 64) / sizeof(T)];                                \
        for (ptrdiff_t start = 0, stop; start < n; start = stop) {                              \
            stop = start + FN_STREAM_ACT_CHUNK_BYTES / (ptrdiff_t)sizeof(T)                     \
                   - (ptrdiff_t)(((uintptr_t)(y + start) & 63) / sizeof(T));                   \
            if (stop > n) stop = n;                                                             \
            if (ahead) fn_prefetch_lines_l2(x + start + ahead, (stop - start) * sizeof(T));     \
            T* z = (T*)fn_line_twin(scratch, y + start);                                        \
            if (act == FN_ACT_RELU) {                                                           \
                fn_affine_relu_##SUFFIX(x + start, z, w ? w + start : NULL,                     \
                                        b ? b + start : NULL, stop - start, mean_hi, mean_lo,   \
                                        scale, shift);                                          \
            } else {                                                                            \
                fn_affine_out_##SUFFIX(x + start, z, w ? w + start : NULL,                      \
                                       b ? b + start : NULL, stop - start, mean_hi, mean_lo,    \
                                       scale, shift, 0);                                        \
                fn_activate_##SUFFIX(z, stop - start, act);                                     \
            }                                                                                   \
            fn_stream_copy(y + start, z, (size_t)(stop - start) * sizeof(T));                   \
        }                                                                                       \
    }
FN_DEFINE_AFFINE_ACT_STREAMED(float, f32)
FN_DEFINE_AFFINE_ACT_STREAMED(double, f64)

#undef FN_DEFINE_ACTIVATION_MATH
#undef FN_DEFINE_ACTIVATION_RUNS
#undef FN_DEFINE_AFFINE_ACT_STREAMED
#undef FN_DEFINE_AFFINE_RELU
#undef FN_DEFINE_AFFINE_ACT_GRAD
#undef FN_DEFINE_CHANNELS_ACT_GRAD
#undef FN_ACT_GRAD_LOOP

#endif /* FASTNORM_ACTIVATIONS_H */
