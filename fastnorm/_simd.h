/* Vectorized primitives for the Cython kernels.
 *
 * Why C: a float reduction (s += x[i]) vectorizes only if the compiler may
 * reorder the additions. We never build with -ffast-math, and Cython cannot
 * say so for one loop. Here the reductions keep several explicit vector
 * accumulators (GCC/Clang vector extensions), so the summation order is
 * written down: it is the same in every build and for every thread count.
 *
 * Blocked accumulation: values are summed in the working precision over
 * short blocks (a few terms per vector lane, so float32 loses almost
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
#include <stdint.h>
#include <string.h>

/* AVX2+FMA builds: intrinsics where the vector extensions compile poorly, and
 * non-temporal stores (FN_HAVE_STREAM) */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FN_HAVE_STREAM 1
#else
#define FN_HAVE_STREAM 0
#endif

/* Row reductions (LayerNorm/RMSNorm/GroupNorm rows): contiguous runs reduced
 * with four independent accumulators of explicit 32-byte vectors (GCC/Clang
 * vector extensions), so the adds pipeline instead of waiting on one chain.
 * Vector-extension arithmetic is elementwise, so the summation order is the
 * same in every build (a narrower ISA just splits each vector op). float data
 * is summed in float over blocks of FN_ROW_BLOCK values (at most 8 terms per
 * lane), block sums in float64; double data in double throughout.
 */
#define FN_ROW_BLOCK 256

/* Backward row primitives are compiled once, not inlined (FN_SHARED): inlined into
 * the short-rows loop and into the general per-row path, gcc contracted their
 * remainder loops into fma differently, and dx of the same row came out different
 * in the last bit by route (rows of 7 and 383 values). The forward primitives came
 * out the same and stay inlined: out of line, LayerNorm (8,512,768) forward ran 45%
 * slower (0.99 -> 1.45 ms, the same instruction count). test_layernorm.py pins both
 * routes bitwise equal. */
#define FN_SHARED static __attribute__((noinline))

typedef float fn_v8f __attribute__((vector_size(32)));
typedef float fn_v4f __attribute__((vector_size(16)));
typedef double fn_v4d __attribute__((vector_size(32)));

/* Helpers as macros (statement expressions), not functions: a function
 * returning a 32/64-byte vector changes the ABI warning-loudly in the
 * baseline build. */
#define fn_row_load_f32(p) ({ fn_v8f v_; memcpy(&v_, (p), sizeof v_); v_; })
#define fn_row_load_f64(p) ({ fn_v4d v_; memcpy(&v_, (p), sizeof v_); v_; })
/* Float64 totals of working-precision vectors, one total per lane, kept as 32-byte
 * halves: lanes 0-3 in NAME_lo, lanes 4-7 (float data only) in NAME_hi. (A single
 * 64-byte vector of 8 doubles compiled to stack spills and scalar moves: ~200
 * instructions per reduction, the whole cost of a 32-value row.)
 *   fn_wide(NAME)                 declares the zeroed total
 *   fn_wide_add_T(NAME, v)        adds the lanes of v, widened to float64
 *   fn_wide_sum_T(NAME)           ((t0 + t1) + (t2 + t3)) + ((t4 + t5) + (t6 + t7)) */
#define fn_wide(name) fn_v4d name##_lo = {0}, name##_hi = {0}
/* lo, hi = the lanes 0-3 and 4-7 of the float vector v, widened to float64 (AVX2: one
 * conversion per half; gcc lowers __builtin_convertvector of a half into 2-lane pieces,
 * moves and inserts, ~12 instructions for a total's add instead of 5) */
#if FN_HAVE_STREAM
#define fn_widen_halves_f32(v, lo, hi) do {                                               \
    __m256 m_ = (__m256)(v);                                                              \
    __m256d l_ = _mm256_cvtps_pd(_mm256_castps256_ps128(m_));                             \
    __m256d h_ = _mm256_cvtps_pd(_mm256_extractf128_ps(m_, 1));                           \
    (lo) = (fn_v4d)l_;                                                                    \
    (hi) = (fn_v4d)h_; } while (0)
#else
#define fn_widen_halves_f32(v, lo, hi) do {                                               \
    fn_v8f v_ = (v);                                                                      \
    (lo) = __builtin_convertvector(__builtin_shufflevector(v_, v_, 0, 1, 2, 3), fn_v4d);  \
    (hi) = __builtin_convertvector(__builtin_shufflevector(v_, v_, 4, 5, 6, 7), fn_v4d);  \
    } while (0)
#endif
#define fn_wide_add_f32(name, v) do {                                                     \
    fn_v4d wl_, wh_;                                                                      \
    fn_widen_halves_f32(v, wl_, wh_);                                                     \
    (name##_lo) += wl_;                                                                   \
    (name##_hi) += wh_; } while (0)
#define fn_wide_add_f64(name, v) do { (void)(name##_hi); (name##_lo) += (v); } while (0)
#define fn_row_hsum4(v) (((v)[0] + (v)[1]) + ((v)[2] + (v)[3]))
/* ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7)) of the 8 lanes of a and b
 * concatenated (a == b: one 8-lane vector; a, b: two 4-lane halves), in vector steps:
 * pairs, pairs of pairs, the last add (scalar lane reads cost twice the instructions).
 * V4, V2: 4- and 2-lane vectors of the lanes' type. */
#define fn_pairwise8(a, b, V4, V2) ({                                                      \
    V4 p_ = __builtin_shufflevector((a), (b), 0, 2, 4, 6)                                   \
          + __builtin_shufflevector((a), (b), 1, 3, 5, 7);                                  \
    V2 q_ = __builtin_shufflevector(p_, p_, 0, 2) + __builtin_shufflevector(p_, p_, 1, 3);  \
    q_[0] + q_[1]; })
typedef double fn_v2d __attribute__((vector_size(16)));
typedef float fn_v2f __attribute__((vector_size(8)));
#define fn_wide_sum_f32(name) fn_pairwise8(name##_lo, name##_hi, fn_v4d, fn_v2d)
#define fn_wide_sum_f64(name) fn_row_hsum4(name##_lo)

/* Values whose mean is the first guess of a block's mean (fn_row_pilot_*) */
#define FN_PILOT_ELEMS 64
/* the lanes of a working-precision vector summed in pairs, in its own precision */
#define fn_lanes_sum_f32(v) fn_pairwise8(v, v, fn_v4f, fn_v2f)
#define fn_lanes_sum_f64(v) fn_row_hsum4(v)

/* The end of block moments taken around a shift (fn_block_moments_*), from
 * sum_d = sum(x - shift) and sum_dd = sum((x - shift)^2) over count values. Off
 * center: the shift is more than half a standard deviation from the mean, and the
 * sums are taken again around the mean, as a plain two-pass algorithm would. */
static inline int fn_moments_off_center(double sum_d, double sum_dd, double count) {
    double delta = sum_d / count;                                   /* mean - shift */
    return delta * delta * count * 4.0 > sum_dd - sum_d * delta;
}
static inline void fn_moments_finish(double shift, double sum_d, double sum_dd, double count,
                                     double* mean, double* m2) {
    double delta = sum_d / count;
    *mean = shift + delta;
    *m2 = sum_dd - sum_d * delta;
    if (*m2 < 0) *m2 = 0;
}

/* VT: 32-byte vector of T with NL lanes */
#define FN_DEFINE_ROW_REDUCTIONS(T, SUFFIX, VT, NL)                                          \
    /* A block's first guess of its mean (block_moments in _common.pxd): the mean of its     \
       first FN_PILOT_ELEMS values (all when fewer), summed in T. It is only a shift,        \
       refined by the centered sums that follow. */                                          \
    static inline T fn_row_pilot_##SUFFIX(const T* x, ptrdiff_t n) {                          \
        ptrdiff_t m = n < FN_PILOT_ELEMS ? n : FN_PILOT_ELEMS, i = 0;                        \
        VT a0 = {0}, a1 = {0};                                                               \
        for (; i + 2 * NL <= m; i += 2 * NL) {                                               \
            a0 += fn_row_load_##SUFFIX(x + i);                                               \
            a1 += fn_row_load_##SUFFIX(x + i + NL);                                          \
        }                                                                                    \
        T sum = fn_lanes_sum_##SUFFIX(a0 + a1);                                              \
        for (; i < m; i++) sum += x[i];                                                      \
        return (T)((double)sum / (double)m);                                                 \
    }                                                                                        \
    /* One block of m <= FN_ROW_BLOCK values: *part_d and *part_dd, the sums of d and d*d   \
       (d = (x - mean_hi) - mean_lo) over its whole steps of 4 * NL values, lane by lane;      \
       the values after them go one by one into *tail_d and *tail_dd */                       \
    static inline void fn_block_centered_parts_##SUFFIX(const T* xb, ptrdiff_t m, T mean_hi,  \
                                                        T mean_lo, VT* part_d, VT* part_dd,   \
                                                        T* tail_d, T* tail_dd) {              \
        ptrdiff_t i = 0;                                                                     \
        T t_d = *tail_d, t_dd = *tail_dd;                                                    \
        VT d0 = {0}, d1 = {0}, d2 = {0}, d3 = {0}, q0 = {0}, q1 = {0}, q2 = {0}, q3 = {0};   \
        for (; i + 4 * NL <= m; i += 4 * NL) {                                               \
            VT u0 = (fn_row_load_##SUFFIX(xb + i) - mean_hi) - mean_lo;                      \
            VT u1 = (fn_row_load_##SUFFIX(xb + i + NL) - mean_hi) - mean_lo;                 \
            VT u2 = (fn_row_load_##SUFFIX(xb + i + 2 * NL) - mean_hi) - mean_lo;             \
            VT u3 = (fn_row_load_##SUFFIX(xb + i + 3 * NL) - mean_hi) - mean_lo;             \
            d0 += u0;                                                                        \
            d1 += u1;                                                                        \
            d2 += u2;                                                                        \
            d3 += u3;                                                                        \
            q0 += u0 * u0;                                                                   \
            q1 += u1 * u1;                                                                   \
            q2 += u2 * u2;                                                                   \
            q3 += u3 * u3;                                                                   \
        }                                                                                    \
        for (; i < m; i++) {                                                                 \
            T d = (xb[i] - mean_hi) - mean_lo;                                               \
            t_d += d;                                                                        \
            t_dd += d * d;                                                                   \
        }                                                                                    \
        *tail_d = t_d;                                                                       \
        *tail_dd = t_dd;                                                                     \
        *part_d = (d0 + d1) + (d2 + d3);                                                     \
        *part_dd = (q0 + q1) + (q2 + q3);                                                    \
    }                                                                                        \
    /* *sum_d += sum(d), *sum_dd += sum(d*d), d = (x - mean_hi) - mean_lo */                 \
    static inline void fn_row_centered_sums_##SUFFIX(const T* x, ptrdiff_t n, T mean_hi,      \
                                                     T mean_lo, double* sum_d,               \
                                                     double* sum_dd) {                       \
        fn_wide(total_d);                                                                    \
        fn_wide(total_dd);                                                                   \
        T tail_d = 0, tail_dd = 0;                                                           \
        for (ptrdiff_t b = 0; b < n; b += FN_ROW_BLOCK) {                                    \
            VT part_d, part_dd;                                                              \
            fn_block_centered_parts_##SUFFIX(x + b, n - b < FN_ROW_BLOCK ? n - b : FN_ROW_BLOCK, \
                                             mean_hi, mean_lo, &part_d, &part_dd, &tail_d,   \
                                             &tail_dd);                                      \
            fn_wide_add_##SUFFIX(total_d, part_d);                                           \
            fn_wide_add_##SUFFIX(total_dd, part_dd);                                         \
        }                                                                                    \
        *sum_d += fn_wide_sum_##SUFFIX(total_d) + (double)tail_d;                            \
        *sum_dd += fn_wide_sum_##SUFFIX(total_dd) + (double)tail_dd;                         \
    }                                                                                        \
    /* Moments of a block that stays in cache (nrows runs of ncols contiguous values,        \
       stride apart, nrows * ncols > 0): *mean and *m2 (sum of squared deviations).          \
       The sums are taken around a shift: first the pilot mean; if that is more than         \
       half a standard deviation from the block's mean (sorted or structured data), the      \
       sums are taken again around the block's mean, as a plain two-pass algorithm           \
       would. Either way (x - shift) is small, so float32 sums lose nothing to               \
       cancellation. Always inlined: as a function of its own (gcc's choice) it left the     \
       instruction count alone but made LayerNorm (8,512,768) forward 50% slower. */        \
    static inline __attribute__((always_inline))                                             \
    void fn_block_moments_##SUFFIX(const T* x, ptrdiff_t nrows, ptrdiff_t ncols,              \
                                   ptrdiff_t stride, double* mean, double* m2) {              \
        double count = (double)(nrows * ncols), sum_d = 0, sum_dd = 0;                       \
        T shift = fn_row_pilot_##SUFFIX(x, ncols);                                           \
        for (ptrdiff_t r = 0; r < nrows; r++)                                                \
            fn_row_centered_sums_##SUFFIX(x + r * stride, ncols, shift, 0, &sum_d, &sum_dd); \
        if (fn_moments_off_center(sum_d, sum_dd, count)) {                                   \
            shift = (T)(shift + sum_d / count);                                              \
            sum_d = sum_dd = 0;                                                              \
            for (ptrdiff_t r = 0; r < nrows; r++)                                            \
                fn_row_centered_sums_##SUFFIX(x + r * stride, ncols, shift, 0, &sum_d, &sum_dd);\
        }                                                                                    \
        fn_moments_finish(shift, sum_d, sum_dd, count, mean, m2);                            \
    }                                                                                        \
    /* One block of m <= FN_ROW_BLOCK values of the gradient sums: *part_g and *part_gd,  \
       the sums of u = g*w and u*d lane by lane over its whole steps of 4 * NL values (w     \
       NULL: u = g); the values after them go one by one into *tail_g and *tail_gd. Always  \
       inlined, once with w and once with NULL: a test of w in the loop cost register       \
       copies and spilled two accumulators (1.66 -> 1.43 instructions per value, callgrind). */          \
    static inline __attribute__((always_inline))                                             \
    void fn_block_grad_parts_##SUFFIX(const T* xb, const T* gb, const T* wb, ptrdiff_t m,     \
                                      T mean_hi, T mean_lo, VT* part_g, VT* part_gd,          \
                                      T* tail_g, T* tail_gd) {                                \
        ptrdiff_t i = 0;                                                                     \
        T t_g = *tail_g, t_gd = *tail_gd;                                                    \
        VT s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, p0 = {0}, p1 = {0}, p2 = {0}, p3 = {0};   \
        for (; i + 4 * NL <= m; i += 4 * NL) {                                               \
            VT u0 = fn_row_load_##SUFFIX(gb + i);                                            \
            VT u1 = fn_row_load_##SUFFIX(gb + i + NL);                                       \
            VT u2 = fn_row_load_##SUFFIX(gb + i + 2 * NL);                                   \
            VT u3 = fn_row_load_##SUFFIX(gb + i + 3 * NL);                                   \
            if (wb) {                                                                        \
                u0 *= fn_row_load_##SUFFIX(wb + i);                                          \
                u1 *= fn_row_load_##SUFFIX(wb + i + NL);                                     \
                u2 *= fn_row_load_##SUFFIX(wb + i + 2 * NL);                                 \
                u3 *= fn_row_load_##SUFFIX(wb + i + 3 * NL);                                 \
            }                                                                                \
            s0 += u0;                                                                        \
            s1 += u1;                                                                        \
            s2 += u2;                                                                        \
            s3 += u3;                                                                        \
            p0 += u0 * ((fn_row_load_##SUFFIX(xb + i) - mean_hi) - mean_lo);                 \
            p1 += u1 * ((fn_row_load_##SUFFIX(xb + i + NL) - mean_hi) - mean_lo);            \
            p2 += u2 * ((fn_row_load_##SUFFIX(xb + i + 2 * NL) - mean_hi) - mean_lo);        \
            p3 += u3 * ((fn_row_load_##SUFFIX(xb + i + 3 * NL) - mean_hi) - mean_lo);        \
        }                                                                                    \
        for (; i < m; i++) {                                                                 \
            T gw = wb ? gb[i] * wb[i] : gb[i];                                               \
            t_g += gw;                                                                       \
            t_gd += gw * ((xb[i] - mean_hi) - mean_lo);                                      \
        }                                                                                    \
        *tail_g = t_g;                                                                       \
        *tail_gd = t_gd;                                                                     \
        *part_g = (s0 + s1) + (s2 + s3);                                                     \
        *part_gd = (p0 + p1) + (p2 + p3);                                                    \
    }                                                                                        \
    /* *sum_g += sum(g*w), *sum_gd += sum(g*w*d), d = (x - mean_hi) - mean_lo;               \
       w == NULL means w = 1 */                                                              \
    FN_SHARED void fn_row_grad_sums_##SUFFIX(const T* x, const T* g, const T* w,              \
                                                 ptrdiff_t n, T mean_hi, T mean_lo,          \
                                                 double* sum_g, double* sum_gd) {            \
        fn_wide(total_g);                                                                    \
        fn_wide(total_gd);                                                                   \
        T tail_g = 0, tail_gd = 0;                                                           \
        for (ptrdiff_t b = 0; b < n; b += FN_ROW_BLOCK) {                                    \
            ptrdiff_t m = n - b < FN_ROW_BLOCK ? n - b : FN_ROW_BLOCK;                       \
            VT part_g, part_gd;                                                              \
            if (w)                                                                           \
                fn_block_grad_parts_##SUFFIX(x + b, g + b, w + b, m, mean_hi, mean_lo,       \
                                             &part_g, &part_gd, &tail_g, &tail_gd);          \
            else                                                                             \
                fn_block_grad_parts_##SUFFIX(x + b, g + b, NULL, m, mean_hi, mean_lo,        \
                                             &part_g, &part_gd, &tail_g, &tail_gd);          \
            fn_wide_add_##SUFFIX(total_g, part_g);                                           \
            fn_wide_add_##SUFFIX(total_gd, part_gd);                                         \
        }                                                                                    \
        *sum_g += fn_wide_sum_##SUFFIX(total_g) + (double)tail_g;                            \
        *sum_gd += fn_wide_sum_##SUFFIX(total_gd) + (double)tail_gd;                         \
    }

FN_DEFINE_ROW_REDUCTIONS(float, f32, fn_v8f, 8)
FN_DEFINE_ROW_REDUCTIONS(double, f64, fn_v4d, 4)

#undef FN_DEFINE_ROW_REDUCTIONS

/* Output of a normalization, y = ((x - mean_hi) - mean_lo) * scale * w + b with w, b
 * per element, or y = ((x - mean_hi) - mean_lo) * scale + shift when w is NULL.
 * stream != 0 writes with non-temporal stores (AVX2 builds): for outputs much
 * larger than the caches, this saves reading every output line before writing
 * it. The arithmetic is the same either way (a*b+c contracted to one fma in
 * both), so the choice never changes a result. Call fn_stream_fence() before
 * the output is read by another thread. */
static inline void fn_stream_fence(void) {
#if FN_HAVE_STREAM
    _mm_sfence();
#endif
}

/* A scratch run that is to be copied to dst with fn_stream_copy: the first element of buf
 * (which has room for its run plus 64 bytes) at dst's offset within a 64-byte line */
static inline void* fn_line_twin(void* buf, const void* dst) {
    return (char*)buf + (((uintptr_t)dst - (uintptr_t)buf) & 63);
}

/* dst[0, nbytes) = src[0, nbytes), src placed by fn_line_twin: dst's whole 64-byte lines
 * with non-temporal stores (AVX2 builds; fence before another thread reads), its partial
 * end lines plainly. A row written run by run through this never mixes the two kinds in
 * one line: a line shared by two runs is partial, so plain, in both. For outputs formed
 * in an L1 scratch first (a fused activation reads its input back), so that they can
 * still skip reading each output line before writing it. */
static inline void fn_stream_copy(void* dst, const void* src, size_t nbytes) {
    char* d = (char*)dst;
    const char* s = (const char*)src;
#if FN_HAVE_STREAM
    size_t head = (size_t)(-(uintptr_t)d & 63);
    if (nbytes >= head + 64) {
        memcpy(d, s, head);
        d += head, s += head, nbytes -= head;
        for (; nbytes >= 64; d += 64, s += 64, nbytes -= 64) {
            _mm256_stream_si256((__m256i*)d, _mm256_load_si256((const __m256i*)s));
            _mm256_stream_si256((__m256i*)d + 1, _mm256_load_si256((const __m256i*)s + 1));
        }
    }
#endif
    memcpy(d, s, nbytes);
}

#if FN_HAVE_STREAM
/* Non-temporal stores of dx and of channels-last rows are 16 bytes wide (fn_affine_out
 * keeps 32-byte ones, see there), and such a run is streamed only when it is
 * 16-byte aligned and a whole number of 16-byte pieces (else it is written plainly):
 * numpy's outputs are 16 bytes off a 32-byte boundary as often as not, and no plain
 * store may share a cache line with streamed ones. A scalar peel to 32-byte alignment,
 * mixed in, made 32 MiB of 32-channel rows 2.5x slower than plain stores (C driver;
 * 16-byte streams were 1.2x faster than plain there, 1.4x when aligned). */
static inline int fn_row_streamable(const void* y, ptrdiff_t n, size_t itemsize) {
    return ((size_t)y & 15) == 0 && (n * itemsize & 15) == 0;
}
/* the 32 bytes of v to p, 16-byte aligned, as two non-temporal stores */
static inline void fn_stream32(void* p, __m256i v) {
    _mm_stream_si128((__m128i*)p, _mm256_castsi256_si128(v));
    _mm_stream_si128((__m128i*)p + 1, _mm256_extracti128_si256(v, 1));
}
/* the last 16 bytes of a streamed run, p[0..] = F(i), F(i + 1), ... (the scalar formula),
 * as one non-temporal store built in a register */
#define FN_STREAM_TAIL_f32(p, F, i) _mm_stream_ps((p), _mm_setr_ps(F(i), F(i + 1), F(i + 2), F(i + 3)))
#define FN_STREAM_TAIL_f64(p, F, i) _mm_stream_pd((p), _mm_setr_pd(F(i), F(i + 1)))

/* A float row y[0, n) whose values come as vectors at i = 0, 8, 16, ... of the
 * computation's own frame (where its scratch rows are aligned), written with 32-byte
 * non-temporal stores over the whole 64-byte lines of y, [p0, p1), whatever y's
 * alignment: each vector is rotated by y's offset d from a 32-byte boundary and blended
 * with the previous one into the aligned block it completes. The partial lines at the
 * row's ends, shared with the neighbouring rows, get plain masked stores, so no line
 * mixes the two kinds. (Realigning in registers instead of shifting the loop to y's
 * boundaries keeps the scratch loads aligned: shifted, the streamed loop was no faster
 * than plain stores.) Every vector goes through fn_row_put, for i = 0, 8, ... in order:
 * FN_PUT_EDGE (anywhere) or, for body_from <= i < body_to, FN_PUT_BODY (just the rotation,
 * the blend and the stream: the edge checks cost 1.6 instructions per value). */
typedef struct {
    float* y;
    ptrdiff_t d, p0, p1;
    ptrdiff_t body_from, body_to;
    ptrdiff_t shift;    /* a body vector at i completes the block at i + shift */
    __m256i rot;        /* lane j <- lane (j + d) & 7 */
    __m256 from_prev;   /* block lanes taken from the previous vector: j < 8 - d (none if d = 0) */
    __m256 prev;        /* the previous vector, rotated */
} fn_row_stream;

/* 0 when the row has no whole line to stream (then store it plainly) */
static inline int fn_row_stream_init(fn_row_stream* s, float* y, ptrdiff_t n) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    if ((size_t)y & 3) return 0;
    s->y = y;
    s->d = (ptrdiff_t)((-(size_t)y & 31) / 4);
    s->p0 = (ptrdiff_t)((-(size_t)y & 63) / 4);
    if (n - s->p0 < 16) return 0;
    s->p1 = s->p0 + (n - s->p0) / 16 * 16;
    s->shift = s->d ? s->d - 8 : 0;
    s->body_from = s->p0 - s->shift;
    s->body_to = s->p1 - s->d;
    s->rot = _mm256_and_si256(_mm256_add_epi32(lanes, _mm256_set1_epi32((int)s->d)),
                              _mm256_set1_epi32(7));
    s->from_prev = _mm256_castsi256_ps(
        s->d ? _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(8 - s->d)), lanes)
             : _mm256_setzero_si256());
    s->prev = _mm256_setzero_ps();
    return 1;
}

/* y[i, i + m) = the first m lanes of v */
static inline void fn_row_stream_put(fn_row_stream* s, ptrdiff_t i, __m256 v, ptrdiff_t m) {
    __m256 r = _mm256_permutevar8x32_ps(v, s->rot);
    ptrdiff_t q = i + s->shift;                  /* the aligned block [q, q + 8) now complete */
    if (q >= s->p0 && q + 8 <= s->p1)
        _mm256_stream_ps(s->y + q, _mm256_blendv_ps(r, s->prev, s->from_prev));
    s->prev = r;
    if (i < s->p0 || i + 8 > s->p1) {            /* lanes outside the streamed lines */
        const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        __m256i pos = _mm256_add_epi32(lanes, _mm256_set1_epi32((int)i));
        __m256i outside = _mm256_or_si256(
            _mm256_cmpgt_epi32(_mm256_set1_epi32((int)s->p0), pos),
            _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)s->p1), pos),
                                _mm256_set1_epi32(-1)));
        __m256i mask = _mm256_and_si256(outside,
                                        _mm256_cmpgt_epi32(_mm256_set1_epi32((int)m), lanes));
        _mm256_maskstore_ps(s->y + i, mask, v);
    }
}
#endif

