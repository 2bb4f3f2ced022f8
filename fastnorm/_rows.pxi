# Per-row kernel family: statistics over each row of a C-contiguous (R, D)
# array (LayerNorm, RMSNorm; GroupNorm and InstanceNorm on contiguous (N, C, *)
# memory), plus the channels-last variant of GroupNorm/InstanceNorm.
#
# A row is `runs` runs of S contiguous values:
#   * elementwise affine (LayerNorm, RMSNorm): one run of D values, an affine
#     parameter per element;
#   * per-channel affine (GroupNorm, InstanceNorm = GroupNorm with G = C): row
#     r is (n, group) and run j is channel c = (r % G) * runs + j, whose S
#     spatial values share weight[c] and bias[c].
# RMSNorm rows are not centered: their "mean" is 0 and m2 is sum(x**2).
#
# Units: a row is cut into contiguous units of at most UNIT_ELEMS values:
#   S >= UNIT_ELEMS: a unit is a piece of UNIT_ELEMS values of one run;
#   S <  UNIT_ELEMS: a unit is UNIT_ELEMS // S whole runs.
# A unit's moments are exact (block_moments: float64 totals of centered
# working-precision sums), units are merged with Chan's formula. Every per-row
# result is folded over units in unit order, so it depends on the shape only.
# Two strategies compute exactly the same arithmetic:
#   * by row (many rows): a thread takes whole rows, statistics then the
#     elementwise pass while the row is still in cache (read once, write once);
#   * by unit (few long rows): every (row, unit) pair is a task; partial
#     results are stored and folded in unit order, so no core idles.
# Short LayerNorm/RMSNorm rows (at most FN_SHORT_ROW values, no fusion) take the
# by-row strategy through fn_short_rows_* in _simd.h: the same per-row
# arithmetic in one C loop over a task's rows (takes_short_rows).
# Backward uses centered sums: sum(dy*w) and sum(dy*w*(x - mean)) per row.
#
# Fusions (every strategy, same arithmetic):
#   * activation act (RowGeom.act, _activations.pxd): forward forms z in the
#     output unit, then y = act(z) while the unit is in L1 (a streamed output:
#     in an L1 scratch, then copied out with non-temporal stores). Backward
#     recomputes z from x into dx's unit, turns it into g = dy * act'(z) there,
#     and g takes dy's place in the sums and the dx formula (computed in place).
#   * residual (LayerNorm/RMSNorm): forward reads x and r, writes h = x + r
#     unit by unit and takes the statistics of h from the unit just written,
#     then normalizes h (streamed rows of 1-8 KiB: h formed in an L1 scratch and
#     streamed out, forward_row_streamed_h); backward adds grad_h to each unit of
#     dx it forms.
# Weight/bias gradients: elementwise mode sums dy*xhat and dy over the rows of
# at most MAX_STRIPES row blocks fixed by the shape (working precision over
# ROW_GROUP rows, then float64 partials per block, folded in block order);
# per-channel mode keeps per-(row, run) float64 sums and folds them over the
# batch in order. Either way the result never depends on the thread count.
#
# Public entry points take NumPy arrays rather than typed memoryviews:
# acquiring a memoryview costs ~0.4 us per argument, which would dominate a
# (1, 1024) LayerNorm call. They trust their inputs (the Python layer checks
# them): C-contiguous, data and parameters of one float dtype, statistics
# float64, sizes as documented; they never raise and run without the GIL.
#   row_forward            IN x (, residual), weight, bias   OUT y, mean, rstd (, var, h)
#   row_backward           IN x, dy, weight, mean, rstd (, bias, grad_h)
#                          OUT dx, grad weight, grad bias
#   groups_cl_forward      channels-last (N, S, C) twin of row_forward for GroupNorm
#   groups_cl_backward     channels-last twin of row_backward for GroupNorm

cimport numpy as cnp
from cython.parallel cimport parallel, prange, threadid

from fastnorm._activations cimport ACT_NONE, ACT_RELU, run_affine_act, run_affine_act_grad

from fastnorm._common cimport (
    FN_ROW_GROUP, FN_SHORT_ROW, MAX_STRIPES, STREAM_BYTES, STREAM_DX_BYTES, STREAM_DX_ROW_BYTES,
    STREAM_ROW_BYTES, STREAM_RUN_BYTES, STREAM_SPLIT_RUN_BYTES, UNIT_ELEMS, Moments,
    affine_coefficients, block_moments, chan_merge, fn_row_backward_coefficients,
    fn_short_rows_forward_f32, fence_if, fn_short_rows_forward_f64, fn_store_row_stats,
    fold_mean_tail, fn_line_twin, fn_stream_copy, group_backward, row_grad_sums, row_sum_squares,
    run_add, run_affine_backward,
    short_rows_backward, split_hi_lo, stripe_start,
)

cnp.import_array()

cdef enum:
    # Elementwise weight/bias gradient partials are summed over this many rows in
    # working precision before going into float64 (fewer stores than float64 per row);
    # the rows of such a group are dx'ed together when they are at most GROUP_ROW_BYTES
    # long (fn_group_backward_* in _simd.h), longer ones one by one (backward_block)
    ROW_GROUP = FN_ROW_GROUP
    # Rows per task of the short-rows forward (takes_short_rows)
    SHORT_ROWS_PER_TASK = 64
    # A streamed residual forward writes h through an L1 scratch (forward_row_streamed_h)
    # for whole-line rows of this many bytes: kernels, 1 thread, x and r at numpy's page
    # offset, h and y at the pool's, 16-32 MiB each, against h stored plainly and read
    # back: rows of 256 floats 1.81x faster, 512 1.36x, 768 1.13-1.14x (2 threads
    # 1.02-1.10x), 1024 1.19x, 2048 1.07x; rows of 128 0.96-0.98x, 4096 0.97-0.99x
    # (scratch, x and r then overflow L1) and 1500 (not whole lines) 0.95-0.97x store h
    # plainly.
    STREAMED_H_MIN_BYTES = 1024
    STREAMED_H_MAX_BYTES = 8192
    # A forward with an activation, by row, prefetches row r + 1 into L2 while it
    # activates row r (RowGeom.prefetch_next) for rows of at most this many bytes: both
    # rows then stay in L2 (1 MiB here).
    PREFETCH_ROW_BYTES = 256 << 10
    # Elementwise rows of more than GROUP_ROW_BYTES are dx'ed one by one (backward_block),
    # those of at most ROW_BY_ROW_BYTES also never streamed (row_by_row)
    GROUP_ROW_BYTES = 512
    ROW_BY_ROW_BYTES = 2048


# ---------------------------------------------------------------- geometry

cdef struct RowGeom:
    Py_ssize_t R, D, runs, S, G
    bint per_channel, centered
    # units: unit_runs whole runs of S values, or pieces of unit_cols values
    Py_ssize_t unit_runs, unit_cols, units_per_run, n_units
    bint stream     # output (forward y, backward dx) written with non-temporal stores:
                    # see STREAM_BYTES and STREAM_DX_BYTES
    int act         # fused activation code (ACT_NONE: none)
    bint prefetch_next  # forward: see forward_row
    bint row_by_row # backward: see row_by_row()


