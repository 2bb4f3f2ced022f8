# Shared numeric helpers for every kernel family.
#
# Statistics are computed per "unit": a block of at most UNIT_ELEMS values
# laid out as `nrows` runs of `ncols` contiguous values, `row_stride` apart.
# A unit is small enough to stay in L1/L2, so it is summed twice (mean, then
# centered sums) while memory is read once; units are then folded with
# Chan's parallel-variance merge in an order fixed by the shape alone.
#
# The innermost sums are the vectorized primitives of _simd.h (float64
# accumulators; see there why they are C).

from cython cimport floating
from libc.math cimport fabs

# Values per unit: 4096 float32 (16 KiB) or float64 (32 KiB) fit in L1/L2.
cdef enum:
    UNIT_ELEMS = 4096
    # Units of one reduction are split into at most this many stripes; a
    # stripe is the piece of work one thread takes. Fixed by the shape, never
    # by the thread count, so partial results always merge the same way.
    MAX_STRIPES = 16
    # Outputs (forward y, backward dx) of at least this size are written with
    # non-temporal stores (row and channels-first forwards: whole lines after a
    # short plain peel, fn_affine_out; channels-last rows and dx: 16-byte stores over
    # whole rows, fn_row_streamable in _simd.h): they would not stay in cache anyway,
    # and the stores then skip reading each output line first (a third of the
    # traffic). A/B in the benchmark's conditions (fresh
    # output per call, 32 MiB L3): streamed from 12 MiB up was 1.3-1.6x faster for
    # channels-last rows and GroupNorm/InstanceNorm dx, 1.2-1.5x for 16 MiB
    # InstanceNorm/GroupNorm/LayerNorm forwards; at 8 MiB plain stores were up to
    # 1.7x faster at 2 threads (input and output stay in cache), and below that always.
    # (An earlier "16 MiB ran 2x slower streamed" came from plain stores to reach
    # 32-byte alignment sharing lines with the streamed ones.) That was a Zen 4 VM; on a
    # Zen 3 VM whose caches keep less (same 32 MiB L3 reported), 12 MiB outputs streamed
    # against plain ran 1.26-1.67x faster at 1 thread and 1.11-1.37x at 2 (LayerNorm,
    # RMSNorm, GroupNorm both layouts, InstanceNorm, BatchNorm3d train/eval/backward;
    # kernels A/B, 8 interleaved rounds), and LayerNorm's 9 MiB 1.30-1.40x (6 MiB:
    # 0.95-1.02x). 12 MiB is where both machines gained. On an Intel Xeon (Sapphire Rapids
    # class) VM (300 MiB L3 reported), plain stores instead at 1 thread, warm caches: 16-24
    # MiB outputs 1.11-1.93x slower (BatchNorm2d/3d, GroupNorm, InstanceNorm, RMSNorm), the
    # rest 0.92-1.07x; at 2 threads mixed: backwards of 16-24 MiB 0.72-0.89x (faster plain),
    # forwards 0.93-1.28x; with caches flushed before each call, streamed stayed 1.07-1.24x
    # ahead at 2 threads too (kernels A/B, 8 interleaved rounds). Kept at 12 MiB.
    STREAM_BYTES = 12 << 20
    # Shortest contiguous run streamed by a forward (channels-first runs, rows, with or
    # without a fused activation). (Each thread fences once, fence_if; a fence per run
    # had cost 10x at 64 values.)
    STREAM_RUN_BYTES = 4096
    # Row forwards without an activation stream runs of this many bytes wherever they lie
    # (streams_runs in _rows.pxi): fn_affine_out streams only whole lines, so a run's two
    # partial end lines, shared with its neighbours, are the only plain ones. Kernels
    # A/B, 8 interleaved rounds, misaligned rows streamed against plain: LayerNorm rows of
    # 768 floats into a numpy out= (16 bytes off a line) 1.36x faster at 1 thread, 1.49x
    # at 2; of 520 floats (2080 bytes) 1.17x, 1.24x; of 260 and 130 floats 0.91x and 0.85x
    # (two plain lines in 17 and in 9), so shorter runs stream only as whole lines.
    STREAM_SPLIT_RUN_BYTES = 2048
    # Row forwards (LayerNorm/RMSNorm rows, GroupNorm/InstanceNorm runs) stream y from
    # runs of this many bytes when they are whole lines (streams_runs in _rows.pxi).
    # Kernels, 1 thread, x at numpy's page offset, y (and h) at the pool's, 16-64 MiB
    # outputs, against STREAM_RUN_BYTES: rows of 256-768 floats 1.05-1.16x faster (2
    # threads 1.11-1.39x), of 128 1.04x, GroupNorm(32) runs of 784 floats 1.27-1.28x,
    # InstanceNorm 1.05x; with a residual (h = x + r written too) rows of 128 floats 1.50-1.64x, 512
    # 1.11-1.20x, 768 1.05-1.13x, 256 0.98-1.01x.
    STREAM_ROW_BYTES = 512
    # LayerNorm/RMSNorm backward: dx of at least this size, in rows of at least
    # STREAM_DX_ROW_BYTES, is streamed (fn_group_backward's whole lines): x, dy and dx
    # then take 30 MiB and more, as much as the forward's x and y at STREAM_BYTES, and dx
    # would not stay in cache. Kernels A/B, 1 thread, medians of 200-300 calls: 12 MiB
    # (rows of 768) 1.06-1.23x faster, 24 MiB 1.14x; smaller, where dx could stay in
    # cache for its reader: 6 MiB 1.07x, 8 MiB (rows of 256-2048) 1.04-1.33x. Rows of 128
    # 0.97x, of 64 0.6-0.84x (a plain line, shared by neighbouring rows, in every four),
    # so shorter rows are streamed only when every row is whole lines; with one fence
    # per task instead of one per row group, (4,16,1024,64) into a line-aligned dx (the
    # layers' large outputs are, _memory.py) then runs 2.95 ms streamed against 2.90-3.03
    # plainly at 1 thread (instruction-bound), 2.28 against 3.30-3.33 ms at 2 threads.
    # (Row forwards streamed from this size ran slower: rows of 768, 6-24 MiB, 0.5-0.76x;
    # they stream from STREAM_BYTES.)
    STREAM_DX_BYTES = 10 << 20
    STREAM_DX_ROW_BYTES = 1024