/* FN_AFFINE_OUT_STREAMED: with stream, y's whole 64-byte lines written with non-temporal
 * stores, two vectors per line; the values before y's first line boundary use the scalar
 * formula, and the loops after it finish the row's last partial line plainly. So no line
 * takes both kinds of store, whatever y's alignment: a line shared with the neighbouring
 * run is partial, so plain, in both. (Peeled only to a 32-byte boundary, half-lines were
 * streamed next to plain ones: into a numpy out= 16 bytes off a line, the runs were kept
 * plain, and LayerNorm (8,512,768) forward ran 1.36x slower at 1 thread, 1.49x at 2,
 * than with this peel; see STREAM_SPLIT_RUN_BYTES.) (Kept in this shape: every variant with
 * 16-byte streams and a streamed half-vector tail, inline or out of line, made LayerNorm
 * (8,512,768) forward, unstreamed, run 1.2-1.6 ms instead of 0.9-1.0 ms into out= at 1
 * thread, medians of 300 calls over six bisected builds, the same instruction count.) */
#if FN_HAVE_STREAM
#define FN_AFFINE_OUT_STREAMED(VT, LANES, SET1, LOADU, SUB, MUL, FMADD, STREAM)                     \
    if (stream) {                                                                                   \
        for (; i < n && ((size_t)(y + i) & 63); i++)                                                \
            y[i] = w ? ((x[i] - mean_hi) - mean_lo) * scale * w[i] + b[i]                           \
                     : ((x[i] - mean_hi) - mean_lo) * scale + shift;                                \
        VT hi = SET1(mean_hi), lo = SET1(mean_lo), sc = SET1(scale), sh = SET1(shift);              \
        for (; i + 2 * LANES <= n; i += 2 * LANES) {                                                \
            VT d0 = SUB(SUB(LOADU(x + i), hi), lo), d1 = SUB(SUB(LOADU(x + i + LANES), hi), lo);    \
            STREAM(y + i, w ? FMADD(MUL(d0, sc), LOADU(w + i), LOADU(b + i)) : FMADD(d0, sc, sh));  \
            STREAM(y + i + LANES, w ? FMADD(MUL(d1, sc), LOADU(w + i + LANES), LOADU(b + i + LANES))\
                                    : FMADD(d1, sc, sh));                                           \
        }                                                                                           \
    }
#else
#define FN_AFFINE_OUT_STREAMED(VT, LANES, SET1, LOADU, SUB, MUL, FMADD, STREAM) (void)stream;
#endif
/* The per-element path (LayerNorm/RMSNorm rows): for rows of FN_AFFINE_SHORT_MAX values or
 * fewer (QK-norm heads), two vectors of the vector extensions per step; gcc's `omp simd`
 * loop, inlined into forward_row, kept its pointers and bound on the stack there (12
 * instructions per 8 floats). Same fmas, same bits. EV: the extension's 32-byte vector of
 * T, EL lanes. Interleaved A/B, 1 thread: the explicit loop made LayerNorm (4,16,1024,64)
 * forward 1.5x faster (2.66-2.78 -> 1.76-1.84 ms) but (8,512,768) 1.2x slower (0.93-0.96
 * -> 1.11-1.18 ms, though 2.76 -> 2.35 instructions per value), with or without a scalar
 * peel to y's 32-byte boundary and with -falign-loops=64; longer rows keep omp simd. */
#define FN_AFFINE_SHORT_MAX 127
#define FN_DEFINE_AFFINE_OUT(T, SUFFIX, VT, LANES, SET1, LOADU, SUB, MUL, FMADD, STREAM, EV, EL)    \
    static inline void fn_affine_out_##SUFFIX(const T* restrict x, T* restrict y,                    \
                                             const T* restrict w, const T* restrict b,              \
                                             ptrdiff_t n, T mean_hi, T mean_lo, T scale,            \
                                             T shift, int stream) {                                 \
        ptrdiff_t i = 0;                                                                            \
        FN_AFFINE_OUT_STREAMED(VT, LANES, SET1, LOADU, SUB, MUL, FMADD, STREAM)                     \
        if (w) {                                                                                    \
            if (n > FN_AFFINE_SHORT_MAX) {                                                          \
                _Pragma("omp simd")                                                                 \
                for (ptrdiff_t j = i; j < n; j++)                                                   \
                    y[j] = ((x[j] - mean_hi) - mean_lo) * scale * w[j] + b[j];                      \
                return;                                                                             \
            }                                                                                       \
            for (; i + 2 * EL <= n; i += 2 * EL) {                                                  \
                EV y0 = ((fn_row_load_##SUFFIX(x + i) - mean_hi) - mean_lo) * scale                 \
                        * fn_row_load_##SUFFIX(w + i) + fn_row_load_##SUFFIX(b + i);                \
                EV y1 = ((fn_row_load_##SUFFIX(x + i + EL) - mean_hi) - mean_lo) * scale            \
                        * fn_row_load_##SUFFIX(w + i + EL) + fn_row_load_##SUFFIX(b + i + EL);      \
                memcpy(y + i, &y0, sizeof y0);                                                      \
                memcpy(y + i + EL, &y1, sizeof y1);                                                 \
            }                                                                                       \
            for (ptrdiff_t j = i; j < n; j++)                                                       \
                y[j] = ((x[j] - mean_hi) - mean_lo) * scale * w[j] + b[j];                          \
        } else {                                                                                    \
            _Pragma("omp simd")                                                                     \
            for (ptrdiff_t j = i; j < n; j++) y[j] = ((x[j] - mean_hi) - mean_lo) * scale + shift;  \
        }                                                                                           \
    }
FN_DEFINE_AFFINE_OUT(float, f32, __m256, 8, _mm256_set1_ps, _mm256_loadu_ps, _mm256_sub_ps,
                     _mm256_mul_ps, _mm256_fmadd_ps, _mm256_stream_ps, fn_v8f, 8)
FN_DEFINE_AFFINE_OUT(double, f64, __m256d, 4, _mm256_set1_pd, _mm256_loadu_pd, _mm256_sub_pd,
                     _mm256_mul_pd, _mm256_fmadd_pd, _mm256_stream_pd, fn_v4d, 4)
#undef FN_DEFINE_AFFINE_OUT
#undef FN_AFFINE_OUT_STREAMED


/* One run of a backward pass with scalar coefficients (GroupNorm/InstanceNorm rows
 * per channel, BatchNorm runs): dx = k_dy * dy + (k_x * ((x - mean_hi) - mean_lo) + k_0).
 * stream != 0 writes a streamable dx (fn_row_streamable) with non-temporal stores
 * (AVX2 builds), the same fmas as the loop: the choice never changes a result. The
 * callers stream dx of STREAM_BYTES and more: it would not stay in cache, and the
 * stores skip reading every dx line first.
 * GroupNorm (8,128,64,64) backward at 1 thread: 2.5-3.5 -> 1.6-2.1 ms. dx may be dy (a
 * fused activation's g is kept in dx): no restrict there, each dy[i] is read before
 * dx[i] is written. */
#define FN_AFFINE_BACKWARD_FORMULA(i) (k_dy * dy[i] + (k_x * ((x[i] - mean_hi) - mean_lo) + k_0))
#if FN_HAVE_STREAM
#define FN_AFFINE_BACKWARD_STREAMED(T, SUFFIX, VT, LANES, SET1, LOADU, SUB, FMADD, CASTI)      \
    if (stream && fn_row_streamable(dx, n, sizeof(T))) {                                     \
        VT hi = SET1(mean_hi), lo = SET1(mean_lo), a = SET1(k_dy), c = SET1(k_x), z = SET1(k_0); \
        for (; i + LANES <= n; i += LANES) {                                                 \
            VT d = SUB(SUB(LOADU(x + i), hi), lo);                                           \
            fn_stream32(dx + i, CASTI(FMADD(a, LOADU(dy + i), FMADD(c, d, z))));             \
        }                                                                                    \
        if (i < n) {                                                                         \
            FN_STREAM_TAIL_##SUFFIX(dx + i, FN_AFFINE_BACKWARD_FORMULA, i);                  \
            i = n;                                                                           \
        }                                                                                    \
    }
#else
#define FN_AFFINE_BACKWARD_STREAMED(T, SUFFIX, VT, LANES, SET1, LOADU, SUB, FMADD, CASTI) (void)stream;
#endif
#define FN_DEFINE_AFFINE_BACKWARD(T, SUFFIX, VT, LANES, SET1, LOADU, SUB, FMADD, CASTI)       \
    static inline void fn_affine_backward_##SUFFIX(const T* restrict x, const T* dy, T* dx,   \
                                                   ptrdiff_t n, T mean_hi,                    \
                                                   T mean_lo, T k_dy, T k_x, T k_0,           \
                                                   int stream) {                              \
        ptrdiff_t i = 0;                                                                     \
        FN_AFFINE_BACKWARD_STREAMED(T, SUFFIX, VT, LANES, SET1, LOADU, SUB, FMADD, CASTI)    \
        _Pragma("omp simd")                                                                  \
        for (ptrdiff_t j = i; j < n; j++) dx[j] = FN_AFFINE_BACKWARD_FORMULA(j);             \
    }
FN_DEFINE_AFFINE_BACKWARD(float, f32, __m256, 8, _mm256_set1_ps, _mm256_loadu_ps, _mm256_sub_ps,
                          _mm256_fmadd_ps, _mm256_castps_si256)
FN_DEFINE_AFFINE_BACKWARD(double, f64, __m256d, 4, _mm256_set1_pd, _mm256_loadu_pd,
                          _mm256_sub_pd, _mm256_fmadd_pd, _mm256_castpd_si256)
#undef FN_DEFINE_AFFINE_BACKWARD
#undef FN_AFFINE_BACKWARD_STREAMED
#undef FN_AFFINE_BACKWARD_FORMULA

/* Channels-last rows written with non-temporal stores (AVX2 builds), for outputs much
 * larger than the caches (STREAM_BYTES): 16-byte stores over whole streamable rows
 * (fn_row_streamable). The arithmetic is the plain loops' own, fma for fma
 * (test_batchnorm.py pins the bits); the caller fences once per thread after its last
 * row. */
#if FN_HAVE_STREAM
/* W: 32-byte vector ops, H: 16-byte ones; HALF(v, i): 16-byte half i of v */
#define FN_DEFINE_STREAMED_ROWS(T, SUFFIX, WL, HL, LOADW, LOADH, ADDW, ADDH, SUBW, SUBH,     \
                                MULW, MULH, FMAW, FMAH, HALF, STREAMH)                      \
    static inline void fn_affine_row_streamed_##SUFFIX(const T* restrict x, T* restrict y,  \
                                                       ptrdiff_t n, const T* restrict hi,   \
                                                       const T* restrict scale,             \
                                                       const T* restrict shift) {           \
        ptrdiff_t c = 0;                                                                    \
        for (; c + WL <= n; c += WL) {                                                      \
            __typeof__(LOADW(x)) v = hi ? SUBW(LOADW(x + c), LOADW(hi + c)) : LOADW(x + c); \
            v = FMAW(v, LOADW(scale + c), LOADW(shift + c));                                \
            STREAMH(y + c, HALF(v, 0));                                                     \
            STREAMH(y + c + HL, HALF(v, 1));                                                \
        }                                                                                   \
        for (; c < n; c += HL) {                                                            \
            __typeof__(LOADH(x)) v = hi ? SUBH(LOADH(x + c), LOADH(hi + c)) : LOADH(x + c); \
            STREAMH(y + c, FMAH(v, LOADH(scale + c), LOADH(shift + c)));                    \
        }                                                                                   \
    }                                                                                       \
    /* dx = fma(k_dy, dy, k_x * (x - hi)) + k_0: gcc's contraction of the plain loop */     \
    static inline void fn_backward_row_streamed_##SUFFIX(const T* restrict x, const T* dy,  \
                                                         T* dx, ptrdiff_t n,                \
                                                         const T* restrict hi,              \
                                                         const T* restrict k_dy,            \
                                                         const T* restrict k_x,             \
                                                         const T* restrict k_0) {           \
        ptrdiff_t c = 0;                                                                    \
        for (; c + WL <= n; c += WL) {                                                      \
            __typeof__(LOADW(x)) v = ADDW(FMAW(LOADW(k_dy + c), LOADW(dy + c),              \
                                               MULW(SUBW(LOADW(x + c), LOADW(hi + c)),      \
                                                    LOADW(k_x + c))),                       \
                                          LOADW(k_0 + c));                                  \
            STREAMH(dx + c, HALF(v, 0));                                                    \
            STREAMH(dx + c + HL, HALF(v, 1));                                               \
        }                                                                                   \
        for (; c < n; c += HL)                                                              \
            STREAMH(dx + c, ADDH(FMAH(LOADH(k_dy + c), LOADH(dy + c),                       \
                                      MULH(SUBH(LOADH(x + c), LOADH(hi + c)),               \
                                           LOADH(k_x + c))),                                \
                                 LOADH(k_0 + c)));                                          \
    }