cdef inline RowGeom row_geom(Py_ssize_t R, Py_ssize_t runs, Py_ssize_t S, Py_ssize_t G,
                             bint per_channel, bint centered) noexcept nogil:
    cdef RowGeom g
    g.R = R
    g.runs = runs
    g.S = S
    g.D = runs * S
    g.G = G
    g.per_channel = per_channel
    g.centered = centered
    if S >= UNIT_ELEMS:
        g.unit_cols = UNIT_ELEMS
        g.unit_runs = 1
        g.units_per_run = (S + UNIT_ELEMS - 1) // UNIT_ELEMS
    else:
        g.unit_cols = S
        g.unit_runs = max(1, UNIT_ELEMS // max(S, 1))
        g.units_per_run = 1
    g.n_units = ((runs + g.unit_runs - 1) // g.unit_runs) * g.units_per_run
    g.stream = False
    g.act = ACT_NONE
    g.prefetch_next = False
    g.row_by_row = False
    return g


cdef inline void unit_extent(RowGeom* g, Py_ssize_t u, Py_ssize_t* j0, Py_ssize_t* nruns,
                             Py_ssize_t* s0, Py_ssize_t* ncols) noexcept nogil:
    """Unit u covers runs [j0, j0 + nruns) x columns [s0, s0 + ncols) of its row;
    it is contiguous (several runs only when they are whole)."""
    if g.units_per_run == 1:    # whole runs (every short row): no integer division
        j0[0] = u * g.unit_runs
        s0[0] = 0
    else:
        j0[0] = (u // g.units_per_run) * g.unit_runs
        s0[0] = (u % g.units_per_run) * g.unit_cols
    nruns[0] = min(g.runs, j0[0] + g.unit_runs) - j0[0]
    ncols[0] = min(g.S, s0[0] + g.unit_cols) - s0[0]


cdef inline bint split_by_unit(RowGeom* g, int n_threads) noexcept nogil:
    """Few long rows: share each row between threads (same results either way)."""
    return n_threads > 1 and g.n_units > 1 and g.R < 4 * n_threads


# ------------------------------------------------------------- statistics

cdef inline Moments unit_moments(const floating* x, Py_ssize_t n, bint centered) noexcept nogil:
    """Moments of n contiguous values; uncentered (RMSNorm): mean 0, m2 = sum(x**2)."""
    cdef Moments m
    if centered:
        return block_moments(x, 1, n, n)
    m.count = <double>n
    m.mean = 0.0
    m.m2 = row_sum_squares(x, n)
    return m


cdef inline Moments row_unit_moments(const floating* x, const floating* res, floating* h,
                                     RowGeom* g, Py_ssize_t r, Py_ssize_t u) noexcept nogil:
    """Moments of unit u of row r of x; with a residual (res not NULL), of the unit
    of h = x + res, written first (it is then in L1 for the moments)."""
    cdef Py_ssize_t j0, nruns, s0, ncols, at
    unit_extent(g, u, &j0, &nruns, &s0, &ncols)
    at = r * g.D + j0 * g.S + s0
    if res == NULL:
        return unit_moments(x + at, nruns * ncols, g.centered)
    run_add(x + at, res + at, h + at, nruns * ncols)
    return unit_moments(h + at, nruns * ncols, g.centered)


cdef inline const floating* row_of(const floating* a, Py_ssize_t r,
                                   Py_ssize_t D) noexcept nogil:
    """Row r of an optional (R, D) array (NULL when absent)."""
    if a == NULL:
        return NULL
    return a + r * D


cdef inline void store_row_stats(Moments m, double eps, Py_ssize_t r, double* mean, double* rstd,
                                 double* var) noexcept nogil:
    """Biased variance m2/D and rstd = 1/sqrt(var + eps) of row r (mean/var may be NULL)."""
    fn_store_row_stats(m.mean, m.m2, m.count, eps, NULL if mean == NULL else mean + r, rstd + r,
                       NULL if var == NULL else var + r)


# ------------------------------------------------------ elementwise steps

cdef inline void apply_unit(const floating* xrow, floating* yrow, RowGeom* g, Py_ssize_t r,
                            Py_ssize_t u, const floating* w, const floating* b, double mean,
                            double rstd) noexcept nogil:
    """y = act(z) over unit u of row r: the one place where a row's output is formed."""
    cdef Py_ssize_t j0, nruns, s0, ncols
    unit_extent(g, u, &j0, &nruns, &s0, &ncols)
    normalize_unit(xrow, yrow + j0 * g.S + s0, g, r, u, w, b, mean, rstd, g.act, g.stream)


cdef inline void act_grad_unit(const floating* xrow, const floating* dyrow, floating* grow,
                               RowGeom* g, Py_ssize_t r, Py_ssize_t u, const floating* w,
                               const floating* b, double mean, double rstd) noexcept nogil:
    """g = dy * act'(z) over unit u of row r, z recomputed from x in the same sweep."""
    cdef Py_ssize_t j0, nruns, s0, ncols, at
    unit_extent(g, u, &j0, &nruns, &s0, &ncols)
    at = j0 * g.S + s0
    normalize_unit(xrow, grow + at, g, r, u, w, b, mean, rstd, g.act, False, dyrow + at)


cdef inline void normalize_unit(const floating* xrow, floating* z, RowGeom* g, Py_ssize_t r,
                                Py_ssize_t u, const floating* w, const floating* b, double mean,
                                double rstd, int act, bint stream,
                                const floating* dy=NULL) noexcept nogil:
    """z = act((x - mean) * rstd * weight + bias) over unit u of row r, into z[0:unit's
    size] (the unit's place in the output); stream: non-temporal stores. Given dy (the
    unit's, like z): z = dy * act'(...) instead, the backward's g."""
    cdef Py_ssize_t j0, nruns, s0, ncols, j, at, c0
    cdef Py_ssize_t ahead = g.D if g.prefetch_next and r + 1 < g.R else 0
    cdef floating mean_hi, mean_lo
    split_hi_lo(mean, &mean_hi, &mean_lo)
    unit_extent(g, u, &j0, &nruns, &s0, &ncols)
    at = j0 * g.S + s0
    if not g.per_channel:
        if dy == NULL:
            run_affine_act(xrow + at, z, w + at, b + at, ncols, mean_hi, mean_lo,
                           <floating>rstd, 0, act, stream, ahead)
        else:
            run_affine_act_grad(xrow + at, dy, z, w + at, b + at, ncols, mean_hi, mean_lo,
                                <floating>rstd, 0, act)
        return
    c0 = (r % g.G) * g.runs + j0
    for j in range(nruns):
        if dy == NULL:
            run_affine_act(xrow + at + j * g.S, z + j * g.S, <const floating*>NULL,
                           <const floating*>NULL, ncols, mean_hi, mean_lo,
                           <floating>(rstd * w[c0 + j]), b[c0 + j], act, stream, ahead)
        else:
            run_affine_act_grad(xrow + at + j * g.S, dy + j * g.S, z + j * g.S,
                                <const floating*>NULL, <const floating*>NULL, ncols, mean_hi,
                                mean_lo, <floating>(rstd * w[c0 + j]), b[c0 + j], act)


cdef inline void unit_grad_sums(const floating* xrow, const floating* dyrow, floating* dxrow,
                                RowGeom* g, Py_ssize_t r, Py_ssize_t u, const floating* w,
                                const floating* b, double mean, double rstd,
                                double* sums) noexcept nogil:
    """Add unit u's gradient sums into `sums`: elementwise mode, sums[0:2] +=
    (sum(dy*w), sum(dy*w*(x-mean))); per-channel mode, for each run piece,
    sums[2*slot:2*slot+2] += (sum(dy), sum(dy*(x-mean))), slot = the run's
    piece index j * units_per_run + (u % units_per_run). With an activation,
    g = dy * act'(z) is formed in dx's unit first and summed instead of dy."""
    cdef Py_ssize_t j0, nruns, s0, ncols, j, at, slot
    cdef floating mean_hi, mean_lo
    if g.act != ACT_NONE:
        act_grad_unit(xrow, dyrow, dxrow, g, r, u, w, b, mean, rstd)
        dyrow = dxrow
    split_hi_lo(mean, &mean_hi, &mean_lo)
    unit_extent(g, u, &j0, &nruns, &s0, &ncols)
    at = j0 * g.S + s0
    if not g.per_channel:
        row_grad_sums(xrow + at, dyrow + at, w + at, ncols, mean_hi, mean_lo, &sums[0], &sums[1])
        return
    for j in range(nruns):
        slot = (j0 + j) * g.units_per_run + u % g.units_per_run
        row_grad_sums(xrow + at + j * g.S, dyrow + at + j * g.S, <const floating*>NULL, ncols,
                      mean_hi, mean_lo, &sums[2 * slot], &sums[2 * slot + 1])


cdef inline void backward_unit(const floating* xrow, const floating* dyrow, floating* dxrow,
                               const floating* ghrow, RowGeom* g, Py_ssize_t r, Py_ssize_t u,
                               const floating* w, double mean, double rstd, double k_d,
                               double c_0) noexcept nogil:
    """Per-channel mode: dx = rstd*(w*dy + c_0) + k_d*(x - mean) (+ grad_h when ghrow is
    not NULL) over unit u of row r (elementwise rows: group_backward_unit). With an
    activation, dy is g, already in dx's unit."""
    cdef Py_ssize_t j0, nruns, s0, ncols, j, at, c0
    cdef floating mean_hi, mean_lo
    split_hi_lo(mean, &mean_hi, &mean_lo)
    unit_extent(g, u, &j0, &nruns, &s0, &ncols)
    at = j0 * g.S + s0
    if g.act != ACT_NONE:
        dyrow = dxrow
    c0 = (r % g.G) * g.runs + j0
    for j in range(nruns):
        run_affine_backward(xrow + at + j * g.S, dyrow + at + j * g.S,
                            dxrow + at + j * g.S, ncols, mean_hi, mean_lo,
                            <floating>(rstd * w[c0 + j]), <floating>k_d,
                            <floating>(rstd * c_0), g.stream)
    if ghrow != NULL:
        run_add(dxrow + at, ghrow + at, dxrow + at, nruns * ncols)


cdef inline void group_backward_unit(const floating* x, const floating* dy, floating* dx,
                                     const floating* gh, RowGeom* g, Py_ssize_t r0,
                                     Py_ssize_t r1, Py_ssize_t u, const floating* w,
                                     const double* mean, const double* rstd, const double* coef,
                                     double* acc, floating* wacc, bint flush) noexcept nogil:
    """Elementwise mode: dx of unit u of rows [r0, r1) of a row group (coef: their k_d, c_0
    pairs, from row r0's on), the weight/bias partials into wacc (2*D; NULL: the rows are
    the whole group); flush: the rows end the group, its partials go into acc (2*D
    doubles). With an activation, dy is g, already in dx; gh (not NULL) is then added to dx."""
    cdef Py_ssize_t j0, nruns, s0, ncols, r, at
    cdef const floating* src = dx if g.act != ACT_NONE else dy
    unit_extent(g, u, &j0, &nruns, &s0, &ncols)
    at = r0 * g.D + s0
    group_backward(x + at, src + at, w + s0, dx + at, r1 - r0, g.D,
                   ncols, mean + r0 if g.centered else NULL, rstd + r0, coef,
                   NULL if wacc == NULL else wacc + s0,
                   acc + s0 if flush else NULL, g.D, g.stream)
    if gh != NULL:
        for r in range(r0, r1):
            run_add(dx + r * g.D + s0, gh + r * g.D + s0, dx + r * g.D + s0, ncols)


cdef inline void row_coefficients(RowGeom* g, Py_ssize_t r, const floating* w, double rstd,
                                  double* sums, double* k_d, double* c_0) noexcept nogil:
    """Fold a row's gradient sums into dx = rstd*(w*dy + c_0) + k_d*(x - mean):
        dx = rstd * (g - sum(g)/D - (x-mean) * rstd^2 * sum(g*(x-mean))/D),  g = dy*w.
    Per-channel mode first folds each run's pieces into sums[2j:2j+2] (in
    piece order), then weights the runs in run order. No centering term for RMSNorm."""
    cdef Py_ssize_t j, p, c0
    cdef double sum_g = 0.0, sum_gd = 0.0, run_dy, run_dyd
    if not g.per_channel:
        sum_g = sums[0]
        sum_gd = sums[1]
    else:
        c0 = (r % g.G) * g.runs
        for j in range(g.runs):
            run_dy = 0.0
            run_dyd = 0.0
            for p in range(g.units_per_run):
                run_dy += sums[2 * (j * g.units_per_run + p)]
                run_dyd += sums[2 * (j * g.units_per_run + p) + 1]
            sums[2 * j] = run_dy       # j <= slot: never overwrites an unread piece
            sums[2 * j + 1] = run_dyd
            sum_g += w[c0 + j] * run_dy
            sum_gd += w[c0 + j] * run_dyd
    fn_row_backward_coefficients(rstd, sum_g, sum_gd, <double>g.D, g.centered, k_d, c_0)


cdef inline Py_ssize_t sums_per_row(RowGeom* g) noexcept nogil:
    """Doubles of gradient sums per row: 2, or 2 per run piece (per-channel)."""
    return 2 * g.runs * g.units_per_run if g.per_channel else 2


# ------------------------------------------------------------ forward

cdef inline void forward_row(const floating* x, const floating* res, floating* h, floating* y,
                             RowGeom* g, Py_ssize_t r, const floating* w, const floating* b,
                             double eps, double* mean, double* rstd, double* var) noexcept nogil:
    """Statistics of row r (of h = x + res with a residual), then its output while
    the row is in cache. The statistics read memory and the output pass mostly computes;
    with an activation, that pass is long enough to be worth overlapping with the next
    row's reads: it prefetches row r + 1 into L2 as it goes (g.prefetch_next, rows of at
    most PREFETCH_ROW_BYTES; with static scheduling a thread's next row is r + 1).
    Kernel A/B, cold, geometric means of 4 runs in both orders, GroupNorm/InstanceNorm
    shapes with rows of 64-128 KiB: silu 1.06-1.16x faster at 1 thread, 1.05-1.12x at 2;
    same bits. relu computes too little to gain (0.90-1.07x): not for relu."""
    cdef Moments acc
    cdef Py_ssize_t u
    cdef const floating* src = x if res == NULL else h    # what is normalized
    if (res != NULL and g.stream and (g.D * sizeof(floating)) % 64 == 0
            and STREAMED_H_MIN_BYTES <= g.D * sizeof(floating) <= STREAMED_H_MAX_BYTES):
        forward_row_streamed_h(x, res, h, y, g, r, w, b, eps, mean, rstd, var)
        return
    acc.count = 0.0
    acc.mean = 0.0
    acc.m2 = 0.0
    for u in range(g.n_units):
        chan_merge(&acc, row_unit_moments(x, res, h, g, r, u))
    store_row_stats(acc, eps, r, mean, rstd, var)
    for u in range(g.n_units):
        apply_unit(src + r * g.D, y + r * g.D, g, r, u, w, b, acc.mean, rstd[r])


cdef void forward_row_streamed_h(const floating* x, const floating* res, floating* h,
                                 floating* y, RowGeom* g, Py_ssize_t r, const floating* w,
                                 const floating* b, double eps, double* mean, double* rstd,
                                 double* var) noexcept nogil:
    """forward_row for a row of a streamed residual forward (one unit, see
    STREAMED_H_MIN_BYTES): h = x + res is formed in an L1 scratch at h's offset within a
    line, copied out with non-temporal stores, and the statistics and y are taken from the
    scratch, so that h's lines are never read before being written, nor read back. Same
    arithmetic, same bits."""
    cdef double buf[(STREAMED_H_MAX_BYTES >> 3) + 8]    # the row, and a line to align it
    cdef Moments acc
    cdef floating* hs = <floating*>fn_line_twin(buf, h + r * g.D)
    run_add(x + r * g.D, res + r * g.D, hs, g.D)
    fn_stream_copy(h + r * g.D, hs, g.D * sizeof(floating))
    acc = unit_moments(hs, g.D, g.centered)
    store_row_stats(acc, eps, r, mean, rstd, var)
    apply_unit(hs, y + r * g.D, g, r, 0, w, b, acc.mean, rstd[r])


cdef inline bint takes_short_rows(RowGeom* g, const void* res) noexcept nogil:
    """Rows for the short-rows kernels (fn_short_rows_* in _simd.h): LayerNorm and
    RMSNorm rows of at most FN_SHORT_ROW values, without fusions (res: the forward's
    residual or the backward's grad_h)."""
    return not g.per_channel and g.D <= FN_SHORT_ROW and g.act == ACT_NONE and res == NULL


cdef void short_rows_task(const floating* x, floating* y, RowGeom* g, Py_ssize_t k,
                          const floating* w, const floating* b, double eps, double* mean,
                          double* rstd, double* var) noexcept nogil:
    """Rows [k * SHORT_ROWS_PER_TASK, ...) through the short-rows forward."""
    cdef Py_ssize_t r0 = k * SHORT_ROWS_PER_TASK
    cdef Py_ssize_t nrows = min(g.R, r0 + SHORT_ROWS_PER_TASK) - r0
    cdef double* task_mean = NULL if mean == NULL else mean + r0
    cdef double* task_var = NULL if var == NULL else var + r0
    if floating is float:
        fn_short_rows_forward_f32(x + r0 * g.D, y + r0 * g.D, w, b, nrows, g.D, g.centered, eps,
                                  task_mean, rstd + r0, task_var, g.stream)
    else:
        fn_short_rows_forward_f64(x + r0 * g.D, y + r0 * g.D, w, b, nrows, g.D, g.centered, eps,
                                  task_mean, rstd + r0, task_var, g.stream)


cdef void forward_by_row(const floating* x, const floating* res, floating* h, floating* y,
                         RowGeom* g, const floating* w, const floating* b, double eps,
                         double* mean, double* rstd, double* var, int n_threads) noexcept nogil:
    """Streamed outputs are fenced once per thread, after its last row (see STREAM_BYTES)."""
    cdef Py_ssize_t r, k, tasks
    if takes_short_rows(g, res):
        tasks = (g.R + SHORT_ROWS_PER_TASK - 1) // SHORT_ROWS_PER_TASK
        if n_threads == 1:
            for k in range(tasks):
                short_rows_task(x, y, g, k, w, b, eps, mean, rstd, var)
            fence_if(g.stream)
        else:
            with parallel(num_threads=n_threads):
                for k in prange(tasks, schedule="static"):
                    short_rows_task(x, y, g, k, w, b, eps, mean, rstd, var)
                fence_if(g.stream)
        return
    if n_threads == 1:
        for r in range(g.R):
            forward_row(x, res, h, y, g, r, w, b, eps, mean, rstd, var)
        fence_if(g.stream)
    else:
        with parallel(num_threads=n_threads):
            for r in prange(g.R, schedule="static"):
                forward_row(x, res, h, y, g, r, w, b, eps, mean, rstd, var)
            fence_if(g.stream)


cdef void forward_by_unit(const floating* x, const floating* res, floating* h, floating* y,
                          RowGeom* g, const floating* w, const floating* b, double eps,
                          double* mean, double* rstd, double* var, double* scratch,
                          double* row_mean, int n_threads) noexcept nogil:
    """scratch: 3 * R * n_units; row_mean: R (the mean even for RMSNorm, i.e. 0)."""
    cdef Py_ssize_t task, r, u
    cdef Moments part, acc
    cdef const floating* src = x if res == NULL else h    # what is normalized
    for task in prange(g.R * g.n_units, num_threads=n_threads, schedule="static"):
        part = row_unit_moments(x, res, h, g, task // g.n_units, task % g.n_units)
        scratch[3 * task] = part.count
        scratch[3 * task + 1] = part.mean
        scratch[3 * task + 2] = part.m2
    for r in range(g.R):
        acc.count = 0.0
        acc.mean = 0.0
        acc.m2 = 0.0
        for u in range(g.n_units):
            part.count = scratch[3 * (r * g.n_units + u)]
            part.mean = scratch[3 * (r * g.n_units + u) + 1]
            part.m2 = scratch[3 * (r * g.n_units + u) + 2]
            chan_merge(&acc, part)
        store_row_stats(acc, eps, r, mean, rstd, var)
        row_mean[r] = acc.mean
    with parallel(num_threads=n_threads):
        for task in prange(g.R * g.n_units, schedule="static"):
            r = task // g.n_units
            apply_unit(src + r * g.D, y + r * g.D, g, r, task % g.n_units, w, b, row_mean[r],
                       rstd[r])
        fence_if(g.stream)


# ----------------------------------------------------------- backward

cdef inline bint row_by_row(RowGeom* g, Py_ssize_t itemsize) noexcept nogil:
    """Whether elementwise rows are dx'ed one by one (as all rows of more than
    GROUP_ROW_BYTES are, backward_block) and never streamed: rows of more than
    GROUP_ROW_BYTES and at most ROW_BY_ROW_BYTES. Also tells the short-rows kernels to
    form each row's dx right after its sums. LayerNorm backward, 1 thread, 8-32 MiB
    arrays, one by one against groups: float rows of 160-384 values 1.16-1.90x faster,
    of 512 1.12-1.16x, double rows of 128-256 1.07-1.37x. Never streamed: non-temporal
    stores between a row's reads ran rows of 384 from 1.14x faster to 1.28x slower by
    dx's offset, and plain stores did not swing."""
    return (not g.per_channel and GROUP_ROW_BYTES < g.D * itemsize <= ROW_BY_ROW_BYTES)


cdef inline void backward_row(const floating* x, const floating* dy, floating* dx,
                              const floating* gh, RowGeom* g, Py_ssize_t r, const floating* w,
                              const floating* b, double mean, double rstd,
                              double* sums) noexcept nogil:
    """Per-channel mode: gradient sums of row r (sums: sums_per_row zeros), then its dx in
    cache."""
    cdef Py_ssize_t u
    cdef double k_d, c_0
    for u in range(g.n_units):
        unit_grad_sums(x + r * g.D, dy + r * g.D, dx + r * g.D, g, r, u, w, b, mean, rstd, sums)
    row_coefficients(g, r, w, rstd, sums, &k_d, &c_0)
    for u in range(g.n_units):
        backward_unit(x + r * g.D, dy + r * g.D, dx + r * g.D, row_of(gh, r, g.D), g, r, u, w,
                      mean, rstd, k_d, c_0)


cdef inline double* block_acc(RowGeom* g, double* acc, Py_ssize_t k) noexcept nogil:
    """Row block k's weight/bias partials (2*D doubles; elementwise mode only)."""
    return acc if g.per_channel else acc + 2 * g.D * k


cdef inline floating* block_wacc(RowGeom* g, floating* wacc, Py_ssize_t k) noexcept nogil:
    """Row block k's working-precision partials of the current row group (2*D)."""
    return wacc if g.per_channel else wacc + 2 * g.D * k


cdef inline Py_ssize_t group_end(Py_ssize_t r, Py_ssize_t first,
                                 Py_ssize_t stop) noexcept nogil:
    """End of row r's group: rows of a block are summed in working precision in groups
    of ROW_GROUP (counted from the block's first row), each group then added in float64."""
    return min(stop, r - (r - first) % ROW_GROUP + ROW_GROUP)


cdef inline void backward_block(const floating* x, const floating* dy, floating* dx,
                                const floating* gh, RowGeom* g, Py_ssize_t n_blocks, Py_ssize_t k,
                                const floating* w, const floating* b, const double* mean,
                                const double* rstd, double* sums, double* acc,
                                floating* wacc) noexcept nogil:
    """Rows of block k in order. Elementwise mode: acc (2*D) gets the block's
    weight/bias partials (through wacc, see group_end); the gradient sums of a group's
    rows (or of one row: rows of more than GROUP_ROW_BYTES) come first, then their dx
    together. Per-channel mode: one block per row, sums hold the row's per-run sums
    afterwards."""
    cdef Py_ssize_t first, stop, r, r0, r1, i, u, nsum = sums_per_row(g)
    cdef Py_ssize_t rows_per_step
    cdef double* row_sums
    cdef double coef[2 * ROW_GROUP]
    first = stripe_start(g.R, n_blocks, k)
    stop = stripe_start(g.R, n_blocks, k + 1)
    if g.per_channel:
        for r in range(first, stop):
            row_sums = sums + r * nsum
            for i in range(nsum):
                row_sums[i] = 0.0
            backward_row(x, dy, dx, gh, g, r, w, b, mean[r] if g.centered else 0.0, rstd[r],
                         row_sums)
        return
    for i in range(2 * g.D):
        acc[i] = 0.0
        wacc[i] = 0
    if takes_short_rows(g, gh) and stop > first:
        short_rows_backward(x + first * g.D, dy + first * g.D, dx + first * g.D, w, stop - first,
                            g.D, g.centered, mean + first if g.centered else NULL, rstd + first,
                            acc, wacc, g.row_by_row, g.stream)
        return
    # Rows of more than GROUP_ROW_BYTES go one by one: each row's dx right after its
    # sums, from L1. A group's dx pass walks 24-32 streams (x, dy, dx, gh of 8 rows),
    # more than L1's 8 ways hold wherever rows a few KiB long put several at one offset
    # modulo 4 KiB. Kernels, float32 rows of 768-4096 values, 32 MiB arrays, offsets
    # (x, dy) of (16, 16), (2048, 16) and (16, 1040) with dx at the pool's 2048, one by
    # one (streamed) against groups, medians of 5 interleaved rounds, on a Zen 3: 1 thread
    # 1.21-3.19x faster (rows of 4096 at (2048, 16), the residual backward's h and dy:
    # 11.3 against 35.4 ms); 2 threads, rows of 1536 and 4096 1.33-3.46x, of 768
    # 0.93-1.02x. (A Zen 4 had found groups 1.1-1.6x faster for rows of 768, 1536 and
    # 2560 values at offsets where no two arrays met.)
    rows_per_step = 1 if g.D * sizeof(floating) > GROUP_ROW_BYTES else ROW_GROUP
    row_sums = sums + 2 * k
    r0 = first
    while r0 < stop:
        r1 = min(group_end(r0, first, stop), r0 + rows_per_step)
        for r in range(r0, r1):
            row_sums[0] = 0.0
            row_sums[1] = 0.0
            for u in range(g.n_units):
                unit_grad_sums(x + r * g.D, dy + r * g.D, dx + r * g.D, g, r, u, w, b,
                               mean[r] if g.centered else 0.0, rstd[r], row_sums)
            row_coefficients(g, r, w, rstd[r], row_sums, &coef[2 * (r - r0)],
                             &coef[2 * (r - r0) + 1])
        for u in range(g.n_units):
            group_backward_unit(x, dy, dx, gh, g, r0, r1, u, w, mean, rstd, coef, acc,
                                NULL if rows_per_step == ROW_GROUP else wacc,
                                r1 == group_end(r0, first, stop))
        r0 = r1


cdef void backward_by_row(const floating* x, const floating* dy, floating* dx,
                          const floating* gh, RowGeom* g, Py_ssize_t n_blocks, const floating* w,
                          const floating* b, const double* mean, const double* rstd,
                          double* sums, double* acc, floating* wacc, int n_threads) noexcept nogil:
    """Streamed dx is fenced once per thread, after its last block."""
    cdef Py_ssize_t k
    if n_threads == 1:
        for k in range(n_blocks):
            backward_block(x, dy, dx, gh, g, n_blocks, k, w, b, mean, rstd, sums,
                           block_acc(g, acc, k), block_wacc(g, wacc, k))
        fence_if(g.stream)
    else:
        with parallel(num_threads=n_threads):
            for k in prange(n_blocks, schedule="static"):
                backward_block(x, dy, dx, gh, g, n_blocks, k, w, b, mean, rstd, sums,
                               block_acc(g, acc, k), block_wacc(g, wacc, k))
            fence_if(g.stream)


cdef void backward_by_unit(const floating* x, const floating* dy, floating* dx,
                           const floating* gh, RowGeom* g, Py_ssize_t n_blocks,
                           const floating* w, const floating* b, const double* mean,
                           const double* rstd, double* sums, double* acc, double* unit_sums,
                           double* coef, int n_threads) noexcept nogil:
    """unit_sums: R * n_units * 2 (elementwise mode only); coef: 2 * R."""
    cdef Py_ssize_t task, r, u, i
    cdef Py_ssize_t nsum = sums_per_row(g)
    cdef double* target
    # pass 1: gradient sums of every (row, unit); per-channel units write
    # their own run pieces, elementwise units their own slot
    target = sums if g.per_channel else unit_sums
    for i in range(g.R * nsum if g.per_channel else 2 * g.R * g.n_units):
        target[i] = 0.0
    for task in prange(g.R * g.n_units, num_threads=n_threads, schedule="static"):
        r = task // g.n_units
        target = sums + r * nsum if g.per_channel else unit_sums + 2 * task
        unit_grad_sums(x + r * g.D, dy + r * g.D, dx + r * g.D, g, r, task % g.n_units, w, b,
                       mean[r] if g.centered else 0.0, rstd[r], target)
    # fold in unit order, exactly as backward_row accumulates
    for r in range(g.R):
        if g.per_channel:
            target = sums + r * nsum
        else:
            target = sums                # the row's two totals, used at once
            target[0] = 0.0
            target[1] = 0.0
            for u in range(g.n_units):
                target[0] += unit_sums[2 * (r * g.n_units + u)]
                target[1] += unit_sums[2 * (r * g.n_units + u) + 1]
        row_coefficients(g, r, w, rstd[r], target, &coef[2 * r], &coef[2 * r + 1])
    # pass 2: dx; elementwise tasks are (row block, unit) so that each block
    # accumulates its rows in order, as backward_block does
    with parallel(num_threads=n_threads):
        for task in prange(n_blocks * g.n_units, schedule="static"):
            backward_block_unit(x, dy, dx, gh, g, n_blocks, task // g.n_units, task % g.n_units,
                                w, mean, rstd, coef, block_acc(g, acc, task // g.n_units))
        fence_if(g.stream)


cdef inline void backward_block_unit(const floating* x, const floating* dy, floating* dx,
                                     const floating* gh, RowGeom* g, Py_ssize_t n_blocks,
                                     Py_ssize_t k, Py_ssize_t u,
                                     const floating* w, const double* mean, const double* rstd,
                                     const double* coef, double* acc) noexcept nogil:
    """Unit u of the rows of block k (a task of its own: its locals stay private); its
    row groups are whole, their partials go straight into acc."""
    cdef Py_ssize_t i, r, r0, first, stop, j0, nruns, s0, ncols
    unit_extent(g, u, &j0, &nruns, &s0, &ncols)
    first = stripe_start(g.R, n_blocks, k)
    stop = stripe_start(g.R, n_blocks, k + 1)
    if g.per_channel:
        for r in range(first, stop):
            backward_unit(x + r * g.D, dy + r * g.D, dx + r * g.D, row_of(gh, r, g.D), g, r, u,
                          w, mean[r] if g.centered else 0.0, rstd[r], coef[2 * r],
                          coef[2 * r + 1])
        return
    for i in range(s0, s0 + ncols):
        acc[i] = 0.0
        acc[g.D + i] = 0.0
    r0 = first
    while r0 < stop:
        group_backward_unit(x, dy, dx, gh, g, r0, group_end(r0, first, stop), u, w, mean, rstd,
                            coef + 2 * r0, acc, NULL, True)
        r0 = group_end(r0, first, stop)


cdef inline void add_doubles(double* acc, const double* part, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        acc[i] += part[i]


cdef void fold_param_grads(RowGeom* g, Py_ssize_t n_blocks, const double* rstd,
                           const double* sums, double* acc, floating* grad_w,
                           floating* grad_b) noexcept nogil:
    """grad weight = sum of dy*xhat, grad bias = sum of dy, over rows in a fixed order.
    grad_b may be NULL (RMSNorm)."""
    cdef Py_ssize_t i, k, n, j, r, nsum = sums_per_row(g)
    cdef Py_ssize_t N
    cdef double tw, tb
    if not g.per_channel:
        # block partials folded into block 0 in block order (vectorized loops)
        for k in range(1, n_blocks):
            add_doubles(acc, acc + 2 * g.D * k, 2 * g.D)
        for i in range(g.D):
            grad_w[i] = <floating>acc[i]
        if grad_b != NULL:
            for i in range(g.D):
                grad_b[i] = <floating>acc[g.D + i]
        return
    N = g.R // g.G
    for r in range(g.G):              # channel (r, j) of group r
        for j in range(g.runs):
            tw = 0.0
            tb = 0.0
            for n in range(N):
                tb += sums[(n * g.G + r) * nsum + 2 * j]
                tw += sums[(n * g.G + r) * nsum + 2 * j + 1] * rstd[n * g.G + r]
            grad_w[r * g.runs + j] = <floating>tw
            if grad_b != NULL:
                grad_b[r * g.runs + j] = <floating>tb


# ---------------------------------------------------------- public API

cdef inline void* data_or_null(object a):
    """Data pointer of an array, or NULL for None."""
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline double* f64_ptr(object a):
    return <double*>data_or_null(a)


cdef inline bint streams_runs(Py_ssize_t run_bytes, const void* y, const void* h,
                              int act) noexcept nogil:
    """Whether a large forward's contiguous runs (elementwise rows, or per-channel runs of S
    values) are long enough to write with non-temporal stores: runs of STREAM_RUN_BYTES;
    without a fused activation, runs of STREAM_SPLIT_RUN_BYTES anywhere, and runs of
    STREAM_ROW_BYTES when they are whole lines of line-aligned outputs (y, and h when not
    NULL), so that no line is shared by two runs. Shorter runs' shared end lines, plain,
    cost more than streaming saves (see STREAM_SPLIT_RUN_BYTES); whole-line runs of
    512-3072 bytes ran 1.05-1.28x faster (see STREAM_ROW_BYTES). An activated output streams
    through an L1 scratch and a copy (fn_affine_act_streamed): rows of 256-768 floats ran
    0.94-0.98x with silu and gelu, 0.85-1.10x with relu."""
    if run_bytes >= STREAM_RUN_BYTES:
        return True
    if act != ACT_NONE:
        return False
    return run_bytes >= STREAM_SPLIT_RUN_BYTES or (
        run_bytes >= STREAM_ROW_BYTES and run_bytes % 64 == 0
        and <size_t>y % 64 == 0 and (h == NULL or <size_t>h % 64 == 0))


def row_forward(cnp.ndarray x, cnp.ndarray weight, cnp.ndarray bias, Py_ssize_t R,
                Py_ssize_t runs, Py_ssize_t S, Py_ssize_t G, bint per_channel, bint centered,
                double eps, cnp.ndarray y, object mean, cnp.ndarray rstd, object var,
                int n_threads, int act=ACT_NONE, object residual=None, object h=None):
    """Row statistics and normalization: y = act((x - mean) * rstd * weight + bias).

    IN  x: R rows of D = runs*S values, R*D > 0. per_channel=False: weight,
        bias have D values (one per element, runs = 1); per_channel=True:
        C = G*runs values, run j of row r uses channel (r % G)*runs + j.
        centered=False (RMSNorm): no mean is subtracted, rstd = 1/sqrt(mean(x^2)+eps).
        act: fused activation code. residual (None or like x): normalize h = x + residual.
    OUT y: like x; mean (None when not centered), rstd, var (None or R values):
        float64 per-row mean, 1/sqrt(var + eps) and biased variance; h (like x,
        given with residual): x + residual.
    Returns whether some row's statistics are not finite (see _overflow.py).
    """
    cdef RowGeom g = row_geom(R, runs, S, G, per_channel, centered)
    cdef double* p_mean = f64_ptr(mean)
    cdef double* p_rstd = f64_ptr(rstd)
    cdef double* p_var = f64_ptr(var)
    cdef void* p_res = data_or_null(residual)
    cdef void* p_h = data_or_null(h)
    cdef double* work = NULL
    g.act = act
    # an activation is formed in an L1 scratch, then streamed (run_affine_act); with
    # a residual, the outputs are h (see forward_row_streamed_h) and y
    g.stream = ((2 if residual is not None else 1) * g.R * g.D * cnp.PyArray_ITEMSIZE(x)
                >= STREAM_BYTES
                and streams_runs((g.S if per_channel else g.D) * cnp.PyArray_ITEMSIZE(x),
                                 cnp.PyArray_DATA(y), p_h, act))
    g.prefetch_next = (g.stream and act != ACT_NONE and act != ACT_RELU and residual is None
                       and g.D * cnp.PyArray_ITEMSIZE(x) <= PREFETCH_ROW_BYTES
                       and not split_by_unit(&g, n_threads))
    if split_by_unit(&g, n_threads):
        scratch = np.empty(3 * g.R * g.n_units + g.R)   # unit moments | row means
        work = <double*>cnp.PyArray_DATA(scratch)
    if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT:
        with nogil:
            _row_forward(<float*>cnp.PyArray_DATA(x), <float*>p_res, <float*>p_h,
                         <float*>cnp.PyArray_DATA(y), &g, <float*>cnp.PyArray_DATA(weight),
                         <float*>cnp.PyArray_DATA(bias), eps, p_mean, p_rstd, p_var, work,
                         n_threads)
    else:
        with nogil:
            _row_forward(<double*>cnp.PyArray_DATA(x), <double*>p_res, <double*>p_h,
                         <double*>cnp.PyArray_DATA(y), &g, <double*>cnp.PyArray_DATA(weight),
                         <double*>cnp.PyArray_DATA(bias), eps, p_mean, p_rstd, p_var, work,
                         n_threads)
    return _statistics_overflowed(p_mean, p_rstd, R)


cdef bint _statistics_overflowed(const double* mean, const double* rstd,
                                 Py_ssize_t rows) noexcept nogil:
    """Whether some row's statistics came out non-finite (rstd = 0 for an infinite
    variance, NaN for NaN; mean may be NULL): see _overflow.py."""
    cdef Py_ssize_t r
    for r in range(rows):
        if not (rstd[r] > 0.0) or (mean != NULL and mean[r] - mean[r] != 0.0):
            return True
    return False


cdef void _row_forward(const floating* x, const floating* res, floating* h, floating* y,
                       RowGeom* g, const floating* w, const floating* b, double eps,
                       double* mean, double* rstd, double* var, double* work,
                       int n_threads) noexcept nogil:
    """work: the by-unit strategy's scratch (NULL: by row)."""
    if work != NULL:
        forward_by_unit(x, res, h, y, g, w, b, eps, mean, rstd, var, work,
                        work + 3 * g.R * g.n_units, n_threads)
    else:
        forward_by_row(x, res, h, y, g, w, b, eps, mean, rstd, var, n_threads)


def row_backward(cnp.ndarray x, cnp.ndarray dy, cnp.ndarray weight, Py_ssize_t R,
                 Py_ssize_t runs, Py_ssize_t S, Py_ssize_t G, bint per_channel, bint centered,
                 object mean, cnp.ndarray rstd, cnp.ndarray dx, cnp.ndarray grad_weight,
                 object grad_bias, int n_threads, int act=ACT_NONE, object bias=None,
                 object grad_h=None):
    """Gradients of row_forward (statistics taken from the input).

    IN  x, dy: R rows of D values, R*D > 0; weight as in row_forward; mean
        (None when not centered) and rstd: the forward's float64 statistics;
        act: the forward's activation, with its bias (like weight) when act != 0;
        grad_h (None or like x): added to dx (a residual stream's gradient).
    OUT dx: like x; grad_weight (and grad_bias unless None): like weight, the
        sums over rows of g*xhat and g, g = dy * act'(z) (dy without activation).
    """
    cdef RowGeom g = row_geom(R, runs, S, G, per_channel, centered)
    cdef Py_ssize_t n_blocks = g.R if per_channel else min(g.R, <Py_ssize_t>MAX_STRIPES)
    cdef double* p_mean = f64_ptr(mean)
    cdef double* p_rstd = f64_ptr(rstd)
    cdef void* p_grad_bias = data_or_null(grad_bias)
    cdef void* p_bias = data_or_null(bias)
    cdef void* p_gh = data_or_null(grad_h)
    cdef Py_ssize_t n_sums, n_acc, n_unit_sums, n_coef
    cdef bint by_unit
    cdef double* work
    cdef cnp.ndarray partials
    g.act = act
    # an activation or grad_h rereads dx; elementwise rows: see STREAM_DX_BYTES
    if per_channel:
        g.stream = g.R * g.D * cnp.PyArray_ITEMSIZE(x) >= STREAM_BYTES
    else:
        # shorter rows only on whole lines (else a plain line, shared by neighbouring
        # rows, in every few made it slower than plain stores)
        g.stream = (g.R * g.D * cnp.PyArray_ITEMSIZE(x) >= STREAM_DX_BYTES
                    and (g.D * cnp.PyArray_ITEMSIZE(x) >= STREAM_DX_ROW_BYTES
                         or <size_t>cnp.PyArray_DATA(dx) % 64 == 0
                         and g.D * cnp.PyArray_ITEMSIZE(x) % 64 == 0))
    g.row_by_row = row_by_row(&g, cnp.PyArray_ITEMSIZE(x))
    g.stream = g.stream and act == ACT_NONE and grad_h is None and not g.row_by_row
    by_unit = split_by_unit(&g, n_threads)
    # one float64 scratch array: row sums | block partials | unit sums | coefficients
    n_sums = g.R * sums_per_row(&g) if per_channel else 2 * n_blocks
    n_acc = 0 if per_channel else 2 * g.D * n_blocks
    n_unit_sums = 2 * g.R * g.n_units if by_unit and not per_channel else 0
    n_coef = 2 * g.R if by_unit else 0
    scratch = np.empty(n_sums + n_acc + n_unit_sums + n_coef)
    work = <double*>cnp.PyArray_DATA(scratch)
    # the current row group's partials per block, for rows dx'ed one by one (backward_block)
    partials = np.empty(max(n_acc, 1), dtype=x.dtype)
    if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT:
        with nogil:
            _row_backward(<float*>cnp.PyArray_DATA(x), <float*>cnp.PyArray_DATA(dy),
                          <float*>cnp.PyArray_DATA(dx), <float*>p_gh, &g, n_blocks, by_unit,
                          <float*>cnp.PyArray_DATA(weight), <float*>p_bias, p_mean, p_rstd,
                          work, work + n_sums, <float*>cnp.PyArray_DATA(partials),
                          work + n_sums + n_acc, work + n_sums + n_acc + n_unit_sums,
                          <float*>cnp.PyArray_DATA(grad_weight), <float*>p_grad_bias,
                          n_threads)
    else:
        with nogil:
            _row_backward(<double*>cnp.PyArray_DATA(x), <double*>cnp.PyArray_DATA(dy),
                          <double*>cnp.PyArray_DATA(dx), <double*>p_gh, &g, n_blocks, by_unit,
                          <double*>cnp.PyArray_DATA(weight), <double*>p_bias, p_mean, p_rstd,
                          work, work + n_sums, <double*>cnp.PyArray_DATA(partials),
                          work + n_sums + n_acc, work + n_sums + n_acc + n_unit_sums,
                          <double*>cnp.PyArray_DATA(grad_weight), <double*>p_grad_bias,
                          n_threads)


cdef void _row_backward(const floating* x, const floating* dy, floating* dx, const floating* gh,
                        RowGeom* g, Py_ssize_t n_blocks, bint by_unit, const floating* w,
                        const floating* b, const double* mean, const double* rstd, double* sums,
                        double* acc, floating* wacc, double* unit_sums, double* coef,
                        floating* grad_w, floating* grad_b, int n_threads) noexcept nogil:
    if by_unit:
        backward_by_unit(x, dy, dx, gh, g, n_blocks, w, b, mean, rstd, sums, acc, unit_sums,
                         coef, n_threads)
    else:
        backward_by_row(x, dy, dx, gh, g, n_blocks, w, b, mean, rstd, sums, acc, wacc,
                        n_threads)
    fold_param_grads(g, n_blocks, rstd, sums, acc, grad_w, grad_b)


# ------------------------------------------- channels-last GroupNorm
#
# Memory (N, S, C), channels contiguous: for each sample n the (S, C) slab is
# reduced per channel with the rows strategy of _channel.pxi (vectorized
# along channels, thread-invariant), then the channels of a group are merged
# in channel order. Output and gradient keep the (N, S, C) layout.
# With at least as many samples as threads, threads take whole samples (one
# parallel loop); otherwise each sample's kernels run in parallel. The
# arithmetic is the same either way.

cdef inline bint by_sample(Py_ssize_t N, int n_threads) noexcept nogil:
    return n_threads > 1 and N >= n_threads


cdef void cl_forward_sample(const floating* x, floating* y, RowPlan* p, Py_ssize_t n,
                            Py_ssize_t S, Py_ssize_t C, Py_ssize_t G, const floating* w,
                            const floating* b, double eps, double* mean, double* rstd,
                            double* var, double* ch, double* scratch, floating* vec,
                            int act, bint stream, int n_threads, Py_ssize_t ahead) noexcept nogil:
    """Sample n. ch: 3*C float64 (channel means, m2, then the normalization's per-channel
    mean, scale, shift); vec: 3*C per-channel coefficients; stream: y written with
    non-temporal stores (see rows_affine); ahead: see rows_affine."""
    cdef Py_ssize_t grp, c, cg = C // G
    cdef Moments acc, part
    cdef floating* hi
    rows_moments(x + n * S * C, p, ch, ch + C, scratch, n_threads)
    for grp in range(G):
        acc.count = 0.0
        acc.mean = 0.0
        acc.m2 = 0.0
        for c in range(grp * cg, (grp + 1) * cg):
            part.count = <double>S
            part.mean = ch[c]
            part.m2 = ch[C + c]
            chan_merge(&acc, part)
        store_row_stats(acc, eps, n * G + grp, mean, rstd, var)
        for c in range(grp * cg, (grp + 1) * cg):
            ch[c] = acc.mean
            ch[C + c] = rstd[n * G + grp] * w[c]
            ch[2 * C + c] = b[c]
    hi = affine_rows_coefficients(ch, ch + C, ch + 2 * C, C, vec)
    rows_affine(x + n * S * C, y + n * S * C, S, C, hi, vec + C, vec + 2 * C, act, n_threads,
                stream, ahead)


cdef void cl_forward(const floating* x, floating* y, Py_ssize_t N, Py_ssize_t S, Py_ssize_t C,
                     Py_ssize_t G, const floating* w, const floating* b, double eps,
                     double* mean, double* rstd, double* var, double* ch,
                     double* scratch, floating* vec, int act,
                     int n_threads) noexcept nogil:
    """ch, scratch, vec: one set per thread (see groups_cl_forward). The output is
    streamed by its total size, as BatchNorm's (STREAM_BYTES): each sample's is small.
    With an activation, at one thread, the output pass of sample n prefetches sample
    n + 1 (rows_affine's ahead), so that memory keeps reading while that pass reads the
    sample back from L3 and computes; the statistics pass then finds it in cache. Kernel
    A/B, 1 thread, cold, geometric means of 4 runs in both orders, (N, S, C) =
    (8,3136,256), (32,3136,64), (4,16384,64): relu 1.17x, 1.22x, 1.02x; silu 0.97x,
    1.09x, 0.98x. Without an activation the same prefetches measured 0.97-1.02x, and at
    2 threads (memory already busy) 0.87-1.15x, mostly slower: left out."""
    cdef RowPlan p = row_plan(S, C)
    cdef Py_ssize_t n, t
    cdef bint stream = N * S * C * <Py_ssize_t>sizeof(floating) >= STREAM_BYTES
    if by_sample(N, n_threads):
        for n in prange(N, num_threads=n_threads, schedule="static"):
            t = threadid()
            cl_forward_sample(x, y, &p, n, S, C, G, w, b, eps, mean, rstd, var, ch + 3 * C * t,
                              scratch + rows_scratch(&p, 4) * t, vec + 3 * C * t, act, stream, 1,
                              0)
    else:
        for n in range(N):
            cl_forward_sample(x, y, &p, n, S, C, G, w, b, eps, mean, rstd, var, ch, scratch,
                              vec, act, stream, n_threads,
                              S * C if n + 1 < N and n_threads == 1 else 0)


cdef void cl_backward_sample(const floating* x, const floating* dy, floating* dx, RowPlan* p,
                             Py_ssize_t n, Py_ssize_t S, Py_ssize_t C, Py_ssize_t G,
                             const floating* w, const floating* b, const double* mean,
                             const double* rstd, double* sums, double* scratch,
                             floating* vec, int act, int n_threads, bint stream,
                             Py_ssize_t ahead) noexcept nogil:
    """Sample n. sums: this sample's 2*C float64 (sum(dy), sum(dy*(x-mean)) per
    channel, kept for the weight/bias gradients); vec: 6*C coefficients. With an
    activation, g = dy * act'(z) is formed in dx during the sums and replaces dy.
    stream, ahead: see rows_affine_backward (cl_backward)."""
    cdef Py_ssize_t grp, c, cg = C // G, D = cg * S
    cdef double sum_g, sum_gd, r, k_d, k_0
    cdef floating* z_hi = NULL
    for c in range(C):
        split_hi_lo(mean[n * G + c // cg], &vec[c], &vec[C + c])
        vec[2 * C + c] = <floating>(rstd[n * G + c // cg] * w[c])   # z's scale
    if act != ACT_NONE:   # z's coefficients (vec[3C:4C] is free until k_d is stored)
        z_hi = vec + 5 * C
        for c in range(C):
            affine_coefficients(mean[n * G + c // cg], rstd[n * G + c // cg] * w[c], b[c],
                                &z_hi[c], &vec[2 * C + c], &vec[3 * C + c])
    rows_grad_sums(x + n * S * C, dy + n * S * C, p, vec, vec + C, sums, sums + C, scratch, act,
                   z_hi, vec + 2 * C, vec + 3 * C, dx + n * S * C, n_threads)
    if act != ACT_NONE:
        dy = dx
    for grp in range(G):
        r = rstd[n * G + grp]
        sum_g = 0.0
        sum_gd = 0.0
        for c in range(grp * cg, (grp + 1) * cg):
            sum_g += w[c] * sums[c]
            sum_gd += w[c] * sums[C + c]
        k_d = -r * r * r * sum_gd / D
        k_0 = -r * sum_g / D
        for c in range(grp * cg, (grp + 1) * cg):
            vec[3 * C + c] = <floating>k_d
            fold_mean_tail(mean[n * G + grp], k_d, k_0, &vec[c], &vec[4 * C + c])
    rows_affine_backward(x + n * S * C, dy + n * S * C, dx + n * S * C, S, C, vec, vec + 2 * C,
                         vec + 3 * C, vec + 4 * C, n_threads, stream, ahead)


cdef void cl_backward(const floating* x, const floating* dy, floating* dx, Py_ssize_t N,
                      Py_ssize_t S, Py_ssize_t C, Py_ssize_t G, const floating* w,
                      const floating* b, const double* mean, const double* rstd, double* sums,
                      double* scratch, floating* vec, floating* grad_w,
                      floating* grad_b, int act, int n_threads) noexcept nogil:
    """sums: 2*C per sample; scratch, vec: one set per thread. At one thread and without
    an activation, sample n's dx pass prefetches sample n + 1's x and dy, as cl_forward
    does (plain, 1 thread, cold, same shapes: 1.01x, 1.15x, 1.09x). With an activation
    the sums pass computes enough to hide its own reads: prefetching measured 0.95-1.0x.
    Without an activation, dx of STREAM_BYTES and more is streamed, as BatchNorm's: its
    lines are then not read first. Kernels A/B, 1 thread, GroupNorm(32) (8,256,56,56),
    (8,128,64,64), (16,512,16,16), 6 interleaved rounds, two runs: 1.11-1.15x, 1.12-1.36x,
    1.09-1.10x; 2 threads 1.06-1.15x, 1.05-1.16x, 1.12-1.16x (the last, 8 MiB, stays
    below STREAM_BYTES with BatchNorm's). With an activation dx holds g, read just
    before: streamed 0.79-0.99x at 1 thread."""
    cdef RowPlan p = row_plan(S, C)
    cdef Py_ssize_t n, t, c, cg = C // G
    cdef double tw, tb
    cdef bint stream = (act == ACT_NONE
                        and N * S * C * <Py_ssize_t>sizeof(floating) >= STREAM_BYTES)
    if by_sample(N, n_threads):
        for n in prange(N, num_threads=n_threads, schedule="static"):
            t = threadid()
            cl_backward_sample(x, dy, dx, &p, n, S, C, G, w, b, mean, rstd, sums + 2 * C * n,
                               scratch + rows_scratch(&p, 2) * t, vec + 6 * C * t, act, 1,
                               stream, 0)
    else:
        for n in range(N):
            cl_backward_sample(x, dy, dx, &p, n, S, C, G, w, b, mean, rstd, sums + 2 * C * n,
                               scratch, vec, act, n_threads, stream,
                               S * C if n + 1 < N and n_threads == 1 and act == ACT_NONE else 0)
    # weight/bias gradients: samples folded in order
    for c in range(C):
        tw = 0.0
        tb = 0.0
        for n in range(N):
            tb += sums[2 * C * n + c]
            tw += sums[2 * C * n + C + c] * rstd[n * G + c // cg]
        grad_w[c] = <floating>tw
        grad_b[c] = <floating>tb


def groups_cl_forward(cnp.ndarray x, cnp.ndarray weight, cnp.ndarray bias, Py_ssize_t N,
                      Py_ssize_t S, Py_ssize_t C, Py_ssize_t G, double eps, cnp.ndarray y,
                      cnp.ndarray mean, cnp.ndarray rstd, object var, int n_threads,
                      int act=ACT_NONE):
    """GroupNorm forward on channels-last memory, y = act(normalized x).

    IN  x: (N, S, C) C-contiguous, S > 0; weight, bias: (C,) x's dtype; G divides C.
    OUT y: (N, S, C); mean, rstd (and var unless None): (N*G,) float64 per (n, group).
    Returns whether some group's statistics are not finite (see _overflow.py).
    """
    cdef RowPlan p = row_plan(S, C)
    cdef Py_ssize_t sets = n_threads if by_sample(N, n_threads) else 1
    # float64 work, one set per thread: rows_moments' scratch, then 3*C channel values
    cdef cnp.ndarray work = np.empty(sets * (rows_scratch(&p, 4) + 3 * C))
    cdef double* scratch = <double*>cnp.PyArray_DATA(work)
    cdef double* ch = scratch + sets * rows_scratch(&p, 4)
    cdef cnp.ndarray vec = np.empty(3 * C * sets, dtype=x.dtype)
    cdef double* p_mean = f64_ptr(mean)
    cdef double* p_rstd = f64_ptr(rstd)
    cdef double* p_var = f64_ptr(var)
    if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT:
        with nogil:
            cl_forward(<float*>cnp.PyArray_DATA(x), <float*>cnp.PyArray_DATA(y), N, S, C, G,
                       <float*>cnp.PyArray_DATA(weight), <float*>cnp.PyArray_DATA(bias), eps,
                       p_mean, p_rstd, p_var, ch, scratch, <float*>cnp.PyArray_DATA(vec),
                       act, n_threads)
    else:
        with nogil:
            cl_forward(<double*>cnp.PyArray_DATA(x), <double*>cnp.PyArray_DATA(y), N, S, C, G,
                       <double*>cnp.PyArray_DATA(weight), <double*>cnp.PyArray_DATA(bias), eps,
                       p_mean, p_rstd, p_var, ch, scratch, <double*>cnp.PyArray_DATA(vec),
                       act, n_threads)
    return _statistics_overflowed(p_mean, p_rstd, N * G)


def groups_cl_backward(cnp.ndarray x, cnp.ndarray dy, cnp.ndarray weight, Py_ssize_t N,
                       Py_ssize_t S, Py_ssize_t C, Py_ssize_t G, cnp.ndarray mean,
                       cnp.ndarray rstd, cnp.ndarray dx, cnp.ndarray grad_weight,
                       cnp.ndarray grad_bias, int n_threads, int act=ACT_NONE,
                       cnp.ndarray bias=None):
    """GroupNorm backward on channels-last memory.

    IN  x, dy: (N, S, C), S > 0; weight: (C,); mean, rstd: (N*G,) float64 from the forward;
        act: the forward's activation, with its bias (C,) when act != 0.
    OUT dx: (N, S, C); grad_weight, grad_bias: (C,) in x's dtype.
    """
    cdef RowPlan p = row_plan(S, C)
    cdef Py_ssize_t sets = n_threads if by_sample(N, n_threads) else 1
    # float64 work: rows_grad_sums' scratch (one per thread), then 2*C sums per sample
    cdef cnp.ndarray work = np.empty(sets * rows_scratch(&p, 2) + 2 * C * N)
    cdef double* scratch = <double*>cnp.PyArray_DATA(work)
    cdef double* sums = scratch + sets * rows_scratch(&p, 2)
    cdef cnp.ndarray vec = np.empty(6 * C * sets, dtype=x.dtype)
    cdef double* p_mean = f64_ptr(mean)
    cdef double* p_rstd = f64_ptr(rstd)
    cdef void* p_bias = data_or_null(bias)
    if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT:
        with nogil:
            cl_backward(<float*>cnp.PyArray_DATA(x), <float*>cnp.PyArray_DATA(dy),
                        <float*>cnp.PyArray_DATA(dx), N, S, C, G,
                        <float*>cnp.PyArray_DATA(weight), <float*>p_bias, p_mean, p_rstd,
                        sums, scratch, <float*>cnp.PyArray_DATA(vec),
                        <float*>cnp.PyArray_DATA(grad_weight),
                        <float*>cnp.PyArray_DATA(grad_bias), act, n_threads)
    else:
        with nogil:
            cl_backward(<double*>cnp.PyArray_DATA(x), <double*>cnp.PyArray_DATA(dy),
                        <double*>cnp.PyArray_DATA(dx), N, S, C, G,
                        <double*>cnp.PyArray_DATA(weight), <double*>p_bias, p_mean, p_rstd,
                        sums, scratch, <double*>cnp.PyArray_DATA(vec),
                        <double*>cnp.PyArray_DATA(grad_weight),
                        <double*>cnp.PyArray_DATA(grad_bias), act, n_threads)