cdef struct Moments:
    double count
    double mean
    double m2       # sum of squared deviations from the mean


cdef inline void chan_merge(Moments* acc, Moments part) noexcept nogil:
    """acc <- acc combined with part (Chan et al.'s pairwise update)."""
    cdef double n, delta
    if part.count == 0:
        return
    if acc.count == 0:
        acc[0] = part
        return
    n = acc.count + part.count
    delta = part.mean - acc.mean
    acc.mean = acc.mean + delta * (part.count / n)
    acc.m2 = acc.m2 + part.m2 + delta * delta * (acc.count * part.count / n)
    acc.count = n


cdef extern from "_simd.h" nogil:
    enum: FN_COLUMN_ROWS
    enum: FN_COLUMN_BLOCK
    Py_ssize_t fn_column_rows_per_lane(Py_ssize_t nc, Py_ssize_t stride)
    void fn_cols_moments_f32(const float* x, Py_ssize_t nrows, Py_ssize_t stride, Py_ssize_t nc,
                             double* mean, double* m2)
    void fn_cols_moments_f64(const double* x, Py_ssize_t nrows, Py_ssize_t stride, Py_ssize_t nc,
                             double* mean, double* m2)
    void fn_cols_shifted_sums_f32(const float* x, Py_ssize_t nrows, Py_ssize_t stride,
                                  Py_ssize_t nc, const double* shift, double* s1, double* s2)
    void fn_cols_shifted_sums_f64(const double* x, Py_ssize_t nrows, Py_ssize_t stride,
                                  Py_ssize_t nc, const double* shift, double* s1, double* s2)
    void fn_cols_grad_sums_f32(const float* x, const float* g, Py_ssize_t nrows, Py_ssize_t stride,
                               Py_ssize_t nc, const float* mean_hi, const float* mean_lo,
                               double* sum_g, double* sum_gd)
    void fn_cols_grad_sums_f64(const double* x, const double* g, Py_ssize_t nrows,
                               Py_ssize_t stride, Py_ssize_t nc, const double* mean_hi,
                               const double* mean_lo, double* sum_g, double* sum_gd)
    void fn_lrn_forward075_f64(const double* suffix, double* prefix, const float* grow,
                               const float* x, float* y, Py_ssize_t n, double k, double a,
                               const float* prefetch, bint stream)
    void fn_lrn_backward075_f64(const double* suffix, double* prefix, const float* grow,
                                const float* x, const float* dy, float* dx, float* t,
                                Py_ssize_t n, double k, double a, const float* prefetch,
                                const float* prefetch2)
    void fn_lrn_window_term_f64(const double* suffix, double* prefix, const float* grow,
                                const float* x, const float* own, float* dx, Py_ssize_t n,
                                float coef, bint stream)
    void fn_lrn_window_term_f32(const float* suffix, float* prefix, const float* grow,
                                const float* x, const float* own, float* dx, Py_ssize_t n,
                                float coef, bint stream)
    void fn_prefetch_lines(const void* p, Py_ssize_t bytes, int write)
    void fn_prefetch_lines_l2(const void* p, Py_ssize_t bytes)
    void* fn_line_twin(void* buf, const void* dst)
    void fn_stream_copy(void* dst, const void* src, size_t nbytes)
    void fn_transpose_f32(const float* s, Py_ssize_t ss, float* d, Py_ssize_t ds,
                          Py_ssize_t nr, Py_ssize_t nc, bint d_in_order)
    void fn_transpose_f64(const double* s, Py_ssize_t ss, double* d, Py_ssize_t ds,
                          Py_ssize_t nr, Py_ssize_t nc, bint d_in_order)
    void fn_lrn_tile_in_f32(const float* rows, float* tile, Py_ssize_t C, Py_ssize_t w)
    void fn_lrn_tile_in_f64(const double* rows, double* tile, Py_ssize_t C, Py_ssize_t w)
    void fn_lrn_tile_out_f32(const float* tile, float* rows, Py_ssize_t C, Py_ssize_t w)
    void fn_lrn_tile_out_f64(const double* tile, double* rows, Py_ssize_t C, Py_ssize_t w)
    enum: FN_LRN_ROWS_MAX_SIZE
    Py_ssize_t fn_lrn_rows_scratch(Py_ssize_t C)
    void fn_lrn_rows_forward075_f32(const float* x, float* y, Py_ssize_t nrows, Py_ssize_t C,
                                    int lo, int hi, double k, double a, float* scratch)
    void fn_lrn_rows_backward075_f32(const float* x, const float* dy, float* dx,
                                     Py_ssize_t nrows, Py_ssize_t C, int lo, int hi, double k,
                                     double a, float coef, float* scratch)
    void fn_lrn_planes_forward075_f32(const float* x, float* y, Py_ssize_t stride, Py_ssize_t w,
                                      Py_ssize_t C, int lo, int hi, double k, double a)
    void fn_lrn_planes_backward075_f32(const float* x, const float* dy, float* dx,
                                       Py_ssize_t stride, Py_ssize_t w, Py_ssize_t C, int lo,
                                       int hi, double k, double a, float coef)
    void fn_block_moments_f32(const float* x, Py_ssize_t nrows, Py_ssize_t ncols,
                              Py_ssize_t stride, double* mean, double* m2)
    void fn_block_moments_f64(const double* x, Py_ssize_t nrows, Py_ssize_t ncols,
                              Py_ssize_t stride, double* mean, double* m2)
    void fn_store_row_stats(double row_mean, double m2, double count, double eps, double* mean,
                            double* rstd, double* var)
    void fn_row_backward_coefficients(double rstd, double sum_g, double sum_gd, double n,
                                      int centered, double* k_d, double* c_0)
    void fn_row_centered_sums_f32(const float* x, Py_ssize_t n, float mean_hi, float mean_lo,
                                  double* sum_d, double* sum_dd)
    void fn_row_centered_sums_f64(const double* x, Py_ssize_t n, double mean_hi,
                                  double mean_lo, double* sum_d, double* sum_dd)
    void fn_row_grad_sums_f32(const float* x, const float* g, const float* w, Py_ssize_t n,
                              float mean_hi, float mean_lo, double* sum_g, double* sum_gd)
    void fn_row_grad_sums_f64(const double* x, const double* g, const double* w, Py_ssize_t n,
                              double mean_hi, double mean_lo, double* sum_g, double* sum_gd)
    void fn_channels_affine_f32(const float* x, float* y, Py_ssize_t rows, Py_ssize_t n,
                                const float* mean_hi, const float* scale, const float* shift,
                                int stream)
    void fn_channels_affine_f64(const double* x, double* y, Py_ssize_t rows, Py_ssize_t n,
                                const double* mean_hi, const double* scale,
                                const double* shift, int stream)
    void fn_channels_backward_f32(const float* x, const float* dy, float* dx, Py_ssize_t n,
                                  const float* mean_hi, const float* k_dy, const float* k_x,
                                  const float* k_0, int stream)
    void fn_channels_backward_f64(const double* x, const double* dy, double* dx, Py_ssize_t n,
                                  const double* mean_hi, const double* k_dy, const double* k_x,
                                  const double* k_0, int stream)
    void fn_affine_backward_f32(const float* x, const float* dy, float* dx, Py_ssize_t n,
                                float mean_hi, float mean_lo, float k_dy, float k_x, float k_0,
                                int stream)
    void fn_affine_backward_f64(const double* x, const double* dy, double* dx, Py_ssize_t n,
                                double mean_hi, double mean_lo, double k_dy, double k_x,
                                double k_0, int stream)
    void fn_affine_out_f32(const float* x, float* y, const float* w, const float* b,
                           Py_ssize_t n, float mean_hi, float mean_lo, float scale, float shift,
                           int stream)
    void fn_affine_out_f64(const double* x, double* y, const double* w, const double* b,
                           Py_ssize_t n, double mean_hi, double mean_lo, double scale,
                           double shift, int stream)
    enum: FN_SHORT_ROW
    void fn_short_rows_forward_f32(const float* x, float* y, const float* w, const float* b,
                                   Py_ssize_t nrows, Py_ssize_t n, int centered, double eps,
                                   double* mean, double* rstd, double* var, int stream)
    void fn_short_rows_forward_f64(const double* x, double* y, const double* w, const double* b,
                                   Py_ssize_t nrows, Py_ssize_t n, int centered, double eps,
                                   double* mean, double* rstd, double* var, int stream)
    void fn_short_rows_backward_f32(const float* x, const float* dy, float* dx, const float* w,
                                    Py_ssize_t nrows, Py_ssize_t n, int centered,
                                    const double* mean, const double* rstd, double* acc,
                                    int stream)
    void fn_short_rows_backward_one_by_one_f32(const float* x, const float* dy, float* dx,
                                               const float* w, Py_ssize_t nrows, Py_ssize_t n,
                                               int centered, const double* mean,
                                               const double* rstd, double* acc, float* part)
    void fn_short_rows_backward_f64(const double* x, const double* dy, double* dx,
                                    const double* w, Py_ssize_t nrows, Py_ssize_t n,
                                    int centered, const double* mean, const double* rstd,
                                    double* acc, int stream)
    void fn_short_rows_backward_one_by_one_f64(const double* x, const double* dy, double* dx,
                                               const double* w, Py_ssize_t nrows, Py_ssize_t n,
                                               int centered, const double* mean,
                                               const double* rstd, double* acc, double* part)
    void fn_stream_fence()
    enum: FN_ROW_GROUP
    void fn_group_backward_f32(const float* x, const float* g, const float* w, float* dx,
                               Py_ssize_t nrows, Py_ssize_t stride, Py_ssize_t n,
                               const double* mean, const double* rstd, const double* coef,
                               float* part, double* acc, Py_ssize_t at, int stream)
    void fn_group_backward_f64(const double* x, const double* g, const double* w, double* dx,
                               Py_ssize_t nrows, Py_ssize_t stride, Py_ssize_t n,
                               const double* mean, const double* rstd, const double* coef,
                               double* part, double* acc, Py_ssize_t at, int stream)