FN_DEFINE_STREAMED_ROWS(float, f32, 8, 4, _mm256_loadu_ps, _mm_loadu_ps, _mm256_add_ps,
                        _mm_add_ps, _mm256_sub_ps, _mm_sub_ps, _mm256_mul_ps, _mm_mul_ps,
                        _mm256_fmadd_ps, _mm_fmadd_ps, _mm256_extractf128_ps, _mm_stream_ps)
FN_DEFINE_STREAMED_ROWS(double, f64, 4, 2, _mm256_loadu_pd, _mm_loadu_pd, _mm256_add_pd,
                        _mm_add_pd, _mm256_sub_pd, _mm_sub_pd, _mm256_mul_pd, _mm_mul_pd,
                        _mm256_fmadd_pd, _mm_fmadd_pd, _mm256_extractf128_pd, _mm_stream_pd)
#undef FN_DEFINE_STREAMED_ROWS
/* With stream, a streamable row goes to fn_KIND_row_streamed_SUFFIX(...), then `done` */
#define FN_ROW_STREAMED(done, SUFFIX, KIND, y, n, ...)                                      \
    if (stream && fn_row_streamable((y), (n), sizeof *(y))) {                               \
        fn_##KIND##_row_streamed_##SUFFIX(__VA_ARGS__);                                     \
        done;                                                                               \
    }
#else
#define FN_ROW_STREAMED(done, SUFFIX, KIND, y, n, ...) (void)stream;
#endif

/* Channels-last rows of n channels, parameters per channel:
 *   y[c] = (x[c] - mean_hi[c]) * scale[c] + shift[c],  or  x[c] * scale[c] + shift[c]
 * when mean_hi is NULL. The callers fold the rest into shift (affine_coefficients in
 * _common.pxd): one fma and at most three parameter loads per value, as a plain
 * scale-and-shift has. stream: non-temporal stores (see above). */
#define FN_DEFINE_CHANNELS_AFFINE(T, SUFFIX)                                                \
    /* rows whole rows of n channels, one after the other (or one row's channel range) */   \
    static inline void fn_channels_affine_##SUFFIX(const T* restrict x, T* restrict y,      \
                                                   ptrdiff_t rows, ptrdiff_t n,             \
                                                   const T* restrict mean_hi,               \
                                                   const T* restrict scale,                 \
                                                   const T* restrict shift, int stream) {   \
        for (ptrdiff_t r = 0; r < rows; r++, x += n, y += n) {                              \
            FN_ROW_STREAMED(continue, SUFFIX, affine, y, n, x, y, n, mean_hi, scale, shift) \
            if (mean_hi) {                                                                  \
                _Pragma("omp simd")                                                         \
                for (ptrdiff_t c = 0; c < n; c++) y[c] = (x[c] - mean_hi[c]) * scale[c] + shift[c];\
            } else {                                                                        \
                _Pragma("omp simd")                                                         \
                for (ptrdiff_t c = 0; c < n; c++) y[c] = x[c] * scale[c] + shift[c];        \
            }                                                                               \
        }                                                                                   \
    }
FN_DEFINE_CHANNELS_AFFINE(float, f32)
FN_DEFINE_CHANNELS_AFFINE(double, f64)
#undef FN_DEFINE_CHANNELS_AFFINE

/* One channels-last row of a backward pass, coefficients per channel:
 *   dx[c] = k_dy[c] * dy[c] + k_x[c] * (x[c] - mean_hi[c]) + k_0[c]
 * the mean's tail folded into k_0 by the caller. dx may be dy (no restrict there:
 * each element is read before it is written). stream: non-temporal stores (see above). */
#define FN_DEFINE_CHANNELS_BACKWARD(T, SUFFIX)                                              \
    static inline void fn_channels_backward_##SUFFIX(const T* restrict x, const T* dy, T* dx, \
                                                     ptrdiff_t n, const T* restrict mean_hi, \
                                                     const T* restrict k_dy,                \
                                                     const T* restrict k_x,                 \
                                                     const T* restrict k_0, int stream) {   \
        FN_ROW_STREAMED(return, SUFFIX, backward, dx, n, x, dy, dx, n, mean_hi, k_dy, k_x, k_0)\
        _Pragma("omp simd")                                                                 \
        for (ptrdiff_t c = 0; c < n; c++)                                                   \
            dx[c] = k_dy[c] * dy[c] + k_x[c] * (x[c] - mean_hi[c]) + k_0[c];                \
    }
FN_DEFINE_CHANNELS_BACKWARD(float, f32)
FN_DEFINE_CHANNELS_BACKWARD(double, f64)
#undef FN_DEFINE_CHANNELS_BACKWARD
#undef FN_ROW_STREAMED

/* Backward of a row group (LayerNorm/RMSNorm rows, a parameter per element): rows of
 * the group are dx'ed together, column step by column step, so that the weight/bias
 * gradient partials of a column stay in registers over the group's rows and go into
 * float64 once, at the group's end. Row by row (the partials loaded, added to and stored
 * for every row, then flushed in a loop of their own) that took 2.5 instructions per
 * value at 768 values, now 2.2 (callgrind; the whole backward 4.7 -> 4.0, rows of 64
 * 8.4 -> 6.7). Two vectors of columns per step: at four, gcc spilled the weights.
 * FN_ROW_GROUP: rows whose partials are summed in the working precision (at most 8
 * terms per partial, so float32 loses almost nothing) before they go into float64. */
#define FN_ROW_GROUP 8
#define FN_GROUP_STEP 2          /* vectors of columns per step: one 64-byte line of float or double */
/* the 32 bytes of a vector-extension vector v to 32-byte aligned p, non-temporal */
#if FN_HAVE_STREAM
#define fn_stream_vec_f32(p, v) _mm256_stream_ps((p), (__m256)(v))
#define fn_stream_vec_f64(p, v) _mm256_stream_pd((p), (__m256d)(v))
#else
#define fn_stream_vec_f32(p, v) memcpy((p), &(v), sizeof(v))
#define fn_stream_vec_f64(p, v) memcpy((p), &(v), sizeof(v))
#endif
/* acc[0 .. lanes of v) += v, widened to float64 */
#define fn_flush_vec_f32(acc, v) do {                                                       \
    fn_v4d lo_, hi_, wl_, wh_;                                                              \
    memcpy(&lo_, (acc), sizeof lo_);                                                        \
    memcpy(&hi_, (acc) + 4, sizeof hi_);                                                    \
    fn_widen_halves_f32(v, wl_, wh_);                                                       \
    lo_ += wl_;                                                                             \
    hi_ += wh_;                                                                             \
    memcpy((acc), &lo_, sizeof lo_);                                                        \
    memcpy((acc) + 4, &hi_, sizeof hi_); } while (0)
#define fn_flush_vec_f64(acc, v) do {                                                       \
    fn_v4d a_;                                                                              \
    memcpy(&a_, (acc), sizeof a_);                                                          \
    a_ += (v);                                                                              \
    memcpy((acc), &a_, sizeof a_); } while (0)
/* The dx pass of a row group (or row) reads its x and g again from L2 and leaves memory
 * idle meanwhile: it prefetches the next rows' x and g (contiguous right after its own
 * when rows are whole, stride == n) into L2, `lines` lines of each per step, so that they
 * arrive over the pass. Only for a dx written with non-temporal stores (nt: a streamed
 * dx, arrays beyond the caches, whole-line rows; in-cache 4 MiB arrays ran 0.91-0.95x with
 * it, and rows of 700-2100 floats that are not whole lines, dx stored plainly, 0.80-0.95x),
 * rows of FN_AHEAD_ROW_BYTES and more (shorter ones are short rows or dx'ed one by one
 * from L1: rows of 384-512 floats ran 1.00x with it) and of one unit (stride == n).
 * LayerNorm backward, 1 thread, 12-32 MiB arrays, x/dy/dx at four page offsets: rows of
 * 768 floats 0.89-1.27x (geomeans 1.06-1.16x; 2 threads 0.95-1.16x), 1024-2048
 * 1.05-1.17x, 1536 1.13-1.25x, 4096 (one by one) 1.18-1.29x. Hint 2 (L2): into L1
 * (hint 3) they ran 1.01-1.10x slower than that. */
#define FN_AHEAD_ROW_BYTES 2048
static inline __attribute__((always_inline)) void fn_group_ahead(const char* x, const char* g,
                                                                 ptrdiff_t at, ptrdiff_t lines) {
    for (ptrdiff_t i = 0; i < lines; i++) {
        __builtin_prefetch(x + at + 64 * i, 0, 2);
        __builtin_prefetch(g + at + 64 * i, 0, 2);
    }
}
/* fn_group_backward's whole steps of columns from c on, for ROWS rows (prefetching ahead)
 * and NT (non-temporal dx) */
#define FN_GROUP_COLUMNS(SUFFIX, VT, NL, ROWS, NT) do {                                         \
    for (; c + FN_GROUP_STEP * NL <= n; c += FN_GROUP_STEP * NL) {                               \
        if (ahead) fn_group_ahead(next_x, next_g, c * (ptrdiff_t)sizeof(*x) * (ROWS), ROWS);    \
        fn_group_step_##SUFFIX(x, g, w, dx, ROWS, stride, c, FN_GROUP_STEP, (const VT (*)[5])k, \
                               part, acc, at, NT);                                               \
    } } while (0)