cdef inline void split_hi_lo(double value, floating* hi, floating* lo) noexcept nogil:
    """value ~= hi + lo in the working precision: subtracting hi then lo keeps
    float32 data near a large mean exact (x - hi is exact by Sterbenz' lemma)."""
    hi[0] = <floating>value
    lo[0] = <floating>(value - <double>hi[0])


cdef inline void cols_moments(const floating* x, Py_ssize_t nrows, Py_ssize_t stride,
                              Py_ssize_t nc, double* mean, double* m2) noexcept nogil:
    """Exact per-channel mean and m2 of at most
    FN_COLUMN_ROWS * fn_column_rows_per_lane(nc, stride) rows of nc <= FN_COLUMN_BLOCK channels."""
    if floating is float:
        fn_cols_moments_f32(x, nrows, stride, nc, mean, m2)
    else:
        fn_cols_moments_f64(x, nrows, stride, nc, mean, m2)


cdef inline void cols_shifted_sums(const floating* x, Py_ssize_t nrows, Py_ssize_t stride,
                                   Py_ssize_t nc, const double* shift, double* s1,
                                   double* s2) noexcept nogil:
    """Per channel c, over at most FN_COLUMN_ROWS * fn_column_rows_per_lane rows:
    add sum(x - shift[c]) and sum((x - shift[c])**2); shift[c] must be representable in
    the working precision."""
    if floating is float:
        fn_cols_shifted_sums_f32(x, nrows, stride, nc, shift, s1, s2)
    else:
        fn_cols_shifted_sums_f64(x, nrows, stride, nc, shift, s1, s2)


cdef inline void cols_grad_sums(const floating* x, const floating* dy, Py_ssize_t nrows,
                                Py_ssize_t stride, Py_ssize_t nc, const floating* mean_hi,
                                const floating* mean_lo, double* sum_dy,
                                double* sum_dy_xmu) noexcept nogil:
    """Per channel c, over at most FN_COLUMN_ROWS * fn_column_rows_per_lane rows:
    add sum(dy) and sum(dy * (x - mean[c])), the mean given as head + tail
    (split_hi_lo)."""
    if floating is float:
        fn_cols_grad_sums_f32(x, dy, nrows, stride, nc, mean_hi, mean_lo, sum_dy, sum_dy_xmu)
    else:
        fn_cols_grad_sums_f64(x, dy, nrows, stride, nc, mean_hi, mean_lo, sum_dy, sum_dy_xmu)


cdef inline void row_centered_sums(const floating* x, Py_ssize_t n, floating shift,
                                   double* sum_d, double* sum_dd) noexcept nogil:
    """Add sum(x - shift) and sum((x - shift)**2) over n contiguous values."""
    if floating is float:
        fn_row_centered_sums_f32(x, n, shift, 0.0, sum_d, sum_dd)
    else:
        fn_row_centered_sums_f64(x, n, shift, 0.0, sum_d, sum_dd)