#define FN_DEFINE_ROWS_BACKWARD(T, SUFFIX, VT, NL)                                              \
    /* Columns [c, c + u * NL) of the group's rows: dx = (w * g + c_0) * k_g + k_d * d         \
       (c_0 = -mean(w*g) first, so that it cancels before the large factor k_g = rstd           \
       multiplies), partials aw += g * d * k_g, ab += g, from part (NULL: from zero) into     \
       part and/or acc (see fn_group_backward). Per row the coefficients hi, lo, k_g, c_0,     \
       k_d (vectors of one value). nt: dx written with non-temporal stores (32-byte aligned). */\
    static inline __attribute__((always_inline)) void fn_group_step_##SUFFIX(                 \
        const T* restrict x, const T* g, const T* restrict w, T* dx, ptrdiff_t nrows,         \
        ptrdiff_t stride, ptrdiff_t c, const int u, const VT (*coef)[5], T* restrict part,    \
        double* restrict acc, ptrdiff_t at, const int nt) {                                   \
        VT aw[FN_GROUP_STEP], ab[FN_GROUP_STEP];                                              \
        _Pragma("GCC unroll 4")                                                               \
        for (int k = 0; k < u; k++) {                                                         \
            aw[k] = ab[k] = (VT){0};                                                          \
            if (part) {                                                                       \
                aw[k] = fn_row_load_##SUFFIX(part + c + k * NL);                              \
                ab[k] = fn_row_load_##SUFFIX(part + at + c + k * NL);                         \
            }                                                                                 \
        }                                                                                     \
        for (ptrdiff_t r = 0; r < nrows; r++) {                                               \
            const T* xr = x + r * stride + c;                                                 \
            const T* gr = g + r * stride + c;                                                 \
            T* dr = dx + r * stride + c;                                                      \
            _Pragma("GCC unroll 4")                                                           \
            for (int k = 0; k < u; k++) {                                                     \
                VT gi = fn_row_load_##SUFFIX(gr + k * NL);                                    \
                VT d = (fn_row_load_##SUFFIX(xr + k * NL) - coef[r][0]) - coef[r][1];         \
                VT out = (fn_row_load_##SUFFIX(w + c + k * NL) * gi + coef[r][3]) * coef[r][2] \
                         + coef[r][4] * d;                                                    \
                if (nt)                                                                       \
                    fn_stream_vec_##SUFFIX(dr + k * NL, out);                                 \
                else                                                                          \
                    memcpy(dr + k * NL, &out, sizeof out);                                    \
                aw[k] += gi * (d * coef[r][2]);                                               \
                ab[k] += gi;                                                                  \
            }                                                                                 \
        }                                                                                     \
        _Pragma("GCC unroll 4")                                                               \
        for (int k = 0; k < u; k++) {                                                         \
            if (acc) {                                                                        \
                fn_flush_vec_##SUFFIX(acc + c + k * NL, aw[k]);                               \
                fn_flush_vec_##SUFFIX(acc + at + c + k * NL, ab[k]);                          \
                aw[k] = ab[k] = (VT){0};                                                      \
            }                                                                                 \
            if (part) {                                                                       \
                memcpy(part + c + k * NL, &aw[k], sizeof aw[k]);                              \
                memcpy(part + at + c + k * NL, &ab[k], sizeof ab[k]);                         \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
    /* Columns [c0, c1) of the group's rows, written plainly: vector by vector, then one by   \
       one (fn_group_step's arithmetic). */                                                  \
    static inline __attribute__((always_inline)) void fn_group_plain_##SUFFIX(                \
        const T* restrict x, const T* g, const T* restrict w, T* dx, ptrdiff_t nrows,         \
        ptrdiff_t stride, ptrdiff_t c0, ptrdiff_t c1, const VT (*k)[5], T* restrict part,     \
        double* restrict acc, ptrdiff_t at) {                                                 \
        for (; c0 + NL <= c1; c0 += NL)                                                       \
            fn_group_step_##SUFFIX(x, g, w, dx, nrows, stride, c0, 1, k, part, acc, at, 0);   \
        for (ptrdiff_t c = c0; c < c1; c++) {                                                 \
            T aw = part ? part[c] : 0, ab = part ? part[at + c] : 0;                          \
            for (ptrdiff_t r = 0; r < nrows; r++) {                                           \
                T gi = g[r * stride + c];                                                     \
                T d = (x[r * stride + c] - k[r][0][0]) - k[r][1][0];                          \
                dx[r * stride + c] = (w[c] * gi + k[r][3][0]) * k[r][2][0] + k[r][4][0] * d;  \
                aw += gi * (d * k[r][2][0]);                                                  \
                ab += gi;                                                                     \
            }                                                                                 \
            if (acc) {                                                                        \
                acc[c] += (double)aw;                                                         \
                acc[at + c] += (double)ab;                                                    \
                aw = ab = 0;                                                                  \
            }                                                                                 \
            if (part) {                                                                       \
                part[c] = aw;                                                                 \
                part[at + c] = ab;                                                            \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
    /* dx of nrows <= FN_ROW_GROUP rows of a row group (n values each, stride apart) and      \
       their weight/bias partials in working precision: weight ones at [0, n), bias ones at   \
       [at, at + n) of part and acc. part: the partials of the group's earlier rows, updated  \
       (NULL: the rows are the whole group); acc (not NULL: the rows end the group): the      \
       partials then go into these float64 totals (and part is zeroed). Per row r the mean    \
       (NULL: 0), rstd and coef[2r:2r+2] = (k_d, c_0) of fn_row_backward_coefficients. g may   \
       be dx itself (a fused activation's g = dy * act'(z) is kept there): both lack          \
       restrict, each g value is read before its dx is written. stream: dx's whole lines      \
       written with non-temporal stores (see STREAM_DX_BYTES in _common.pxd); the caller      \
       fences once per thread (a fence per group of 64-value rows cost more than the          \
       streaming saved). */                                                                  \
    FN_SHARED void fn_group_backward_##SUFFIX(const T* restrict x, const T* g,                \
                                              const T* restrict w, T* dx, ptrdiff_t nrows,   \
                                              ptrdiff_t stride, ptrdiff_t n,                 \
                                              const double* mean, const double* rstd,        \
                                              const double* coef, T* part, double* acc,      \
                                              ptrdiff_t at, int stream) {                    \
        VT k[FN_ROW_GROUP][5];                       /* hi, lo, k_g, c_0, k_d per row */     \
        const VT zero = {0};                                                                 \
        for (ptrdiff_t r = 0; r < nrows; r++) {                                              \
            double m = mean ? mean[r] : 0.0;                                                 \
            T hi = (T)m;                                                                     \
            k[r][0] = hi - zero;                     /* x - 0 = x: a broadcast */            \
            k[r][1] = (T)(m - (double)hi) - zero;                                            \
            k[r][2] = (T)rstd[r] - zero;                                                     \
            k[r][3] = (T)coef[2 * r + 1] - zero;                                             \
            k[r][4] = (T)coef[2 * r] - zero;                                                 \
        }                                                                                    \
        /* stream: dx's whole 64-byte lines are written non-temporally, the rest (the      \
           columns before the first line of the first row, after the last, and every row   \
           when rows are not whole lines apart) plainly, so that no line mixes the two */   \
        ptrdiff_t c = 0, peel = 0;                                                           \
        const int nt = FN_HAVE_STREAM && stream && (stride * sizeof(T)) % 64 == 0            \
                       && (size_t)dx % sizeof(T) == 0;                                       \
        if (nt) {                                                                            \
            peel = (ptrdiff_t)((64 - (size_t)dx % 64) % 64 / sizeof(T));                     \
            if (peel > n) peel = n;                                                          \
            fn_group_plain_##SUFFIX(x, g, w, dx, nrows, stride, 0, peel, (const VT (*)[5])k, \
                                    part, acc, at);                                          \
            c = peel;                                                                        \
        }                                                                                    \
        const int ahead = nt && stride == n && n * (ptrdiff_t)sizeof(T) >= FN_AHEAD_ROW_BYTES;     \
        const char* next_x = (const char*)(x + nrows * stride);                             \
        const char* next_g = (const char*)(g + nrows * stride);                             \
        /* nt, and a single row (the one-by-one routes), constants in their own loops */     \
        if (nrows == 1 && nt)                                                                \
            FN_GROUP_COLUMNS(SUFFIX, VT, NL, 1, 1);                                          \
        else if (nrows == 1)                                                                 \
            FN_GROUP_COLUMNS(SUFFIX, VT, NL, 1, 0);                                          \
        else if (nt)                                                                         \
            FN_GROUP_COLUMNS(SUFFIX, VT, NL, nrows, 1);                                      \
        else                                                                                 \
            FN_GROUP_COLUMNS(SUFFIX, VT, NL, nrows, 0);                                      \
        fn_group_plain_##SUFFIX(x, g, w, dx, nrows, stride, c, n, (const VT (*)[5])k, part,  \
                                acc, at);                                                    \
    }
FN_DEFINE_ROWS_BACKWARD(float, f32, fn_v8f, 8)
FN_DEFINE_ROWS_BACKWARD(double, f64, fn_v4d, 4)
#undef FN_DEFINE_ROWS_BACKWARD
#undef FN_GROUP_COLUMNS

/* A normalized row's statistics from its moments (count values): the biased variance
 * and rstd = 1 / sqrt(var + eps), stored through rstd and, unless NULL, mean and var. */
static inline void fn_store_row_stats(double row_mean, double m2, double count, double eps,
                                      double* mean, double* rstd, double* var) {
    double v = m2 / count;
    if (v < 0) v = 0;
    *rstd = 1.0 / sqrt(v + eps);
    if (mean) *mean = row_mean;
    if (var) *var = v;
}

/* A row's backward coefficients from its gradient sums sum_g = sum(g), sum_gd =
 * sum(g * (x - mean)) over n values: dx = rstd * (g + c_0) + k_d * (x - mean), with
 * k_d = -rstd^3 * sum_gd / n and c_0 = -sum_g / n (0 when not centered: RMSNorm). */
static inline void fn_row_backward_coefficients(double rstd, double sum_g, double sum_gd,
                                                double n, int centered, double* k_d,
                                                double* c_0) {
    *k_d = -rstd * rstd * rstd * sum_gd / n;
    *c_0 = centered ? -sum_g / n : 0.0;
}



/* the cache lines of bytes from p, to be read or (write) written */
static inline void fn_prefetch_lines(const void* p, ptrdiff_t bytes, int write) {
    for (ptrdiff_t i = 0; i < bytes; i += 64) {
        if (write)
            __builtin_prefetch((const char*)p + i, 1, 3);
        else
            __builtin_prefetch((const char*)p + i, 0, 3);
    }
}

/* the cache lines of bytes from p, into L2 only (prefetcht2): data for later, which
 * must not push the current work out of L1 */
static inline void fn_prefetch_lines_l2(const void* p, ptrdiff_t bytes) {
    for (ptrdiff_t i = 0; i < bytes; i += 64) __builtin_prefetch((const char*)p + i, 0, 1);
}

/* Column kernels: `nrows` rows of `nc` contiguous channels, rows `stride`
 * values apart (channels-last data), one result per channel.
 *
 * The loops run along the rows, as the data lies in memory: walking down
 * columns a few vectors wide defeats the hardware prefetchers (channels-last
 * statistics ran at ~8 GB/s that way, ~21 GB/s like this). Each channel has
 * its own working-precision accumulator in a stack array, so the compiler
 * vectorizes the channel loop without reordering any sum: the result is the
 * same for every vector width. When the block is whole rows (nc == stride),
 * a "lane" spans P consecutive rows, P = FN_COLUMN_LANES / nc, so that narrow
 * rows (a few channels) still give long vectorizable loops and independent
 * accumulators; the P partial sums of a channel are folded in order.
 * Callers pass at most FN_COLUMN_ROWS rows and FN_COLUMN_BLOCK channels, so an
 * accumulator sums at most FN_COLUMN_ROWS terms before it is handed over in
 * float64.
 */
#define FN_COLUMN_ROWS 32
#define FN_COLUMN_BLOCK 1024
#define FN_COLUMN_LANES 128
/* Bytes of columns fn_cols_shifted_sums keeps in registers while it walks down the rows:
 * four vectors of sums, squares and shifts (AVX), two without. Walking row by row
 * instead, each value takes a load and two stores of its column's sums; walking down
 * tiles the prefetchers lose the stream, so each tile also prefetches the same rows'
 * lines one call ahead (a column walk without it ran at 9-10 GB/s). Same sums in the
 * same order: same bits. Only for lanes of FN_COLUMN_TILED_MIN_BYTES and more, rows not
 * a whole number of pages apart. Alone, cold, 1 thread, 25 MiB: 256 channels 1.76-1.80
 * -> 1.23-1.43 ms (a plain read of the array: 0.9-1.2 ms). In channels-last GroupNorm's
 * forward (4 runs, both orders): 256 channels 1.07-1.15x faster (2 threads 1.07x), 512
 * 1.06x; 64 and 128 channels 0.99x (shorter lanes: left row by row); 1024 channels 0.90-
 * 0.97x (rows 4 KiB apart, whose tiles all fall in the same L1 sets: left row by row). */
#define FN_COLUMN_TILED_MIN_BYTES 1024
#if defined(__AVX__)
#define FN_COLUMN_TILE 128
#else
#define FN_COLUMN_TILE 64
#endif
/* Per-channel arrays lie this many values apart in one stack buffer: not a
 * multiple of 4 KiB, whose aliasing (a load taken to depend on a store to
 * another array at the same address modulo 4 KiB) halved the speed. */
#define FN_COLUMN_STRIDE (FN_COLUMN_BLOCK + 24)

/* rows per lane: P consecutive whole rows form one lane of P * nc values */
static inline ptrdiff_t fn_column_rows_per_lane(ptrdiff_t nc, ptrdiff_t stride) {
    return nc == stride && nc < FN_COLUMN_LANES ? FN_COLUMN_LANES / nc : 1;
}

/* s1[c] += a's and s2[c] += b's working-precision partials of channel c, lane by lane
 * in order (lanes of nc channels side by side, see fn_column_rows_per_lane) */
#define FN_FOLD_LANES(per_lane, nc, a, b, s1, s2)                                        \
    for (ptrdiff_t p_ = 0; p_ < (per_lane); p_++)                                        \
        for (ptrdiff_t c_ = 0; c_ < (nc); c_++) {                                        \
            (s1)[c_] += (double)(a)[p_ * (nc) + c_];                                     \
            (s2)[c_] += (double)(b)[p_ * (nc) + c_];                                     \
        }

/* The body of fn_cols_grad_sums (x, g, nrows, stride, nc, mean_hi, mean_lo, sum_g, sum_gd
 * in scope), with BEFORE_ROWS(r, rows) run before rows [r, r + rows) are summed: a fused
 * activation forms those rows of g there (fn_cols_act_grad_sums in _activations.h), so
 * that the loads of each group overlap the arithmetic of the last. */
#define FN_NO_ROWS_HOOK(r, rows)
#define FN_COLS_GRAD_SUMS_BODY(T, BEFORE_ROWS)                                           \
    do {                                                                                 \
        const ptrdiff_t per_lane = fn_column_rows_per_lane(nc, stride), width = per_lane * nc; \
        T acc[4 * FN_COLUMN_STRIDE];                                                      \
        T *hi = acc, *lo = acc + FN_COLUMN_STRIDE;                                         \
        T *gs = acc + 2 * FN_COLUMN_STRIDE, *ps = acc + 3 * FN_COLUMN_STRIDE;             \
        for (ptrdiff_t p = 0; p < per_lane; p++)                                          \
            for (ptrdiff_t c = 0; c < nc; c++) {                                          \
                hi[p * nc + c] = mean_hi[c];                                              \
                lo[p * nc + c] = mean_lo[c];                                              \
            }                                                                             \
        for (ptrdiff_t i = 0; i < width; i++) gs[i] = ps[i] = 0;                          \
        for (ptrdiff_t r = 0; r < nrows; r += per_lane) {                                 \
            const ptrdiff_t rows_ = nrows - r < per_lane ? nrows - r : per_lane;          \
            BEFORE_ROWS(r, rows_);                                                        \
            const T* xrow = x + r * stride;                                               \
            const T* grow = g + r * stride;                                               \
            const ptrdiff_t n = rows_ * nc;                                               \
            for (ptrdiff_t i = 0; i < n; i++) {                                           \
                gs[i] += grow[i];                                                         \
                ps[i] += grow[i] * ((xrow[i] - hi[i]) - lo[i]);                           \
            }                                                                             \
        }                                                                                 \
        FN_FOLD_LANES(per_lane, nc, gs, ps, sum_g, sum_gd);                               \
    } while (0)

#define FN_DEFINE_COLUMN_KERNELS(T, SUFFIX)                                              \
    /* s1[c] += sum_r d, s2[c] += sum_r d*d with d = x[r, c] - shift[c] rounded to T.   \
     * One pass: the caller checks afterwards that the shift was close enough to the     \
     * mean (shift = NULL: zero). */                                                     \
    static inline void fn_cols_shifted_sums_##SUFFIX(const T* x, ptrdiff_t nrows,         \
                                                     ptrdiff_t stride, ptrdiff_t nc,      \
                                                     const double* shift, double* s1,     \
                                                     double* s2) {                        \
        const ptrdiff_t per_lane = fn_column_rows_per_lane(nc, stride), width = per_lane * nc; \
        T acc[3 * FN_COLUMN_STRIDE];                                                      \
        T *k = acc, *d = acc + FN_COLUMN_STRIDE, *q = acc + 2 * FN_COLUMN_STRIDE;         \
        for (ptrdiff_t p = 0; p < per_lane; p++)                                          \
            for (ptrdiff_t c = 0; c < nc; c++) k[p * nc + c] = shift ? (T)shift[c] : 0;   \
        for (ptrdiff_t i = 0; i < width; i++) d[i] = q[i] = 0;                            \
        /* tiles of FN_COLUMN_TILE bytes of columns, summed down the whole lane-rows in   \
           registers, the same rows prefetched one call ahead; then the columns left over \
           and a last partial lane-row, row by row (each column's order is the rows')  */ \
        const ptrdiff_t full = nrows / per_lane, tile = FN_COLUMN_TILE / (ptrdiff_t)sizeof(T); \
        ptrdiff_t c0 = 0;                                                                 \
        const int tiled = width * (ptrdiff_t)sizeof(T) >= FN_COLUMN_TILED_MIN_BYTES       \
                          && stride * (ptrdiff_t)sizeof(T) % 4096 != 0;                   \
        for (; tiled && c0 + tile <= width; c0 += tile) {                                 \
            T dt[FN_COLUMN_TILE / sizeof(T)], qt[FN_COLUMN_TILE / sizeof(T)];             \
            T kt[FN_COLUMN_TILE / sizeof(T)];                                             \
            for (ptrdiff_t j = 0; j < tile; j++) {                                        \
                dt[j] = d[c0 + j];                                                        \
                qt[j] = q[c0 + j];                                                        \
                kt[j] = k[c0 + j];                                                        \
            }                                                                             \
            for (ptrdiff_t l = 0; l < full; l++) {                                        \
                const T* row = x + l * per_lane * stride + c0;                            \
                fn_prefetch_lines_l2(row + nrows * stride, FN_COLUMN_TILE);               \
                _Pragma("omp simd")                                                       \
                for (ptrdiff_t j = 0; j < tile; j++) {                                    \
                    T a = row[j] - kt[j];                                                 \
                    dt[j] += a;                                                           \
                    qt[j] += a * a;                                                       \
                }                                                                         \
            }                                                                             \
            for (ptrdiff_t j = 0; j < tile; j++) {                                        \
                d[c0 + j] = dt[j];                                                        \
                q[c0 + j] = qt[j];                                                        \
            }                                                                             \
        }                                                                                 \
        for (ptrdiff_t r = 0; r < nrows; r += per_lane) {                                 \
            const T* row = x + r * stride;                                                \
            const int whole = r / per_lane < full; /* else the last, partial lane-row */ \
            const ptrdiff_t n = whole ? width : (nrows - r) * nc;                         \
            for (ptrdiff_t i = whole ? c0 : 0; i < n; i++) {                              \
                T a = row[i] - k[i];                                                      \
                d[i] += a;                                                                \
                q[i] += a * a;                                                            \
            }                                                                             \
        }                                                                                 \
        FN_FOLD_LANES(per_lane, nc, d, q, s1, s2);                                        \
    }                                                                                     \
    /* Exact per-channel moments of the rows: two passes (the rows stay in cache), the   \
     * second about the first's mean. mean[c], m2[c] = mean and sum of squared          \
     * deviations, in float64. */                                                        \
    static inline void fn_cols_moments_##SUFFIX(const T* x, ptrdiff_t nrows,              \
                                                ptrdiff_t stride, ptrdiff_t nc,           \
                                                double* mean, double* m2) {               \
        const double inv_n = 1.0 / (double)nrows; /* multiply: divisions would dominate */ \
        for (ptrdiff_t c = 0; c < nc; c++) mean[c] = m2[c] = 0;                           \
        fn_cols_shifted_sums_##SUFFIX(x, nrows, stride, nc, NULL, mean, m2);              \
        for (ptrdiff_t c = 0; c < nc; c++) {                                              \
            mean[c] = (double)(T)(mean[c] * inv_n);                                       \
            m2[c] = 0;                                                                    \
        }                                                                                 \
        double sd[FN_COLUMN_BLOCK] = {0};                                                 \
        fn_cols_shifted_sums_##SUFFIX(x, nrows, stride, nc, mean, sd, m2);                \
        for (ptrdiff_t c = 0; c < nc; c++) {                                              \
            double centered = m2[c] - sd[c] * (sd[c] * inv_n);                            \
            mean[c] += sd[c] * inv_n;                                                     \
            m2[c] = centered < 0 ? 0 : centered; /* a NaN stays (overflow) */             \
        }                                                                                 \
    }                                                                                     \
    /* sum_g[c] += sum_r g, sum_gd[c] += sum_r g*((x - mean_hi[c]) - mean_lo[c]) */        \
    static inline void fn_cols_grad_sums_##SUFFIX(const T* x, const T* g, ptrdiff_t nrows,\
                                                  ptrdiff_t stride, ptrdiff_t nc,         \
                                                  const T* mean_hi, const T* mean_lo,     \
                                                  double* sum_g, double* sum_gd) {        \
        FN_COLS_GRAD_SUMS_BODY(T, FN_NO_ROWS_HOOK);                                        \
    }

FN_DEFINE_COLUMN_KERNELS(float, f32)
FN_DEFINE_COLUMN_KERNELS(double, f64)

#undef FN_DEFINE_COLUMN_KERNELS

/* LocalResponseNorm with beta = 0.75 in float32, one row of n positions:
 *   forward:   y = x * s^-0.75
 *   backward:  dx = dy * s^-0.75,   t = dy * x * s^-1.75   (t feeds the second window)
 * where s = k + a * (suffix + prefix), the window sums being float64 (_f64)
 * or float32 (_f32), and s is rounded to float32. Two chores ride along:
 *   grow (unless NULL): first prefix += grow^2 -- the window's newest channel,
 *     read here for the first time, so that its loads overlap the arithmetic
 *     instead of stalling a loop of their own;
 *   prefetch (unless NULL): the n floats there are requested one cache line
 *     per 16 values, early enough for the next row and spread out so that the
 *     miss queues never overflow.
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
 * every vector is checked. The last partial vector is padded, so every
 * element gets the same arithmetic wherever it sits in a row. Large outputs
 * (the caller's stream) go through fn_row_stream: non-temporal stores realigned
 * in registers (earlier attempts shifted the loop to y's alignment, which left
 * the scratch loads misaligned, and were slower than plain stores). */
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

/* m values (all 8 when m >= 8; zeros after them) */
static inline __m256 fn_load8(const float* p, ptrdiff_t m) {
    if (m >= 8) return _mm256_loadu_ps(p);
    float b[8] = {0};
    for (ptrdiff_t j = 0; j < m; j++) b[j] = p[j];
    return _mm256_loadu_ps(b);
}

static inline __m256d fn_load4d(const double* p, ptrdiff_t m) {
    if (m >= 4) return _mm256_loadu_pd(p);
    double b[4] = {0};
    for (ptrdiff_t j = 0; j < m; j++) b[j] = p[j];
    return _mm256_loadu_pd(b);
}

static inline void fn_store8(float* p, __m256 v, ptrdiff_t m) {
    if (m >= 8) {
        _mm256_storeu_ps(p, v);
        return;
    }
    float b[8];
    _mm256_storeu_ps(b, v);
    for (ptrdiff_t j = 0; j < m; j++) p[j] = b[j];
}

static inline void fn_store4d(double* p, __m256d v, ptrdiff_t m) {
    if (m >= 4) {
        _mm256_storeu_pd(p, v);
        return;
    }
    double b[4];
    _mm256_storeu_pd(b, v);
    for (ptrdiff_t j = 0; j < m; j++) p[j] = b[j];
}

/* s^-0.75 (and s^-1.75 when p175) of 8 values; checked: see above */
static inline __m256 fn_pow075_8(__m256 s, int checked, __m256* p175) {
    __m256 r0 = _mm256_rsqrt_ps(s);
    __m256 e = _mm256_fnmadd_ps(_mm256_mul_ps(s, r0), r0, _mm256_set1_ps(1.0f));
    __m256 poly = _mm256_fmadd_ps(e, _mm256_set1_ps(0.375f), _mm256_set1_ps(0.5f));
    __m256 r = _mm256_fmadd_ps(_mm256_mul_ps(r0, e), poly, r0);
    __m256 out = _mm256_mul_ps(r, _mm256_sqrt_ps(r));
    if (p175) *p175 = _mm256_mul_ps(out, _mm256_mul_ps(r, r));
    if (checked) {
        __m256 bad = _mm256_or_ps(_mm256_cmp_ps(s, _mm256_set1_ps(FLT_MIN), _CMP_NGE_UQ),
                                  _mm256_cmp_ps(s, _mm256_set1_ps(FLT_MAX), _CMP_GT_OQ));
        if (_mm256_movemask_ps(bad)) {
            float sv[8], ov[8], o1[8];
            _mm256_storeu_ps(sv, s);
            _mm256_storeu_ps(ov, out);
            if (p175) _mm256_storeu_ps(o1, *p175);
            for (int j = 0; j < 8; j++) {
                if (sv[j] >= FLT_MIN && sv[j] <= FLT_MAX) continue;
                ov[j] = fn_pow075_portable(sv[j], 0);
                o1[j] = fn_pow075_portable(sv[j], 1);
            }
            out = _mm256_loadu_ps(ov);
            if (p175) *p175 = _mm256_loadu_ps(o1);
        }
    }
    return out;
}

/* The window's prefix row for the m (<= 8) positions from here, after its growth by the
 * newest channel when grow is not NULL: prefix += grow^2 (square: the forward's window of
 * x^2) or prefix += grow (the backward's window of t), stored back. */
static inline __attribute__((always_inline)) __m256 fn_lrn_grow8_f32(float* prefix,
                                                                     const float* grow,
                                                                     ptrdiff_t m, int square) {
    __m256 p = fn_load8(prefix, m);
    if (grow) {
        __m256 g = fn_load8(grow, m);
        p = square ? _mm256_fmadd_ps(g, g, p) : _mm256_add_ps(p, g);
        fn_store8(prefix, p, m);
    }
    return p;
}

/* the same in float64, lanes 0-3 in *lo and 4-7 in *hi */
static inline __attribute__((always_inline)) void fn_lrn_grow8_f64(double* prefix,
                                                                   const float* grow,
                                                                   ptrdiff_t m, int square,
                                                                   __m256d* lo, __m256d* hi) {
    __m256d plo = fn_load4d(prefix, m), phi = fn_load4d(prefix + 4, m - 4);
    if (grow) {
        __m256 g = fn_load8(grow, m);
        __m256d glo = _mm256_cvtps_pd(_mm256_castps256_ps128(g));
        __m256d ghi = _mm256_cvtps_pd(_mm256_extractf128_ps(g, 1));
        plo = square ? _mm256_fmadd_pd(glo, glo, plo) : _mm256_add_pd(plo, glo);
        phi = square ? _mm256_fmadd_pd(ghi, ghi, phi) : _mm256_add_pd(phi, ghi);
        fn_store4d(prefix, plo, m);
        fn_store4d(prefix + 4, phi, m - 4);
    }
    *lo = plo;
    *hi = phi;
}

/* prefix += grow^2, then s, for the m (<= 8) positions from here */
static inline __m256 fn_lrn_scale8_f64(const double* suffix, double* prefix, const float* grow,
                                       ptrdiff_t m, double k, double a) {
    __m256d kv = _mm256_set1_pd(k), av = _mm256_set1_pd(a), plo, phi;
    fn_lrn_grow8_f64(prefix, grow, m, 1, &plo, &phi);
    __m256d lo = _mm256_fmadd_pd(av, _mm256_add_pd(fn_load4d(suffix, m), plo), kv);
    __m256d hi = _mm256_fmadd_pd(av, _mm256_add_pd(fn_load4d(suffix + 4, m - 4), phi), kv);
    return _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
}

/* prefix += grow (unless NULL), then the window sum suffix + prefix rounded to float, for
 * the m (<= 8) positions from here (the backward's second window, of t) */
static inline __m256 fn_lrn_window8_f32(const float* suffix, float* prefix, const float* grow,
                                        ptrdiff_t m) {
    return _mm256_add_ps(fn_load8(suffix, m), fn_lrn_grow8_f32(prefix, grow, m, 0));
}

static inline __m256 fn_lrn_window8_f64(const double* suffix, double* prefix, const float* grow,
                                        ptrdiff_t m) {
    __m256d plo, phi;
    fn_lrn_grow8_f64(prefix, grow, m, 0, &plo, &phi);
    __m256d lo = _mm256_add_pd(fn_load4d(suffix, m), plo);
    __m256d hi = _mm256_add_pd(fn_load4d(suffix + 4, m - 4), phi);
    return _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
}

static inline float fn_lrn_scale1_f64(const double* suffix, const double* prefix, double k,
                                      double a) {
    return (float)fma(a, *suffix + *prefix, k);
}

/* the NaN lanes of v */
static inline __m256 fn_nan_lanes(__m256 v) {
    return _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
}

#define FN_PREFETCH_SPREAD(p, i)                                                         \
    if ((p) && ((i) & 15) == 0) __builtin_prefetch((p) + (i), 0, 3)

/* The loops run whole vectors with m = 8 and `checked` as constants (the
 * one-vector steps are always inlined, so that everything stays in registers),
 * then the padded last vector; they return the NaN lanes of all outputs. */
#define FN_LRN_STEP static inline __attribute__((always_inline))

/* y[i, i + m) = the first m lanes of v: plain stores, or streamed through st (see
 * fn_row_stream; FN_PUT_BODY only for its body vectors, m = 8) */
enum { FN_PUT_PLAIN, FN_PUT_EDGE, FN_PUT_BODY };
static inline __attribute__((always_inline)) void fn_row_put(fn_row_stream* st, float* y,
                                                             ptrdiff_t i, __m256 v, ptrdiff_t m,
                                                             int how) {
    if (how == FN_PUT_BODY) {
        __m256 r = _mm256_permutevar8x32_ps(v, st->rot);
        _mm256_stream_ps(y + i + st->shift, _mm256_blendv_ps(r, st->prev, st->from_prev));
        st->prev = r;
    } else if (how == FN_PUT_EDGE) {
        fn_row_stream_put(st, i, v, m);
    } else {
        fn_store8(y + i, v, m);
    }
}

/* STEP(..., i, m, how) for the vectors of a row of n values in order (m = 8 but for
 * the last one): how = FN_PUT_PLAIN when st is NULL, else FN_PUT_EDGE, and FN_PUT_BODY
 * over st's body, each a constant in its own loop so that the step specializes. */
#define FN_ROW_STEPS(st, n, STEP, ...)                                                   \
    do {                                                                                 \
        ptrdiff_t i_ = 0, whole_ = (n) / 8 * 8;                                          \
        if (st) {                                                                        \
            for (; i_ < (st)->body_from; i_ += 8) STEP(__VA_ARGS__, i_, 8, FN_PUT_EDGE); \
            for (; i_ < (st)->body_to; i_ += 8) STEP(__VA_ARGS__, i_, 8, FN_PUT_BODY);   \
            for (; i_ < whole_; i_ += 8) STEP(__VA_ARGS__, i_, 8, FN_PUT_EDGE);          \
            if (i_ < (n)) STEP(__VA_ARGS__, i_, (n) - i_, FN_PUT_EDGE);                  \
        } else {                                                                         \
            for (; i_ < whole_; i_ += 8) STEP(__VA_ARGS__, i_, 8, FN_PUT_PLAIN);         \
            if (i_ < (n)) STEP(__VA_ARGS__, i_, (n) - i_, FN_PUT_PLAIN);                 \
        }                                                                                \
    } while (0)

/* st set up for y when stream (and y has a whole line to stream), else NULL */
static inline fn_row_stream* fn_row_stream_or_null(fn_row_stream* st, float* y, ptrdiff_t n,
                                                   int stream) {
    return stream && fn_row_stream_init(st, y, n) ? st : NULL;
}

#define FN_DEFINE_LRN075(T, SUFFIX)                                                      \
    FN_LRN_STEP __m256 fn_lrn_forward8_##SUFFIX(const T* suffix, T* prefix,              \
                                                const float* grow, const float* x,       \
                                                float* y, fn_row_stream* st, ptrdiff_t i, \
                                                ptrdiff_t m, double k, double a,         \
                                                int checked, int how) {                  \
        __m256 s = fn_lrn_scale8_##SUFFIX(suffix + i, prefix + i, grow ? grow + i : NULL, \
                                          m, k, a);                                      \
        __m256 v = _mm256_mul_ps(fn_load8(x + i, m), fn_pow075_8(s, checked, NULL));      \
        fn_row_put(st, y, i, v, m, how);                                                 \
        return fn_nan_lanes(v);                                                          \
    }                                                                                    \
    FN_LRN_STEP void fn_lrn_forward_step_##SUFFIX(__m256* nan, const T* suffix,          \
                                                  T* prefix, const float* grow,          \
                                                  const float* x, float* y,              \
                                                  fn_row_stream* st, double k, double a, \
                                                  const float* prefetch, int checked,    \
                                                  ptrdiff_t i, ptrdiff_t m, int how) {   \
        FN_PREFETCH_SPREAD(prefetch, i);                                                 \
        *nan = _mm256_or_ps(*nan, fn_lrn_forward8_##SUFFIX(suffix, prefix, grow, x, y,   \
                                                           st, i, m, k, a, checked, how)); \
    }                                                                                    \
    FN_LRN_STEP __m256 fn_lrn_forward_loop_##SUFFIX(const T* suffix, T* prefix,          \
                                                    const float* grow, const float* x,   \
                                                    float* y, fn_row_stream* st,         \
                                                    ptrdiff_t n, double k, double a,     \
                                                    const float* prefetch, int checked) { \
        __m256 nan = _mm256_setzero_ps();                                                \
        FN_ROW_STEPS(st, n, fn_lrn_forward_step_##SUFFIX, &nan, suffix, prefix, grow, x, \
                     y, st, k, a, prefetch, checked);                                    \
        return nan;                                                                      \
    }                                                                                    \
    static inline void fn_lrn_forward075_##SUFFIX(const T* suffix, T* prefix,           \
                                                  const float* grow, const float* x,    \
                                                  float* y, ptrdiff_t n, double k,      \
                                                  double a, const float* prefetch,      \
                                                  int stream) {                         \
        fn_row_stream st_, *st = fn_row_stream_or_null(&st_, y, n, stream);             \
        __m256 nan;                                                                      \
        if (!fn_pow075_s_is_normal(k, a)) {                                              \
            fn_lrn_forward_loop_##SUFFIX(suffix, prefix, grow, x, y, st, n, k, a,        \
                                         prefetch, 1);                                   \
            return;                                                                      \
        }                                                                                \
        nan = fn_lrn_forward_loop_##SUFFIX(suffix, prefix, grow, x, y, st, n, k, a,      \
                                           prefetch, 0);                                 \
        /* an infinite or NaN s, or a NaN x (a streamed row is read back here: rare) */  \
        if (_mm256_movemask_ps(nan))                                                     \
            for (ptrdiff_t j = 0; j < n; j++)                                            \
                if (isnan(y[j]))                                                         \
                    y[j] = x[j] * fn_pow075_portable(                                    \
                        fn_lrn_scale1_##SUFFIX(suffix + j, prefix + j, k, a), 0);        \
    }                                                                                    \
    FN_LRN_STEP __m256 fn_lrn_backward8_##SUFFIX(const T* suffix, T* prefix,             \
                                                 const float* grow, const float* x,      \
                                                 const float* dy, float* dx, float* t,   \
                                                 ptrdiff_t m, double k, double a,        \
                                                 int checked) {                          \
        __m256 s = fn_lrn_scale8_##SUFFIX(suffix, prefix, grow, m, k, a);                \
        __m256 p175, g = fn_load8(dy, m);                                                \
        __m256 d = _mm256_mul_ps(g, fn_pow075_8(s, checked, &p175));                      \
        __m256 tv = _mm256_mul_ps(_mm256_mul_ps(g, fn_load8(x, m)), p175);               \
        fn_store8(dx, d, m);                                                             \
        fn_store8(t, tv, m);                                                             \
        return _mm256_or_ps(fn_nan_lanes(d), fn_nan_lanes(tv));                          \
    }                                                                                    \
    FN_LRN_STEP __m256 fn_lrn_backward_loop_##SUFFIX(const T* suffix, T* prefix,         \
                                                     const float* grow, const float* x,  \
                                                     const float* dy, float* dx,         \
                                                     float* t, ptrdiff_t n, double k,    \
                                                     double a, const float* prefetch,    \
                                                     const float* prefetch2,             \
                                                     int checked) {                      \
        __m256 nan = _mm256_setzero_ps();                                                \
        ptrdiff_t i = 0;                                                                 \
        for (; i + 8 <= n; i += 8) {                                                     \
            FN_PREFETCH_SPREAD(prefetch, i);                                             \
            FN_PREFETCH_SPREAD(prefetch2, i + 8);                                        \
            nan = _mm256_or_ps(nan, fn_lrn_backward8_##SUFFIX(                           \
                                        suffix + i, prefix + i, grow ? grow + i : NULL,  \
                                        x + i, dy + i, dx + i, t + i, 8, k, a, checked)); \
        }                                                                                \
        if (i < n)                                                                       \
            nan = _mm256_or_ps(nan, fn_lrn_backward8_##SUFFIX(                           \
                                        suffix + i, prefix + i, grow ? grow + i : NULL,  \
                                        x + i, dy + i, dx + i, t + i, n - i, k, a,       \
                                        checked));                                       \
        return nan;                                                                      \
    }                                                                                    \
    static inline void fn_lrn_backward075_##SUFFIX(const T* suffix, T* prefix,          \
                                                   const float* grow, const float* x,   \
                                                   const float* dy, float* dx, float* t, \
                                                   ptrdiff_t n, double k, double a,     \
                                                   const float* prefetch,               \
                                                   const float* prefetch2) {            \
        if (!fn_pow075_s_is_normal(k, a)) {                                              \
            fn_lrn_backward_loop_##SUFFIX(suffix, prefix, grow, x, dy, dx, t, n, k, a,   \
                                          prefetch, prefetch2, 1);                       \
            return;                                                                      \
        }                                                                                \
        if (_mm256_movemask_ps(fn_lrn_backward_loop_##SUFFIX(suffix, prefix, grow, x, dy, \
                                                             dx, t, n, k, a, prefetch,   \
                                                             prefetch2, 0)))             \
            for (ptrdiff_t j = 0; j < n; j++)                                            \
                if (isnan(dx[j]) || isnan(t[j])) {                                       \
                    float sj = fn_lrn_scale1_##SUFFIX(suffix + j, prefix + j, k, a);     \
                    dx[j] = dy[j] * fn_pow075_portable(sj, 0);                           \
                    t[j] = dy[j] * x[j] * fn_pow075_portable(sj, 1);                     \
                }                                                                        \
    }