cdef inline void row_grad_sums(const floating* x, const floating* dy, const floating* w,
                               Py_ssize_t n, floating mean_hi, floating mean_lo,
                               double* sum_g, double* sum_gd) noexcept nogil:
    """Add sum(dy*w) and sum(dy*w*(x - mean)) over n contiguous values (w NULL: ones)."""
    if floating is float:
        fn_row_grad_sums_f32(x, dy, w, n, mean_hi, mean_lo, sum_g, sum_gd)
    else:
        fn_row_grad_sums_f64(x, dy, w, n, mean_hi, mean_lo, sum_g, sum_gd)


cdef inline void channels_affine(const floating* x, floating* y, Py_ssize_t rows,
                                 Py_ssize_t n, const floating* mean_hi, const floating* scale,
                                 const floating* shift, bint stream=False) noexcept nogil:
    """Channels-last rows (rows whole rows of n channels, or one row's channel range):
    y = (x - mean_hi) * scale + shift with parameters per channel (x * scale + shift
    when mean_hi is NULL); stream: non-temporal stores (same values; fence after)."""
    if floating is float:
        fn_channels_affine_f32(x, y, rows, n, mean_hi, scale, shift, stream)
    else:
        fn_channels_affine_f64(x, y, rows, n, mean_hi, scale, shift, stream)