#define FN_DEFINE_LRN_TERM(T, SUFFIX)                                                    \
    FN_LRN_STEP void fn_lrn_term_step_##SUFFIX(const T* suffix, T* prefix,               \
                                               const float* grow, const float* x,        \
                                               const float* own, float* dx,              \
                                               fn_row_stream* st, __m256 coef,           \
                                               ptrdiff_t i, ptrdiff_t m, int how) {      \
        __m256 s = fn_lrn_window8_##SUFFIX(suffix + i, prefix + i, grow ? grow + i : NULL, \
                                           m);                                           \
        fn_row_put(st, dx, i,                                                            \
                   _mm256_fnmadd_ps(_mm256_mul_ps(coef, fn_load8(x + i, m)), s,          \
                                    fn_load8(own + i, m)),                               \
                   m, how);                                                              \
    }                                                                                    \
    static inline void fn_lrn_window_term_##SUFFIX(const T* suffix, T* prefix,          \
                                                   const float* grow, const float* x,   \
                                                   const float* own, float* dx,         \
                                                   ptrdiff_t n, float coef, int stream) { \
        fn_row_stream st_, *st = fn_row_stream_or_null(&st_, dx, n, stream);            \
        FN_ROW_STEPS(st, n, fn_lrn_term_step_##SUFFIX, suffix, prefix, grow, x, own, dx, \
                     st, _mm256_set1_ps(coef));                                          \
    }
#else
#define FN_DEFINE_LRN075(T, SUFFIX)                                                      \
    static inline float fn_lrn_scale1_##SUFFIX(const T* suffix, T* prefix, const float* grow, \
                                               ptrdiff_t i, double k, double a) {       \
        if (grow) prefix[i] = prefix[i] + (T)grow[i] * (T)grow[i];                       \
        return (float)((T)k + (T)a * (suffix[i] + prefix[i]));                           \
    }                                                                                    \
    static inline void fn_lrn_forward075_##SUFFIX(const T* suffix, T* prefix,           \
                                                  const float* grow, const float* x,    \
                                                  float* y, ptrdiff_t n, double k,      \
                                                  double a, const float* prefetch,      \
                                                  int stream) {                         \
        (void)prefetch;                                                                  \
        (void)stream;                                                                    \
        for (ptrdiff_t i = 0; i < n; i++)                                                \
            y[i] = x[i] * fn_pow075_portable(                                            \
                fn_lrn_scale1_##SUFFIX(suffix, prefix, grow, i, k, a), 0);               \
    }                                                                                    \
    static inline void fn_lrn_backward075_##SUFFIX(const T* suffix, T* prefix,          \
                                                   const float* grow, const float* x,   \
                                                   const float* dy, float* dx, float* t, \
                                                   ptrdiff_t n, double k, double a,     \
                                                   const float* prefetch,               \
                                                   const float* prefetch2) {            \
        (void)prefetch;                                                                  \
        (void)prefetch2;                                                                 \
        for (ptrdiff_t i = 0; i < n; i++) {                                              \
            float s = fn_lrn_scale1_##SUFFIX(suffix, prefix, grow, i, k, a);             \
            dx[i] = dy[i] * fn_pow075_portable(s, 0);                                    \
            t[i] = dy[i] * x[i] * fn_pow075_portable(s, 1);                              \
        }                                                                                \
    }
#define FN_DEFINE_LRN_TERM(T, SUFFIX)                                                   \
    static inline void fn_lrn_window_term_##SUFFIX(const T* suffix, T* prefix,          \
                                                   const float* grow, const float* x,   \
                                                   const float* own, float* dx,         \
                                                   ptrdiff_t n, float coef, int stream) { \
        (void)stream;                                                                    \
        for (ptrdiff_t i = 0; i < n; i++) {                                              \
            if (grow) prefix[i] = prefix[i] + (T)grow[i];                                \
            dx[i] = own[i] - coef * x[i] * (float)(suffix[i] + prefix[i]);               \
        }                                                                                \
    }
#endif

/* The van Herk blocks' fused primitives: float data with beta = 0.75 takes them only
 * with float64 sums (size > FN_LRN_ROWS_MAX_SIZE; smaller windows take the direct
 * route); the window term also serves float sums with other betas. */
FN_DEFINE_LRN075(double, f64)
FN_DEFINE_LRN_TERM(double, f64)
FN_DEFINE_LRN_TERM(float, f32)

#undef FN_DEFINE_LRN075
#undef FN_DEFINE_LRN_TERM

/* Channels-last LRN tiles: w positions of C contiguous channels in memory <->
 * a tile of C rows of w positions, tile[c * w + r] = rows[r * C + c]. Walked
 * in square blocks of FN_TILE_BLOCK, positions outermost, so that memory is
 * one sequential stream. With AVX2 a whole block is transposed in registers
 * (float 8x8, double as four 4x4), partial blocks value by value. Pure data
 * movement: every path gives the same result. The caller prefetches a tile's
 * memory while it computes the previous tile (see _lrn.pxi). Not inlined:
 * inlined into the task loop, the transposes spilled registers (slower). */
#define FN_TILE_BLOCK 8

/* d[c * ds + r] = s[r * ss + c] for r < nr, c < nc */
#define FN_TRANSPOSE_LOOP(s, ss, d, ds, nr, nc)                                          \
    for (ptrdiff_t r_ = 0; r_ < (nr); r_++)                                              \
        for (ptrdiff_t c_ = 0; c_ < (nc); c_++) (d)[c_ * (ds) + r_] = (s)[r_ * (ss) + c_]

#if defined(__AVX2__) && defined(__FMA__)
static inline void fn_transpose8_f32(const float* s, ptrdiff_t ss, float* d, ptrdiff_t ds) {
    __m256 r[8], t[8], u[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(s + i * ss);
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);     /* columns 0,1 | 4,5 of a row pair */
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]); /* columns 2,3 | 6,7 */
    }
    for (int i = 0; i < 8; i += 4) {                   /* a column of 4 rows per lane */
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        _mm256_storeu_ps(d + i * ds, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
        _mm256_storeu_ps(d + (i + 4) * ds, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
    }
}

static inline void fn_transpose8_f64(const double* s, ptrdiff_t ss, double* d, ptrdiff_t ds) {
    for (int h = 0; h < 8; h += 4)
        for (int q = 0; q < 8; q += 4) {               /* rows h.., columns q.. */
            const double* sq = s + h * ss + q;
            __m256d r0 = _mm256_loadu_pd(sq), r1 = _mm256_loadu_pd(sq + ss);
            __m256d r2 = _mm256_loadu_pd(sq + 2 * ss), r3 = _mm256_loadu_pd(sq + 3 * ss);
            __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1);
            __m256d t2 = _mm256_unpacklo_pd(r2, r3), t3 = _mm256_unpackhi_pd(r2, r3);
            double* dq = d + q * ds + h;
            _mm256_storeu_pd(dq, _mm256_permute2f128_pd(t0, t2, 0x20));
            _mm256_storeu_pd(dq + ds, _mm256_permute2f128_pd(t1, t3, 0x20));
            _mm256_storeu_pd(dq + 2 * ds, _mm256_permute2f128_pd(t0, t2, 0x31));
            _mm256_storeu_pd(dq + 3 * ds, _mm256_permute2f128_pd(t1, t3, 0x31));
        }
}
#define FN_TRANSPOSE8(SUFFIX, s, ss, d, ds) fn_transpose8_##SUFFIX(s, ss, d, ds)
#else
#define FN_TRANSPOSE8(SUFFIX, s, ss, d, ds) FN_TRANSPOSE_LOOP(s, ss, d, ds, 8, 8)
#endif

#define FN_DEFINE_LRN_TILES(T, SUFFIX)                                                   \
    /* d[c * ds + r] = s[r * ss + c] for r < nr, c < nc (at most FN_TILE_BLOCK) */       \
    static inline void fn_transpose_block_##SUFFIX(const T* s, ptrdiff_t ss, T* d,       \
                                                   ptrdiff_t ds, ptrdiff_t nr,           \
                                                   ptrdiff_t nc) {                       \
        if (nr == FN_TILE_BLOCK && nc == FN_TILE_BLOCK)                                  \
            FN_TRANSPOSE8(SUFFIX, s, ss, d, ds);                                         \
        else                                                                             \
            FN_TRANSPOSE_LOOP(s, ss, d, ds, nr, nc);                                     \
    }                                                                                    \
    /* d = the transpose of the nr x nc matrix s (rows ss apart; d's rows ds apart),     \
       block by block, in the order that walks d's memory in order (d_in_order) or s's: \
       the side that is the caller's rows stays one stream */                           \
    static inline void fn_transpose_##SUFFIX(const T* restrict s, ptrdiff_t ss,         \
                                             T* restrict d, ptrdiff_t ds, ptrdiff_t nr, \
                                             ptrdiff_t nc, int d_in_order) {            \
        ptrdiff_t outer = d_in_order ? nc : nr, inner = d_in_order ? nr : nc;           \
        for (ptrdiff_t i = 0; i < outer; i += FN_TILE_BLOCK)                            \
            for (ptrdiff_t j = 0; j < inner; j += FN_TILE_BLOCK) {                      \
                ptrdiff_t r = d_in_order ? j : i, c = d_in_order ? i : j;               \
                ptrdiff_t br = nr - r < FN_TILE_BLOCK ? nr - r : FN_TILE_BLOCK;         \
                ptrdiff_t bc = nc - c < FN_TILE_BLOCK ? nc - c : FN_TILE_BLOCK;         \
                fn_transpose_block_##SUFFIX(s + r * ss + c, ss, d + c * ds + r, ds, br, bc); \
            }                                                                           \
    }                                                                                   \
    /* tile (C, w) <- w rows of C channels, and back */                                 \
    static __attribute__((noinline)) void fn_lrn_tile_in_##SUFFIX(                      \
        const T* restrict rows, T* restrict tile, ptrdiff_t C, ptrdiff_t w) {           \
        fn_transpose_##SUFFIX(rows, C, tile, w, w, C, 0);                               \
    }                                                                                   \
    static __attribute__((noinline)) void fn_lrn_tile_out_##SUFFIX(                     \
        const T* restrict tile, T* restrict rows, ptrdiff_t C, ptrdiff_t w) {           \
        fn_transpose_##SUFFIX(tile, w, rows, C, C, w, 1);                               \
    }

FN_DEFINE_LRN_TILES(double, f64)
FN_DEFINE_LRN_TILES(float, f32)

#undef FN_DEFINE_LRN_TILES

/* Channels-last LRN rows, float32, beta = 0.75, windows of at most FN_LRN_ROWS_MAX_SIZE
 * channels: a position's C channels are contiguous, so its window sums are sums of
 * neighbouring values of one row. Each row's squares go to a zero-padded scratch row,
 * and a window sum is the size values around a channel, added in channel order (never a
 * subtraction: at most size non-negative terms, as in the tiles' float sums). No
 * transposes and no window storage: (32,96,55,55) at 1 thread ran 3.3 ms forward and
 * 6.3 ms backward against 6.7 and 10.9 ms through the tiles (C driver; 5.7 and 10.5 ms
 * for channels-first memory). FN_LRN_ROWS rows go through each pass together, so that
 * a window's loads never wait on the just-stored squares they overlap (store-to-load
 * forwarding fails on loads that straddle two stores: row by row ran 4.6-5.4 ms).
 * Each window size gets its own unrolled loops (fn_lrn_rows_sized).
 * Scratch: fn_lrn_rows_scratch(C) floats. The sum order differs from the tiles' (block
 * suffix + prefix), so results differ from channels-first memory in the last bits. */
#define FN_LRN_ROWS_MAX_SIZE 8
#define FN_LRN_ROWS 8
#define FN_LRN_ROWS_PAD 8        /* zeros each side of a scratch row: >= size - 1 */

static inline ptrdiff_t fn_lrn_rows_pitch(ptrdiff_t C) {
    return (C + 7) / 8 * 8 + 2 * FN_LRN_ROWS_PAD;
}

/* q (FN_LRN_ROWS rows), t (likewise, backward) and own (FN_LRN_ROWS rows of C) */
static inline ptrdiff_t fn_lrn_rows_scratch(ptrdiff_t C) {
    return 3 * FN_LRN_ROWS * fn_lrn_rows_pitch(C);
}

/* one window sum, v[-lo] + ... + v[hi] in that order */
static inline float fn_lrn_rows_window1(const float* v, int lo, int hi) {
    float s = v[-lo];
    for (int j = 1 - lo; j <= hi; j++) s += v[j];
    return s;
}

static inline float fn_lrn_rows_scale1(const float* q, int lo, int hi, double k, double a) {
    return fmaf((float)a, fn_lrn_rows_window1(q, lo, hi), (float)k);
}

/* Calls BODY(..., lo, hi) with lo and hi as constants for every size up to
 * FN_LRN_ROWS_MAX_SIZE (lo = size / 2, hi = (size - 1) / 2), so that its window loops
 * unroll; other (lo, hi) pairs never come here. */
#define fn_lrn_rows_sized(lo, hi, BODY, ...)                                             \
    do {                                                                                 \
        switch ((lo) * 8 + (hi)) {                                                       \
        case 0: BODY(__VA_ARGS__, 0, 0); break;                                          \
        case 8: BODY(__VA_ARGS__, 1, 0); break;                                          \
        case 9: BODY(__VA_ARGS__, 1, 1); break;                                          \
        case 17: BODY(__VA_ARGS__, 2, 1); break;                                         \
        case 18: BODY(__VA_ARGS__, 2, 2); break;                                         \
        case 26: BODY(__VA_ARGS__, 3, 2); break;                                         \
        case 27: BODY(__VA_ARGS__, 3, 3); break;                                         \
        default: BODY(__VA_ARGS__, 4, 3); break;                                         \
        }                                                                                \
    } while (0)

#if defined(__AVX2__) && defined(__FMA__)
/* lanes [0, m) set */
static inline __m256 fn_lanes_below(ptrdiff_t m) {
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)m),
                                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

/* the window sums of the 8 channels at v, as fn_lrn_rows_window1 adds them */
FN_LRN_STEP __m256 fn_lrn_rows_window8(const float* v, int lo, int hi) {
    __m256 s = _mm256_loadu_ps(v - lo);
    for (int j = 1 - lo; j <= hi; j++) s = _mm256_add_ps(s, _mm256_loadu_ps(v + j));
    return s;
}

/* q rows <- the squares of rows of C values (lanes past C square to 0, padding kept) */
static inline void fn_lrn_rows_squares(const float* x, float* q, ptrdiff_t rows, ptrdiff_t C,
                                       ptrdiff_t pitch) {
    for (ptrdiff_t r = 0; r < rows; r++)
        for (ptrdiff_t c = 0; c < C; c += 8) {
            __m256 v = fn_load8(x + r * C + c, C - c);
            _mm256_storeu_ps(q + r * pitch + FN_LRN_ROWS_PAD + c, _mm256_mul_ps(v, v));
        }
}

/* y for channels [c, c + m) of a row from its squares q; returns the NaN lanes */
FN_LRN_STEP __m256 fn_lrn_rows_forward8(const float* q, const float* x, float* y, ptrdiff_t c,
                                        ptrdiff_t m, double k, double a, int checked, int lo,
                                        int hi) {
    __m256 s = _mm256_fmadd_ps(_mm256_set1_ps((float)a),
                               fn_lrn_rows_window8(q + FN_LRN_ROWS_PAD + c, lo, hi),
                               _mm256_set1_ps((float)k));
    __m256 v = _mm256_mul_ps(fn_load8(x + c, m), fn_pow075_8(s, checked, NULL));
    fn_store8(y + c, v, m);
    return m >= 8 ? fn_nan_lanes(v) : _mm256_and_ps(fn_nan_lanes(v), fn_lanes_below(m));
}

/* own and t for channels [c, c + m) of a row (t's padding stays 0); returns the NaN lanes */
FN_LRN_STEP __m256 fn_lrn_rows_own8(const float* q, const float* x, const float* dy, float* own,
                                    float* t, ptrdiff_t c, ptrdiff_t m, double k, double a,
                                    int checked, int lo, int hi) {
    __m256 s = _mm256_fmadd_ps(_mm256_set1_ps((float)a),
                               fn_lrn_rows_window8(q + FN_LRN_ROWS_PAD + c, lo, hi),
                               _mm256_set1_ps((float)k));
    __m256 p175, g = fn_load8(dy + c, m);
    __m256 d = _mm256_mul_ps(g, fn_pow075_8(s, checked, &p175));
    __m256 tv = _mm256_mul_ps(_mm256_mul_ps(g, fn_load8(x + c, m)), p175);
    fn_store8(own + c, d, m);
    fn_store8(t + FN_LRN_ROWS_PAD + c, tv, m);
    __m256 nan = _mm256_or_ps(fn_nan_lanes(d), fn_nan_lanes(tv));
    return m >= 8 ? nan : _mm256_and_ps(nan, fn_lanes_below(m));
}

/* dx for channels [c, c + m) of a row: own - coef * x * (window sum of t, mirrored) */
FN_LRN_STEP void fn_lrn_rows_dx8(const float* t, const float* x, const float* own, float* dx,
                                 ptrdiff_t c, ptrdiff_t m, float coef, int lo, int hi) {
    __m256 sum = fn_lrn_rows_window8(t + FN_LRN_ROWS_PAD + c, hi, lo);
    fn_store8(dx + c, _mm256_fnmadd_ps(_mm256_mul_ps(_mm256_set1_ps(coef), fn_load8(x + c, m)),
                                       sum, fn_load8(own + c, m)), m);
}

/* The passes of a group of rows: whole vectors with m = 8 as a constant, then the rest */
#define FN_LRN_ROWS_PASS(C, STEP, nan, ...)                                              \
    do {                                                                                 \
        ptrdiff_t c_ = 0;                                                                \
        for (; c_ + 8 <= (C); c_ += 8) nan = _mm256_or_ps(nan, STEP(__VA_ARGS__, c_, 8)); \
        if (c_ < (C)) nan = _mm256_or_ps(nan, STEP(__VA_ARGS__, c_, (C) - c_));          \
    } while (0)
#define FN_LRN_ROWS_FORWARD8(q, x, y, k, a, checked, lo, hi, c, m)                       \
    fn_lrn_rows_forward8(q, x, y, c, m, k, a, checked, lo, hi)
#define FN_LRN_ROWS_OWN8(q, x, dy, own, t, k, a, checked, lo, hi, c, m)                  \
    fn_lrn_rows_own8(q, x, dy, own, t, c, m, k, a, checked, lo, hi)
#define FN_LRN_ROWS_DX8(t, x, own, dx, coef, lo, hi, c, m)                               \
    (fn_lrn_rows_dx8(t, x, own, dx, c, m, coef, lo, hi), _mm256_setzero_ps())

/* y of a group of rows from their squares q; returns whether an output is NaN */
FN_LRN_STEP int fn_lrn_rows_forward_group(const float* q, const float* x, float* y,
                                          ptrdiff_t rows, ptrdiff_t C, ptrdiff_t pitch, double k,
                                          double a, int checked, int lo, int hi) {
    __m256 nan = _mm256_setzero_ps();
    for (ptrdiff_t r = 0; r < rows; r++)
        FN_LRN_ROWS_PASS(C, FN_LRN_ROWS_FORWARD8, nan, q + r * pitch, x + r * C, y + r * C, k,
                         a, checked, lo, hi);
    return _mm256_movemask_ps(nan);
}

/* own and t of a group of rows, then, when neither has a NaN, their dx; returns whether
 * one had (dx is then left to the caller) */