cdef inline void channels_backward(const floating* x, const floating* dy, floating* dx,
                                   Py_ssize_t n, const floating* mean_hi, const floating* k_dy,
                                   const floating* k_x, const floating* k_0,
                                   bint stream=False) noexcept nogil:
    """One channels-last row: dx = k_dy * dy + k_x * (x - mean_hi) + k_0, coefficients per
    channel, the mean's tail folded into k_0 (k_0 - k_x * mean_lo); dx may be dy.
    stream: non-temporal stores (same values; fence after)."""
    if floating is float:
        fn_channels_backward_f32(x, dy, dx, n, mean_hi, k_dy, k_x, k_0, stream)
    else:
        fn_channels_backward_f64(x, dy, dx, n, mean_hi, k_dy, k_x, k_0, stream)


cdef inline void affine_coefficients(double mean, double scale, double shift, floating* hi,
                                     floating* scale_out, floating* shift_out) noexcept nogil:
    """Coefficients of z = (x - mean) * scale + shift for channels_affine, as exact as
    ((x - hi) - lo) * scale + shift: the mean's tail lo folds into the shift. hi is 0
    (the whole mean folds in) when |mean * scale| <= 4: z = fma(x, scale, shift') then
    errs by under an ulp of a value of that size, and rows whose channels all have
    hi = 0 skip the subtraction (see rows_affine)."""
    cdef floating lo
    if fabs(mean * scale) <= 4.0:
        hi[0] = 0
        shift_out[0] = <floating>(shift - mean * scale)
    else:
        split_hi_lo(mean, hi, &lo)
        shift_out[0] = <floating>(shift - <double>lo * scale)
    scale_out[0] = <floating>scale


cdef inline void fold_mean_tail(double mean, double k_x, double k_0, floating* hi,
                                floating* k_0_out) noexcept nogil:
    """hi and k_0 for channels_backward, from dx = ... + k_x * (x - mean) + k_0: the mean's
    head hi, and its tail folded into k_0 (k_x * (x - mean) = k_x * (x - hi) - k_x * (mean
    - hi), the tail taken in float64)."""
    hi[0] = <floating>mean
    k_0_out[0] = <floating>(k_0 - k_x * (mean - <double>hi[0]))


cdef inline void fence_if(bint stream) noexcept nogil:
    """Once per thread after its last non-temporal store of a parallel loop (inside a
    `with parallel()` block, after the prange), never per run: C driver, 16 MiB streamed
    at 1 thread, a fence every 12 KiB cost 28%, every 4 KiB 72%, every 2 KiB 2.2x."""
    if stream:
        fn_stream_fence()


cdef inline void run_affine_out(const floating* x, floating* y, const floating* w,
                                const floating* b, Py_ssize_t n, floating mean_hi,
                                floating mean_lo, floating scale, floating shift,
                                bint stream) noexcept nogil:
    """y = ((x - mean_hi) - mean_lo) * scale * w + b (w, b per element), or
    ((x - mean_hi) - mean_lo) * scale + shift when w is NULL; stream: non-temporal
    stores (same values; see fn_affine_out in _simd.h)."""
    if floating is float:
        fn_affine_out_f32(x, y, w, b, n, mean_hi, mean_lo, scale, shift, stream)
    else:
        fn_affine_out_f64(x, y, w, b, n, mean_hi, mean_lo, scale, shift, stream)


cdef inline void group_backward(const floating* x, const floating* g, const floating* w,
                                floating* dx, Py_ssize_t nrows, Py_ssize_t stride, Py_ssize_t n,
                                const double* mean, const double* rstd, const double* coef,
                                floating* part, double* acc, Py_ssize_t at,
                                bint stream) noexcept nogil:
    """dx of n values of nrows <= FN_ROW_GROUP rows of a row group (stride apart), and their
    weight/bias partials, added to part[0:n], part[at:at+n] (part NULL: the rows are the
    whole group); acc not NULL (the rows end the group): the partials then go into acc
    (same layout); stream: dx's whole lines written non-temporally (the caller fences,
    fence_if). See fn_group_backward_* in _simd.h."""
    if floating is float:
        fn_group_backward_f32(x, g, w, dx, nrows, stride, n, mean, rstd, coef, part, acc, at,
                              stream)
    else:
        fn_group_backward_f64(x, g, w, dx, nrows, stride, n, mean, rstd, coef, part, acc, at,
                              stream)