FN_LRN_STEP int fn_lrn_rows_backward_group(const float* q, const float* x, const float* dy,
                                           float* dx, float* own, float* t, ptrdiff_t rows,
                                           ptrdiff_t C, ptrdiff_t pitch, double k, double a,
                                           float coef, int checked, int lo, int hi) {
    __m256 nan = _mm256_setzero_ps(), none = _mm256_setzero_ps();
    for (ptrdiff_t r = 0; r < rows; r++)
        FN_LRN_ROWS_PASS(C, FN_LRN_ROWS_OWN8, nan, q + r * pitch, x + r * C, dy + r * C,
                         own + r * pitch, t + r * pitch, k, a, checked, lo, hi);
    if (_mm256_movemask_ps(nan)) return 1;
    for (ptrdiff_t r = 0; r < rows; r++)
        FN_LRN_ROWS_PASS(C, FN_LRN_ROWS_DX8, none, t + r * pitch, x + r * C, own + r * pitch,
                         dx + r * C, coef, lo, hi);
    return 0;
}

#define FN_LRN_ROWS_SIZED_FORWARD(out, q, x, y, rows, C, pitch, k, a, lo, hi)            \
    out = fn_lrn_rows_forward_group(q, x, y, rows, C, pitch, k, a, 0, lo, hi)
#define FN_LRN_ROWS_SIZED_BACKWARD(out, q, x, dy, dx, own, t, rows, C, pitch, k, a, coef, lo, hi) \
    out = fn_lrn_rows_backward_group(q, x, dy, dx, own, t, rows, C, pitch, k, a, coef, 0, lo, hi)
#else
static inline void fn_lrn_rows_squares(const float* x, float* q, ptrdiff_t rows, ptrdiff_t C,
                                       ptrdiff_t pitch) {
    for (ptrdiff_t r = 0; r < rows; r++)
        for (ptrdiff_t c = 0; c < C; c++)
            q[r * pitch + FN_LRN_ROWS_PAD + c] = x[r * C + c] * x[r * C + c];
}
#endif

/* y = x * s^-0.75 for nrows rows of C channels, s = k + a * (window sum of x^2) */
static inline void fn_lrn_rows_forward075_f32(const float* x, float* y, ptrdiff_t nrows,
                                              ptrdiff_t C, int lo, int hi, double k, double a,
                                              float* scratch) {
    ptrdiff_t pitch = fn_lrn_rows_pitch(C);
    float* q = scratch;
    memset(q, 0, (size_t)(FN_LRN_ROWS * pitch) * sizeof(float));
    for (ptrdiff_t r0 = 0; r0 < nrows; r0 += FN_LRN_ROWS) {
        ptrdiff_t rows = nrows - r0 < FN_LRN_ROWS ? nrows - r0 : FN_LRN_ROWS;
        const float* xg = x + r0 * C;
        float* yg = y + r0 * C;
        fn_lrn_rows_squares(xg, q, rows, C, pitch);
#if defined(__AVX2__) && defined(__FMA__)
        int nan;
        if (fn_pow075_s_is_normal(k, a))
            fn_lrn_rows_sized(lo, hi, FN_LRN_ROWS_SIZED_FORWARD, nan, q, xg, yg, rows, C, pitch,
                              k, a);
        else
            nan = fn_lrn_rows_forward_group(q, xg, yg, rows, C, pitch, k, a, 1, lo, hi);
        if (!nan) continue;
        /* an infinite or NaN s, or a NaN x: as the portable route gives them */
        for (ptrdiff_t r = 0; r < rows; r++)
            for (ptrdiff_t c = 0; c < C; c++)
                if (isnan(yg[r * C + c]))
#else
        for (ptrdiff_t r = 0; r < rows; r++)
            for (ptrdiff_t c = 0; c < C; c++)
#endif
                    yg[r * C + c] = xg[r * C + c] * fn_pow075_portable(
                        fn_lrn_rows_scale1(q + r * pitch + FN_LRN_ROWS_PAD + c, lo, hi, k, a), 0);
    }
}

/* dx for nrows rows of C channels (beta = 0.75; see _lrn.pxi for the formula):
 * own = dy * s^-0.75 and t = dy * x * s^-1.75 per row, then
 * dx = own - coef * x * (window sum of t over [c - hi, c + lo]) */
static inline void fn_lrn_rows_backward075_f32(const float* x, const float* dy, float* dx,
                                               ptrdiff_t nrows, ptrdiff_t C, int lo, int hi,
                                               double k, double a, float coef, float* scratch) {
    ptrdiff_t pitch = fn_lrn_rows_pitch(C);
    float* q = scratch;
    float* t = q + FN_LRN_ROWS * pitch;
    float* own = t + FN_LRN_ROWS * pitch;
    memset(q, 0, (size_t)(2 * FN_LRN_ROWS * pitch) * sizeof(float));   /* q and t */
    for (ptrdiff_t r0 = 0; r0 < nrows; r0 += FN_LRN_ROWS) {
        ptrdiff_t rows = nrows - r0 < FN_LRN_ROWS ? nrows - r0 : FN_LRN_ROWS;
        const float* xg = x + r0 * C;
        const float* dyg = dy + r0 * C;
        float* dxg = dx + r0 * C;
        fn_lrn_rows_squares(xg, q, rows, C, pitch);
#if defined(__AVX2__) && defined(__FMA__)
        int nan;
        if (fn_pow075_s_is_normal(k, a))
            fn_lrn_rows_sized(lo, hi, FN_LRN_ROWS_SIZED_BACKWARD, nan, q, xg, dyg, dxg, own, t,
                              rows, C, pitch, k, a, coef);
        else
            nan = fn_lrn_rows_backward_group(q, xg, dyg, dxg, own, t, rows, C, pitch, k, a, coef,
                                             1, lo, hi);
        if (!nan) continue;
        /* an infinite or NaN s, or a NaN x or dy: own and t as the portable route gives
         * them, then dx */
#endif
        for (ptrdiff_t r = 0; r < rows; r++)
            for (ptrdiff_t c = 0; c < C; c++) {
                float* o = own + r * pitch + c;
                float* tc = t + r * pitch + FN_LRN_ROWS_PAD + c;
#if defined(__AVX2__) && defined(__FMA__)
                if (!isnan(*o) && !isnan(*tc)) continue;
#endif
                float sc = fn_lrn_rows_scale1(q + r * pitch + FN_LRN_ROWS_PAD + c, lo, hi, k, a);
                float g = dyg[r * C + c];
                *o = g * fn_pow075_portable(sc, 0);
                *tc = g * xg[r * C + c] * fn_pow075_portable(sc, 1);
            }
        for (ptrdiff_t r = 0; r < rows; r++) {
#if defined(__AVX2__) && defined(__FMA__)
            __m256 none = _mm256_setzero_ps();
            FN_LRN_ROWS_PASS(C, FN_LRN_ROWS_DX8, none, t + r * pitch, xg + r * C,
                             own + r * pitch, dxg + r * C, coef, lo, hi);
            (void)none;
#else
            for (ptrdiff_t c = 0; c < C; c++)
                dxg[r * C + c] = own[r * pitch + c] - coef * xg[r * C + c] *
                    fn_lrn_rows_window1(t + r * pitch + FN_LRN_ROWS_PAD + c, hi, lo);
#endif
        }
    }
}

/* Channels-first memory through the same arithmetic: strips of 8 positions walked down
 * the C channels (rows `stride` apart), the window's squares, and in the backward t and
 * the channel's own part, kept in registers as they slide; no scratch. Each value gets
 * exactly the rows route's operations in the same order, so both layouts give the same
 * bits. The strips lose the hardware prefetchers (one piece of 32 bytes per channel row),
 * so every channel step prefetches its rows FN_LRN_STRIP_AHEAD positions ahead: x and dy
 * to read, y or dx to write (without the write prefetch, each output line was fetched
 * on demand; 64 positions ahead beat 32, 128 and 256). Kernels A/B at 1 thread against
 * the van Herk blocks: (32,96,3025) forward 1.28x, backward 1.41x; (32,256,729) 1.13x,
 * 1.32x. Transposing the strided channel rows into the rows route took 2x the time
 * instead. Tasks: fn_lrn_planes_*075_f32. */
#define FN_LRN_STRIP_AHEAD 64

#if defined(__AVX2__) && defined(__FMA__)
/* the NaN lanes of v among a strip's first m positions, as a bit mask */
static inline int fn_lrn_nan_mask(__m256 v, ptrdiff_t m) {
    __m256 nan = fn_nan_lanes(v);
    return _mm256_movemask_ps(m >= 8 ? nan : _mm256_and_ps(nan, fn_lanes_below(m)));
}

/* The squares' window of a strip: q[j] is the square of channel c - lo + j. Primed for
 * c = 0 (channels 0 .. hi - 1 in q[lo + 1 ..]), then slid by one channel per step, the
 * newest row (0 past the last channel) prefetched ahead. */
FN_LRN_STEP void fn_lrn_strip_prime(__m256* q, const float* x, ptrdiff_t stride, ptrdiff_t C,
                                    ptrdiff_t m, int lo, int hi) {
    for (int j = 0; j < lo + hi + 1; j++) q[j] = _mm256_setzero_ps();
    for (int j = 0; j < hi && j < C; j++) {
        __m256 v = fn_load8(x + j * stride, m);
        q[lo + 1 + j] = _mm256_mul_ps(v, v);
    }
}

/* slides q to channel c and returns s = k + a * (q[0] + ... + q[size - 1], in order) */
FN_LRN_STEP __m256 fn_lrn_strip_scale(__m256* q, const float* x, ptrdiff_t stride, ptrdiff_t C,
                                      ptrdiff_t c, ptrdiff_t m, double k, double a, int lo,
                                      int hi) {
    const int size = lo + hi + 1;
    for (int j = 0; j + 1 < size; j++) q[j] = q[j + 1];
    q[size - 1] = _mm256_setzero_ps();
    if (c + hi < C) {
        const float* xn = x + (c + hi) * stride;
        __m256 v = fn_load8(xn, m);
        q[size - 1] = _mm256_mul_ps(v, v);
        __builtin_prefetch(xn + FN_LRN_STRIP_AHEAD, 0, 3);
    }
    __m256 s = q[0];
    for (int j = 1; j < size; j++) s = _mm256_add_ps(s, q[j]);
    return _mm256_fmadd_ps(_mm256_set1_ps((float)a), s, _mm256_set1_ps((float)k));
}

/* y of one strip: m <= 8 positions of C channel rows; fix: NaN outputs as the portable
 * route gives them (an infinite or NaN s, or a NaN x). Returns whether an output, before
 * any fix, was NaN. */
FN_LRN_STEP int fn_lrn_strip_forward(const float* x, float* y, ptrdiff_t stride, ptrdiff_t C,
                                     ptrdiff_t m, double k, double a, int checked, int fix,
                                     int lo, int hi) {
    __m256 nan = _mm256_setzero_ps(), q[FN_LRN_ROWS_MAX_SIZE];
    fn_lrn_strip_prime(q, x, stride, C, m, lo, hi);
    for (ptrdiff_t c = 0; c < C; c++) {
        __m256 s = fn_lrn_strip_scale(q, x, stride, C, c, m, k, a, lo, hi);
        __m256 xc = fn_load8(x + c * stride, m);
        __m256 v = _mm256_mul_ps(xc, fn_pow075_8(s, checked, NULL));
        int bad = fix ? fn_lrn_nan_mask(v, m) : 0;
        nan = _mm256_or_ps(nan, fn_nan_lanes(v));
        if (bad) {   /* an infinite or NaN s, or a NaN x: as the portable route gives them */
            float sv[8], xv[8], out[8];
            _mm256_storeu_ps(sv, s);
            _mm256_storeu_ps(xv, xc);
            _mm256_storeu_ps(out, v);
            for (int l = 0; l < 8; l++)
                if (bad >> l & 1) out[l] = xv[l] * fn_pow075_portable(sv[l], 0);
            v = _mm256_loadu_ps(out);
        }
        fn_store8(y + c * stride, v, m);
        __builtin_prefetch(y + c * stride + FN_LRN_STRIP_AHEAD, 1, 3);
    }
    return fn_lrn_nan_mask(nan, m);
}

/* dx of one strip (see fn_lrn_rows_backward075_f32): at step c, channel c's own part and
 * t join their rings and channel c - lo, whose mirrored window then has every t it needs,
 * gets its dx. fix: a NaN own or t is first formed as the portable route gives it. Returns
 * whether a dx was NaN (a NaN own or t always makes one). */
FN_LRN_STEP int fn_lrn_strip_backward(const float* x, const float* dy, float* dx,
                                      ptrdiff_t stride, ptrdiff_t C, ptrdiff_t m, double k,
                                      double a, float coef, int checked, int fix, int lo,
                                      int hi) {
    const int size = lo + hi + 1;
    __m256 q[FN_LRN_ROWS_MAX_SIZE];            /* q[j]: square of channel c - lo + j */
    __m256 t[FN_LRN_ROWS_MAX_SIZE];            /* t[j]: t of channel c - lo - hi + j */
    __m256 own[FN_LRN_ROWS_MAX_SIZE / 2 + 1];  /* own[j]: own part of channel c - lo + j */
    __m256 nan = _mm256_setzero_ps();
    fn_lrn_strip_prime(q, x, stride, C, m, lo, hi);
    for (int j = 0; j < size; j++) t[j] = _mm256_setzero_ps();
    for (int j = 0; j <= lo; j++) own[j] = _mm256_setzero_ps();
    for (ptrdiff_t c = 0; c < C + lo; c++) {
        for (int j = 0; j + 1 < size; j++) t[j] = t[j + 1];
        for (int j = 0; j < lo; j++) own[j] = own[j + 1];
        t[size - 1] = own[lo] = _mm256_setzero_ps();
        if (c < C) {
            __m256 s = fn_lrn_strip_scale(q, x, stride, C, c, m, k, a, lo, hi);
            __m256 p175, g = fn_load8(dy + c * stride, m), xc = fn_load8(x + c * stride, m);
            __builtin_prefetch(dy + c * stride + FN_LRN_STRIP_AHEAD, 0, 3);
            __m256 d = _mm256_mul_ps(g, fn_pow075_8(s, checked, &p175));
            __m256 tv = _mm256_mul_ps(_mm256_mul_ps(g, xc), p175);
            int bad = fix ? fn_lrn_nan_mask(_mm256_or_ps(fn_nan_lanes(d), fn_nan_lanes(tv)), m)
                          : 0;
            if (bad) {   /* as the portable route gives them, before any dx uses them */
                float sv[8], gv[8], xv[8], dv[8], t1[8];
                _mm256_storeu_ps(sv, s);
                _mm256_storeu_ps(gv, g);
                _mm256_storeu_ps(xv, xc);
                _mm256_storeu_ps(dv, d);
                _mm256_storeu_ps(t1, tv);
                for (int l = 0; l < 8; l++)
                    if (bad >> l & 1) {
                        dv[l] = gv[l] * fn_pow075_portable(sv[l], 0);
                        t1[l] = gv[l] * xv[l] * fn_pow075_portable(sv[l], 1);
                    }
                d = _mm256_loadu_ps(dv);
                tv = _mm256_loadu_ps(t1);
            }
            own[lo] = d;
            t[size - 1] = tv;
        }
        if (c >= lo) {
            ptrdiff_t j0 = c - lo;
            __m256 sum = t[0];
            for (int j = 1; j < size; j++) sum = _mm256_add_ps(sum, t[j]);
            __m256 v = _mm256_fnmadd_ps(_mm256_mul_ps(_mm256_set1_ps(coef),
                                                      fn_load8(x + j0 * stride, m)),
                                        sum, own[0]);
            nan = _mm256_or_ps(nan, fn_nan_lanes(v));   /* a NaN own or t reaches a dx */
            fn_store8(dx + j0 * stride, v, m);
            __builtin_prefetch(dx + j0 * stride + FN_LRN_STRIP_AHEAD, 1, 3);
        }
    }
    return fn_lrn_nan_mask(nan, m);
}

/* Whole strips with m = 8 as a constant (a variable m, even >= 8, kept fn_load8's
 * branch and buffer in the loop: backward 8.6 against 6.1 ms), then the rest. A strip
 * runs without the NaN fix-ups first (their test at every step cost 0.9 ms of 7.4) and
 * returns whether an output came out NaN; only then is it run again with them. The
 * outputs are written only, never read, so the second run gives what one would have. */
#define FN_LRN_STRIPS_FORWARD(x, y, stride, w, C, k, a, checked, lo, hi)                 \
    do {                                                                                 \
        ptrdiff_t i_ = 0;                                                                \
        for (; i_ + 8 <= (w); i_ += 8)                                                   \
            if (fn_lrn_strip_forward(x + i_, y + i_, stride, C, 8, k, a, checked, 0, lo,  \
                                     hi))                                                \
                fn_lrn_strip_forward(x + i_, y + i_, stride, C, 8, k, a, checked, 1, lo,  \
                                     hi);                                                \
        if (i_ < (w))                                                                    \
            fn_lrn_strip_forward(x + i_, y + i_, stride, C, (w) - i_, k, a, checked, 1,  \
                                 lo, hi);                                                \
    } while (0)
#define FN_LRN_STRIPS_BACKWARD(x, dy, dx, stride, w, C, k, a, coef, checked, lo, hi)     \
    do {                                                                                 \
        ptrdiff_t i_ = 0;                                                                \
        for (; i_ + 8 <= (w); i_ += 8)                                                   \
            if (fn_lrn_strip_backward(x + i_, dy + i_, dx + i_, stride, C, 8, k, a, coef, \
                                      checked, 0, lo, hi))                               \
                fn_lrn_strip_backward(x + i_, dy + i_, dx + i_, stride, C, 8, k, a, coef, \
                                      checked, 1, lo, hi);                               \
        if (i_ < (w))                                                                    \
            fn_lrn_strip_backward(x + i_, dy + i_, dx + i_, stride, C, (w) - i_, k, a,   \
                                  coef, checked, 1, lo, hi);                             \
    } while (0)
#define FN_LRN_STRIPS_SIZED_FORWARD(x, y, stride, w, C, k, a, lo, hi)                    \
    FN_LRN_STRIPS_FORWARD(x, y, stride, w, C, k, a, 0, lo, hi)