cdef inline void short_rows_backward(const floating* x, const floating* dy, floating* dx,
                                     const floating* w, Py_ssize_t nrows, Py_ssize_t n,
                                     bint centered, const double* mean, const double* rstd,
                                     double* acc, floating* part, bint one_by_one,
                                     bint stream) noexcept nogil:
    """Backward of nrows short LayerNorm/RMSNorm rows from a row block's first: in row
    groups, or one_by_one through part (2n zeros). See fn_short_rows_backward_* in _simd.h."""
    if floating is float:
        if one_by_one:
            fn_short_rows_backward_one_by_one_f32(x, dy, dx, w, nrows, n, centered, mean, rstd,
                                                  acc, part)
        else:
            fn_short_rows_backward_f32(x, dy, dx, w, nrows, n, centered, mean, rstd, acc, stream)
    else:
        if one_by_one:
            fn_short_rows_backward_one_by_one_f64(x, dy, dx, w, nrows, n, centered, mean, rstd,
                                                  acc, part)
        else:
            fn_short_rows_backward_f64(x, dy, dx, w, nrows, n, centered, mean, rstd, acc, stream)


cdef inline double row_sum_squares(const floating* x, Py_ssize_t n) noexcept nogil:
    """sum(x**2) over n contiguous values."""
    cdef double sum_d = 0.0, sum_dd = 0.0
    if floating is float:
        fn_row_centered_sums_f32(x, n, 0.0, 0.0, &sum_d, &sum_dd)
    else:
        fn_row_centered_sums_f64(x, n, 0.0, 0.0, &sum_d, &sum_dd)
    return sum_dd


cdef inline Moments block_moments(const floating* x, Py_ssize_t nrows, Py_ssize_t ncols,
                                  Py_ssize_t row_stride) noexcept nogil:
    """Moments of a block that stays in cache (nrows runs of ncols contiguous values,
    row_stride apart), centered in full precision, in one pass as a rule (see
    fn_block_moments_* in _simd.h, which the short-rows kernels share)."""
    cdef Moments m
    m.count = <double>(nrows * ncols)
    m.mean = 0.0
    m.m2 = 0.0
    if nrows * ncols == 0:
        return m
    if floating is float:
        fn_block_moments_f32(x, nrows, ncols, row_stride, &m.mean, &m.m2)
    else:
        fn_block_moments_f64(x, nrows, ncols, row_stride, &m.mean, &m.m2)
    return m


cdef inline void run_add(const floating* a, const floating* b, floating* out,
                         Py_ssize_t n) noexcept nogil:
    """out = a + b over n contiguous values (out may be a or b: a fused residual add,
    or a residual stream's gradient added to dx)."""
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = a[i] + b[i]


cdef inline void run_affine_backward(const floating* x, const floating* dy, floating* dx,
                                     Py_ssize_t n, floating mean_hi, floating mean_lo,
                                     floating k_dy, floating k_x, floating k_0,
                                     bint stream=False) noexcept nogil:
    """dx = k_dy * dy + (k_x * (x - mean) + k_0) over n contiguous values (dx may be dy);
    stream: non-temporal stores (same values; see fn_affine_backward in _simd.h)."""
    if floating is float:
        fn_affine_backward_f32(x, dy, dx, n, mean_hi, mean_lo, k_dy, k_x, k_0, stream)
    else:
        fn_affine_backward_f64(x, dy, dx, n, mean_hi, mean_lo, k_dy, k_x, k_0, stream)


cdef inline Py_ssize_t stripe_start(Py_ssize_t n_units, Py_ssize_t n_stripes,
                                     Py_ssize_t g) noexcept nogil:
    """First unit of stripe g: stripe g is units [stripe_start(g), stripe_start(g + 1)),
    an even split fixed by the shape.

    (A value, not out-parameters: inside prange, Cython makes a variable private
    to each thread only when the loop body assigns it directly. Never hand the
    address of a loop-local variable to a helper there: it would be shared.)"""
    return g * n_units // n_stripes