#define FN_LRN_STRIPS_SIZED_BACKWARD(x, dy, dx, stride, w, C, k, a, coef, lo, hi)        \
    FN_LRN_STRIPS_BACKWARD(x, dy, dx, stride, w, C, k, a, coef, 0, lo, hi)
#endif

/* y for positions [0, w) of C channel rows stride apart (channels-first memory) */
static inline void fn_lrn_planes_forward075_f32(const float* x, float* y, ptrdiff_t stride,
                                                ptrdiff_t w, ptrdiff_t C, int lo, int hi,
                                                double k, double a) {
#if defined(__AVX2__) && defined(__FMA__)
    if (fn_pow075_s_is_normal(k, a))
        fn_lrn_rows_sized(lo, hi, FN_LRN_STRIPS_SIZED_FORWARD, x, y, stride, w, C, k, a);
    else
        FN_LRN_STRIPS_FORWARD(x, y, stride, w, C, k, a, 1, lo, hi);
#else
    /* position by position, each a row of C values as the rows route sums it */
    float q[FN_LRN_ROWS_MAX_SIZE];
    const int size = lo + hi + 1;
    for (ptrdiff_t i = 0; i < w; i++) {
        for (int j = 0; j < size; j++) q[j] = 0;
        for (int j = 0; j < hi && j < C; j++) q[lo + 1 + j] = x[j * stride + i] * x[j * stride + i];
        for (ptrdiff_t c = 0; c < C; c++) {
            for (int j = 0; j + 1 < size; j++) q[j] = q[j + 1];
            q[size - 1] = c + hi < C ? x[(c + hi) * stride + i] * x[(c + hi) * stride + i] : 0;
            float s = q[0];
            for (int j = 1; j < size; j++) s += q[j];
            y[c * stride + i] =
                x[c * stride + i] * fn_pow075_portable(fmaf((float)a, s, (float)k), 0);
        }
    }
#endif
}

/* dx for positions [0, w) of C channel rows stride apart (channels-first memory) */
static inline void fn_lrn_planes_backward075_f32(const float* x, const float* dy, float* dx,
                                                 ptrdiff_t stride, ptrdiff_t w, ptrdiff_t C,
                                                 int lo, int hi, double k, double a,
                                                 float coef) {
#if defined(__AVX2__) && defined(__FMA__)
    if (fn_pow075_s_is_normal(k, a))
        fn_lrn_rows_sized(lo, hi, FN_LRN_STRIPS_SIZED_BACKWARD, x, dy, dx, stride, w, C, k, a,
                          coef);
    else
        FN_LRN_STRIPS_BACKWARD(x, dy, dx, stride, w, C, k, a, coef, 1, lo, hi);
#else
    float q[FN_LRN_ROWS_MAX_SIZE], t[FN_LRN_ROWS_MAX_SIZE], own[FN_LRN_ROWS_MAX_SIZE / 2 + 1];
    const int size = lo + hi + 1;
    for (ptrdiff_t i = 0; i < w; i++) {
        for (int j = 0; j < size; j++) q[j] = t[j] = 0;
        for (int j = 0; j <= lo; j++) own[j] = 0;
        for (int j = 0; j < hi && j < C; j++) q[lo + 1 + j] = x[j * stride + i] * x[j * stride + i];
        for (ptrdiff_t c = 0; c < C + lo; c++) {
            for (int j = 0; j + 1 < size; j++) q[j] = q[j + 1], t[j] = t[j + 1];
            for (int j = 0; j < lo; j++) own[j] = own[j + 1];
            q[size - 1] = c + hi < C ? x[(c + hi) * stride + i] * x[(c + hi) * stride + i] : 0;
            t[size - 1] = own[lo] = 0;
            if (c < C) {
                float s = q[0];
                for (int j = 1; j < size; j++) s += q[j];
                s = fmaf((float)a, s, (float)k);
                float g = dy[c * stride + i];
                own[lo] = g * fn_pow075_portable(s, 0);
                t[size - 1] = g * x[c * stride + i] * fn_pow075_portable(s, 1);
            }
            if (c >= lo) {
                float sum = t[0];
                for (int j = 1; j < size; j++) sum += t[j];
                dx[(c - lo) * stride + i] = own[0] - coef * x[(c - lo) * stride + i] * sum;
            }
        }
    }
#endif
}

/* Short float rows in groups: the moments of FN_LANE_ROWS = 8 rows of at most 64 values
 * at once (attention heads, QK-norm). Row by row, each short row's moments are one chain
 * of dependent steps (the pilot and its horizontal sum, a division, the centered sums,
 * two more horizontal sums, ...) that the next row waited for: LayerNorm forward on 4 Mi
 * floats in rows of 64 took 3.2 ms, 1.8 ms in groups (rows of 32: 4.8 -> 2.6 ms; 1
 * thread, C driver; at 96 values 1.1-1.3x, from 128 on slower, where the row-by-row order
 * measured faster). In a group the eight rows' block sums run one after the other,
 * independent, and their horizontal steps run together, lane-wise.
 * Every addition is the one-row route's, in the same order (the same block primitives,
 * then fn_wide_sum_f32's pairs), so the results are bitwise the same (test_layernorm.py
 * pins it). The backward takes a row group's gradient sums the same way
 * (fn_lane_grad_sums_f32), once its rows are dx'ed together (fn_group_backward_*):
 * LayerNorm backward, rows of 64, 6.3 -> 4.9 instructions per value (callgrind). That
 * backward is instruction-bound at 1 thread once its dx is streamed: layer A/B, quiet
 * rounds, 2.33-2.48 -> 2.08-2.34 ms. (Reverted once, measured 3.37-3.65 against 3.23-3.28
 * ms while every eight-row group still ended in a fence; row by row, before the groups,
 * 1.0-1.2x on a quiet machine but 0.75x with the other core busy.) */
#define FN_LANE_ROWS 8
#define FN_LANE_ROW_MAX 64

/* For each of eight one-block rows r: 0 + (fn_wide_sum_f32 of its part[r], widened, +
 * tail[r]), as fn_row_centered_sums_f32 adds it to a zeroed sum.
 * The parts are transposed first, so that vector l holds lane l of every row. */
static inline void fn_lane_row_sums_f32(const fn_v8f* part, const float* tail, double* out) {
    fn_v8f lane[8];
    FN_TRANSPOSE8(f32, (const float*)part, 8, (float*)lane, 8);
    fn_v4d zero = {0}, wide[2][8];                              /* [h][l]: rows 4h .. 4h + 3 */
    for (int l = 0; l < 8; l++) fn_widen_halves_f32(lane[l], wide[0][l], wide[1][l]);
    for (int h = 0; h < 2; h++) {
        fn_v4d t[8];
        fn_v4f tails;
        for (int l = 0; l < 8; l++) t[l] = zero + wide[h][l];
        memcpy(&tails, tail + 4 * h, sizeof tails);
        fn_v4d sum = zero + ((((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7])))
                             + __builtin_convertvector(tails, fn_v4d));
        memcpy(out + 4 * h, &sum, sizeof sum);
    }
}

/* Moments of the first FN_LANE_ROWS of `rows` rows of n values from x, as
 * fn_short_row_moments_f32 gives them: returns how many rows it did (FN_LANE_ROWS, or 0
 * when they do not fit a group). A row whose pilot is off center takes the one-row
 * route whole. */
static inline ptrdiff_t fn_lane_moments_f32(const float* x, ptrdiff_t rows, ptrdiff_t n,
                                            int centered, double* mean, double* m2) {
    if (rows < FN_LANE_ROWS || n > FN_LANE_ROW_MAX) return 0;
    float shift[FN_LANE_ROWS] = {0}, tail_d[FN_LANE_ROWS] = {0}, tail_dd[FN_LANE_ROWS] = {0};
    fn_v8f part_d[FN_LANE_ROWS], part_dd[FN_LANE_ROWS];
    double sum_d[FN_LANE_ROWS], sum_dd[FN_LANE_ROWS];
    if (centered)                     /* first all pilots: eight chains that overlap */
        for (int r = 0; r < FN_LANE_ROWS; r++) shift[r] = fn_row_pilot_f32(x + r * n, n);
    for (int r = 0; r < FN_LANE_ROWS; r++)
        fn_block_centered_parts_f32(x + r * n, n, shift[r], 0, part_d + r, part_dd + r,
                                    tail_d + r, tail_dd + r);
    fn_lane_row_sums_f32(part_d, tail_d, sum_d);
    fn_lane_row_sums_f32(part_dd, tail_dd, sum_dd);
    for (int r = 0; r < FN_LANE_ROWS; r++) {
        if (!centered) {
            mean[r] = 0;
            m2[r] = sum_dd[r];
        } else if (fn_moments_off_center(sum_d[r], sum_dd[r], (double)n)) {
            fn_block_moments_f32(x + r * n, 1, n, n, mean + r, m2 + r);
        } else {
            fn_moments_finish(shift[r], sum_d[r], sum_dd[r], (double)n, mean + r, m2 + r);
        }
    }
    return FN_LANE_ROWS;
}

/* double rows always take the one-row route */
#define fn_lane_moments_f64(x, rows, n, centered, mean, m2) 0

/* The gradient sums of FN_LANE_ROWS rows of n <= FN_LANE_ROW_MAX values (one block each)
 * at once, as fn_row_grad_sums_f32 gives them to zeroed sums: sum_g[r] and sum_gd[r]
 * of row r, with its mean's head and tail hi[r], lo[r]. Returns whether it did them
 * (0: not such rows; the caller takes them one by one). */
static inline int fn_lane_grad_sums_f32(const float* x, const float* dy, const float* w,
                                        ptrdiff_t rows, ptrdiff_t n, const float* hi,
                                        const float* lo, double* sum_g, double* sum_gd) {
    if (rows != FN_LANE_ROWS || n > FN_LANE_ROW_MAX) return 0;
    float tail_g[FN_LANE_ROWS] = {0}, tail_gd[FN_LANE_ROWS] = {0};
    fn_v8f part_g[FN_LANE_ROWS], part_gd[FN_LANE_ROWS];
    for (int r = 0; r < FN_LANE_ROWS; r++) {
        if (w)
            fn_block_grad_parts_f32(x + r * n, dy + r * n, w, n, hi[r], lo[r], part_g + r,
                                    part_gd + r, tail_g + r, tail_gd + r);
        else
            fn_block_grad_parts_f32(x + r * n, dy + r * n, NULL, n, hi[r], lo[r], part_g + r,
                                    part_gd + r, tail_g + r, tail_gd + r);
    }
    fn_lane_row_sums_f32(part_g, tail_g, sum_g);
    fn_lane_row_sums_f32(part_gd, tail_gd, sum_gd);
    return 1;
}
#define fn_lane_grad_sums_f64(x, dy, w, rows, n, hi, lo, sum_g, sum_gd) 0

/* Short rows: nrows LayerNorm/RMSNorm rows of n <= FN_SHORT_ROW values without
 * fusions, in one call, forward and backward. Per row exactly the general path's
 * arithmetic for a row that is one unit (the same fn_block_moments_*,
 * fn_store_row_stats, fn_affine_out_*, fn_row_grad_sums_* and fn_group_backward_* as
 * normalize_unit and backward_block in _rows.pxi), so results are the same either way;
 * here the row loop runs in C around the inlined primitives. In the
 * general path the per-row bookkeeping cost as much as the work: a 32-value
 * LayerNorm row took ~550 instructions forward, ~290 here. Longer rows stay on the
 * general path: at 512 and 768 values this loop measured 15-20% slower forward
 * (1 thread, 4 Mi values; at 128-384 values 10-30% faster). The forward takes the
 * moments of float rows of at most 64 values eight rows at a time (fn_lane_moments_f32),
 * the same bits.
 * centered = 0 (RMSNorm): mean 0, m2 = sum(x^2). */
#define FN_SHORT_ROW 384
#define FN_DEFINE_SHORT_ROWS(T, SUFFIX)                                                         \
    /* One row's moments: fn_block_moments_* (centered = 0: mean 0, m2 = sum(x^2)) */           \
    static inline void fn_short_row_moments_##SUFFIX(const T* x, ptrdiff_t n, int centered,     \
                                                     double* mean, double* m2) {                \
        double sum_d = 0;                                                                       \
        *mean = *m2 = 0;                                                                        \
        if (centered)                                                                           \
            fn_block_moments_##SUFFIX(x, 1, n, n, mean, m2);                                    \
        else                                                                                    \
            fn_row_centered_sums_##SUFFIX(x, n, 0, 0, &sum_d, m2);                              \
    }                                                                                           \
    static inline void fn_short_rows_forward_##SUFFIX(const T* x, T* y, const T* w, const T* b, \
                                                      ptrdiff_t nrows, ptrdiff_t n, int centered,\
                                                      double eps, double* mean, double* rstd,   \
                                                      double* var, int stream) {                \
        double row_mean[FN_LANE_ROWS], m2[FN_LANE_ROWS];                                        \
        for (ptrdiff_t r = 0; r < nrows;) {                                                     \
            ptrdiff_t rows = fn_lane_moments_##SUFFIX(x + r * n, nrows - r, n, centered,        \
                                                      row_mean, m2);                            \
            if (rows == 0) {                                  /* not in a group: one row */     \
                rows = 1;                                                                       \
                fn_short_row_moments_##SUFFIX(x + r * n, n, centered, row_mean, m2);            \
            }                                                                                   \
            for (ptrdiff_t k = 0; k < rows; k++, r++) {                                         \
                fn_store_row_stats(row_mean[k], m2[k], (double)n, eps, mean ? mean + r : NULL,  \
                                   rstd + r, var ? var + r : NULL);                             \
                T mean_hi = (T)row_mean[k], mean_lo = (T)(row_mean[k] - (double)mean_hi);       \
                fn_affine_out_##SUFFIX(x + r * n, y + r * n, w, b, n, mean_hi, mean_lo,         \
                                       (T)rstd[r], 0, stream);                                  \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
    /* Backward of rows [first, first + nrows) of a row block (backward_block in _rows.pxi):  \
       group by group (FN_ROW_GROUP rows from the block's first), the sums of g = dy * w and  \
       g * (x - mean) of each row, then the group's dx and weight/bias partials              \
       (fn_group_backward_*; acc: 2n doubles; stream: see there). */                        \
    static inline void fn_short_rows_backward_##SUFFIX(const T* x, const T* dy, T* dx,          \
                                                       const T* w, ptrdiff_t nrows, ptrdiff_t n,\
                                                       int centered, const double* mean,        \
                                                       const double* rstd, double* acc,         \
                                                       int stream) {                            \
        for (ptrdiff_t r0 = 0; r0 < nrows; r0 += FN_ROW_GROUP) {                                \
            ptrdiff_t rows = nrows - r0 < FN_ROW_GROUP ? nrows - r0 : FN_ROW_GROUP;             \
            double coef[2 * FN_ROW_GROUP];                                                      \
            double sum_g[FN_ROW_GROUP] = {0}, sum_gd[FN_ROW_GROUP] = {0};                       \
            T hi[FN_ROW_GROUP], lo[FN_ROW_GROUP];                                               \
            for (ptrdiff_t r = 0; r < rows; r++) {                                              \
                double row_mean = centered ? mean[r0 + r] : 0.0;                                \
                hi[r] = (T)row_mean;                                                            \
                lo[r] = (T)(row_mean - (double)hi[r]);                                          \
            }                                                                                   \
            if (!fn_lane_grad_sums_##SUFFIX(x + r0 * n, dy + r0 * n, w, rows, n, hi, lo, sum_g, \
                                            sum_gd))                                            \
                for (ptrdiff_t r = 0; r < rows; r++)                                            \
                    fn_row_grad_sums_##SUFFIX(x + (r0 + r) * n, dy + (r0 + r) * n, w, n, hi[r], \
                                              lo[r], sum_g + r, sum_gd + r);                    \
            for (ptrdiff_t r = 0; r < rows; r++)                                                \
                fn_row_backward_coefficients(rstd[r0 + r], sum_g[r], sum_gd[r], (double)n,      \
                                             centered, coef + 2 * r, coef + 2 * r + 1);         \
            fn_group_backward_##SUFFIX(x + r0 * n, dy + r0 * n, w, dx + r0 * n, rows, n, n,     \
                                       centered ? mean + r0 : NULL, rstd + r0, coef, NULL, acc, \
                                       n, stream);                                              \
        }                                                                                       \
    }                                                                                           \
    /* The same rows one by one (row_by_row in _rows.pxi): each row's dx right after its own  \
       sums, its partials kept in part (2n, zero on entry and on return) until the group's    \
       last row flushes them into acc; the same bits. Never streamed. */                      \
    static inline void fn_short_rows_backward_one_by_one_##SUFFIX(                             \
        const T* x, const T* dy, T* dx, const T* w, ptrdiff_t nrows, ptrdiff_t n, int centered, \
        const double* mean, const double* rstd, double* acc, T* part) {                         \
        for (ptrdiff_t r = 0; r < nrows; r++) {                                                 \
            double row_mean = centered ? mean[r] : 0.0, sum_g = 0, sum_gd = 0, coef[2];         \
            T hi = (T)row_mean, lo = (T)(row_mean - (double)hi);                                \
            fn_row_grad_sums_##SUFFIX(x + r * n, dy + r * n, w, n, hi, lo, &sum_g, &sum_gd);    \
            fn_row_backward_coefficients(rstd[r], sum_g, sum_gd, (double)n, centered, coef,     \
                                         coef + 1);                                             \
            int ends_group = r % FN_ROW_GROUP == FN_ROW_GROUP - 1 || r == nrows - 1;            \
            fn_group_backward_##SUFFIX(x + r * n, dy + r * n, w, dx + r * n, 1, n, n,           \
                                       centered ? mean + r : NULL, rstd + r, coef, part,        \
                                       ends_group ? acc : NULL, n, 0);                          \
        }                                                                                       \
    }
FN_DEFINE_SHORT_ROWS(float, f32)
FN_DEFINE_SHORT_ROWS(double, f64)
#undef FN_DEFINE_SHORT_ROWS

#endif /* FASTNORM_SIMD_H */
