# Per-channel kernel family: statistics over every axis but the channel axis
# (BatchNorm1d/2d/3d and SyncBatchNorm).
#
# Every input is a C-contiguous (N, C, S) view: (N, C), (N, C, L), NCHW and
# NCDHW reshape to it, and channels-last memory (NHWC, NDHWC) is (rows, C, 1).
# Three strategies for the statistics, chosen by the shape alone:
#   * runs (many samples of short runs, see use_runs): memory is read in order,
#     sample after sample; each of the C runs of a sample goes into its
#     channel's partial sums. Stripes are groups of whole samples;
#   * segments (other S > 1): channel c is N runs of S contiguous values, cut
#     into units (see _common.pxd), units into stripes;
#   * rows (S == 1): a row holds one value of every channel, so inner loops
#     run along channels with one accumulator per channel.
# Partial results are folded in unit then stripe order: the result depends on
# the shape only, never on the thread count or the code path. Elementwise
# passes (normalize, backward apply) always walk memory in order.
#
# Public entry points (the Python layer validates everything first; these
# trust their inputs, never raise, and run without the GIL):
#   channel_moments         IN x               OUT mean, m2 (float64, per channel)
#   channel_normalize       IN x, mean, scale, shift   OUT y = act((x - mean)*scale + shift)
#   channel_forward_train   both of the above, fused per channel when it fits in cache
#   channel_grad_sums       IN x, dy, mean     OUT sum(dy), sum(dy * (x - mean))
#   channel_backward_apply  IN x, dy, mean, k_dy, k_x, k_0   OUT dx = k_dy*dy + k_x*(x-mean) + k_0
#   channel_backward        grad sums, coefficients and apply, fused per channel when it fits
#
# act is a fused activation's code (_activations.pxd; 0 = none). Backward with
# an activation puts g = dy * act'(z) in dy's place, z recomputed from x: the
# sums form g in short pieces as they read x and dy (run_act_grad_sums), and
# either keep it in dx, where the dx pass reads it, or, for a cheap activation
# (act_grad_is_cheap) over memory, form it again in the dx pass
# (run_act_affine_backward) rather than write and read it back.

cimport numpy as cnp
from libc.math cimport sqrt
import numpy as np
from cython cimport floating
from cython.parallel cimport parallel, prange

from fastnorm._common cimport (
    FN_COLUMN_BLOCK, FN_COLUMN_ROWS, MAX_STRIPES, STREAM_BYTES, STREAM_RUN_BYTES, UNIT_ELEMS,
    Moments, block_moments,
    affine_coefficients, chan_merge, channels_affine, channels_backward, cols_grad_sums,
    cols_moments, cols_shifted_sums, fence_if, fn_column_rows_per_lane, fn_line_twin,
    fn_prefetch_lines_l2, fn_stream_copy, fold_mean_tail,
    row_centered_sums, run_affine_backward, split_hi_lo, stripe_start,
)
from fastnorm._activations cimport (
    ACT_NONE, ACT_RELU, STREAM_ACT_CHUNK_BYTES, act_grad_is_cheap, act_rows_interleave,
    channels_act_grad, channels_relu, cols_act_grad_sums, run_act_affine_backward,
    run_act_grad_sums, run_activate, run_affine_act,
)

# A channel up to this size is normalized straight after its statistics,
# while it is still in cache: one read of x from memory instead of two.
cdef Py_ssize_t FUSE_CHANNEL_BYTES = 1 << 20

cdef extern from *:
    """
    #if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    static int fn_cpu_is_intel(void) { __builtin_cpu_init(); return __builtin_cpu_is("intel"); }
    #else
    static int fn_cpu_is_intel(void) { return 0; }
    #endif
    """
    int fn_cpu_is_intel() noexcept nogil

# Whether channels of short runs (FUSED_RUN_BYTES or less) that fit in cache are fused
# per channel too (use_runs). Which walk wins depends on the CPU, so the choice is made
# once per process, from the CPU's vendor: results then depend on the shape and the
# machine, never on the thread count. Kernels A/B, 8 interleaved rounds, float32,
# caches flushed before each call (a 96 MiB sweep), fused against runs:
# - Intel Xeon (Sapphire Rapids class) VM, BatchNorm1d (64,128,512), (32,64,1024),
#   (16,256,256), BatchNorm2d (64,64,28,28), (32,128,14,14): train 1.24-1.72x at
#   1 thread, 1.08-1.52x at 2; backward 1.12-1.39x and 0.97-1.20x (the smallest shape the
#   lower end); eval unchanged. With warm caches (repeated calls) train 1.34-1.78x,
#   backward 1.23-1.34x at 1 thread; SyncBatchNorm (one process) train 1.22-1.42x,
#   backward 1.03-1.16x. This L3 serves one core at ~20 GB/s, little more
#   than memory (11-15 GB/s), so the runs' second read costs almost a read from memory.
# - AMD Zen 3 VM (session 13): runs of 512 or 196 values fused ran 0.62-0.83x, runs of
#   1024 values 0.88-1.07x: there the channel-major walk's short runs cost more.
# - AMD Zen 5 (EPYC family 26) VM, AVX-512 build, the five shapes above, two runs:
#   mixed, so AMD keeps runs. Arrays of 12-16 MiB fused train 1.13-1.29x, backward
#   0.97-1.33x; arrays of 3-8 MiB train 0.79-1.03x, backward 0.60-1.10x (its L3 reads the
#   runs' second pass back faster than the fused walk's short runs cost).
cdef bint FUSE_SHORT_RUNS = fn_cpu_is_intel()


def _set_fuse_short_runs(bint fuse):
    """Override the CPU's choice of walk for short runs (tests run both); returns the
    previous setting."""
    global FUSE_SHORT_RUNS
    previous = FUSE_SHORT_RUNS
    FUSE_SHORT_RUNS = fuse
    return previous

# ---------------------------------------------------------------- planning

cdef struct SegmentPlan:
    # Units of one channel in the segments strategy: a unit is rows
    # [n0, n0 + unit_rows) x columns [s0, s0 + unit_cols) of the (N, S) plane.
    Py_ssize_t N, C, S
    Py_ssize_t unit_rows, unit_cols, units_per_row, n_units, n_stripes


cdef inline SegmentPlan segment_plan(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S) noexcept nogil:
    cdef SegmentPlan p
    p.N = N
    p.C = C
    p.S = S
    if S >= UNIT_ELEMS:
        p.unit_cols = UNIT_ELEMS
        p.unit_rows = 1
    else:
        p.unit_cols = S
        p.unit_rows = max(1, UNIT_ELEMS // S)
    p.units_per_row = (S + p.unit_cols - 1) // p.unit_cols
    p.n_units = ((N + p.unit_rows - 1) // p.unit_rows) * p.units_per_row
    p.n_stripes = min(p.n_units, <Py_ssize_t>MAX_STRIPES)
    return p


cdef inline void segment_unit(SegmentPlan* p, Py_ssize_t c, Py_ssize_t u, Py_ssize_t* offset,
                              Py_ssize_t* nrows, Py_ssize_t* ncols) noexcept nogil:
    """Where unit u of channel c starts, and its extent (rows are C*S apart)."""
    cdef Py_ssize_t n0 = (u // p.units_per_row) * p.unit_rows
    cdef Py_ssize_t s0 = (u % p.units_per_row) * p.unit_cols
    nrows[0] = min(p.N, n0 + p.unit_rows) - n0
    ncols[0] = min(p.S, s0 + p.unit_cols) - s0
    offset[0] = (n0 * p.C + c) * p.S + s0


cdef enum:
    STRIPE_UNITS = 2


cdef struct RowPlan:
    # Units in the rows strategy: a unit is unit_rows consecutive rows of one
    # block of at most FN_COLUMN_BLOCK channels. Tasks are (stripe, block) pairs.
    Py_ssize_t R, C
    Py_ssize_t block, n_blocks, unit_rows, n_units, n_stripes


cdef inline RowPlan row_plan(Py_ssize_t R, Py_ssize_t C) noexcept nogil:
    cdef RowPlan p
    p.R = R
    p.C = C
    p.block = min(C, <Py_ssize_t>FN_COLUMN_BLOCK)
    p.n_blocks = (C + p.block - 1) // p.block
    # FN_COLUMN_ROWS terms per working-precision accumulator of the column kernels
    p.unit_rows = FN_COLUMN_ROWS * fn_column_rows_per_lane(p.block, C)
    p.n_units = (R + p.unit_rows - 1) // p.unit_rows
    # at least STRIPE_UNITS units per stripe where there are that many: a stripe of
    # one unit takes its exact two-pass moments (rows_moments), twice the reads of the
    # one-pass sums of a longer stripe
    p.n_stripes = max(1, min(p.n_units // STRIPE_UNITS, <Py_ssize_t>MAX_STRIPES))
    return p


cdef enum:
    # The runs strategy takes (N, C, S) data with at least this many samples
    # (enough stripes for every thread) and runs of at most this many bytes
    # (a channel-major walk restarts the prefetchers at each run and crosses
    # a page per run; longer runs amortize that).
    RUNS_MIN_SAMPLES = 8
    RUNS_MAX_BYTES = 16384
    # ... except runs of more than this many bytes (of any length where FUSE_SHORT_RUNS)
    # in channels that fit in cache (use_runs): those read well channel by channel, and
    # fuse per channel instead
    FUSED_RUN_BYTES = 8192
    # Rows whose mean is the shift of a stripe's one-pass sums (rows strategy)
    PILOT_ROWS = 8
    # Rows per call of a plain channels-last forward (rows_affine)
    AFFINE_ROWS = 16
    # Values of a call small enough that rows_affine and rows_affine_backward skip their
    # parallel region at one thread (the plain loop compiled 8% slower for large calls)
    SMALL_CALL_VALUES = 1 << 16


cdef inline bint use_runs(Py_ssize_t N, Py_ssize_t S, Py_ssize_t itemsize) noexcept nogil:
    """The runs strategy for the statistics and gradient sums of (N, C, S) data: many
    samples of short runs, but not runs of more than FUSED_RUN_BYTES in a channel whose x
    and dy fit in FUSE_CHANNEL_BYTES. Those channels go to the segments strategy, where
    fuse_per_channel normalizes (or forms dx of) each channel right after its
    statistics, reading x (and dy) from memory once instead of twice. Kernels A/B, 6
    interleaved rounds, float32: BatchNorm2d (32,64,56,56) train 1.26-1.39x at 1 thread
    and 1.10-1.19x at 2, backward 1.12-1.21x and 1.09-1.23x (with relu the larger);
    BatchNorm1d (32,64,3000) train 1.15-1.30x, backward 0.94-1.31x. Shorter runs stay
    in runs: (32,64,1024) backward fused 0.88-1.07x, (32,64,2048) 0.97-1.27x, and runs of
    512 or 196 values 0.62-0.83x (AMD Zen 3); on Intel CPUs, where those fused ran
    faster, channels of short runs that fit are fused as well (FUSE_SHORT_RUNS). The
    choice depends on the shape and that setting, never on the thread count."""
    return (S > 1 and N >= RUNS_MIN_SAMPLES and S * itemsize <= RUNS_MAX_BYTES
            and not ((FUSE_SHORT_RUNS or S * itemsize > FUSED_RUN_BYTES)
                     and 2 * N * S * itemsize <= FUSE_CHANNEL_BYTES))


cdef inline bint fuse_per_channel(SegmentPlan* p, Py_ssize_t itemsize, int arrays,
                                  int n_threads) noexcept nogil:
    """Whole channels per thread when the channel (of `arrays` inputs) fits in
    cache and there are enough channels to keep every thread busy; otherwise
    split the reduction. Never for shapes of the runs strategy (its arithmetic
    is another, and a choice that depends on n_threads must not change it)."""
    return (not use_runs(p.N, p.S, itemsize) and p.C >= 2 * n_threads
            and p.N * p.S * itemsize * arrays <= FUSE_CHANNEL_BYTES)


# --------------------------------------------------- segments: statistics

cdef inline Moments segment_stripe_moments(const floating* x, SegmentPlan* p, Py_ssize_t c,
                                           Py_ssize_t g) noexcept nogil:
    cdef Moments acc
    cdef Py_ssize_t u, first, stop, offset, nrows, ncols
    acc.count = 0.0
    acc.mean = 0.0
    acc.m2 = 0.0
    first = stripe_start(p.n_units, p.n_stripes, g)
    stop = stripe_start(p.n_units, p.n_stripes, g + 1)
    for u in range(first, stop):
        segment_unit(p, c, u, &offset, &nrows, &ncols)
        chan_merge(&acc, block_moments(x + offset, nrows, ncols, p.C * p.S))
    return acc


cdef inline Moments segment_channel_moments(const floating* x, SegmentPlan* p,
                                            Py_ssize_t c) noexcept nogil:
    cdef Moments acc
    cdef Py_ssize_t g
    acc.count = 0.0
    acc.mean = 0.0
    acc.m2 = 0.0
    for g in range(p.n_stripes):
        chan_merge(&acc, segment_stripe_moments(x, p, c, g))
    return acc


cdef void segment_moments_split(const floating* x, SegmentPlan* p, double* mean, double* m2,
                                double* scratch, int n_threads) noexcept nogil:
    """Statistics with every (channel, stripe) pair a task; scratch holds C*n_stripes*3."""
    cdef Py_ssize_t task, c, g
    cdef Moments part, acc
    for task in prange(p.C * p.n_stripes, num_threads=n_threads, schedule="static"):
        part = segment_stripe_moments(x, p, task // p.n_stripes, task % p.n_stripes)
        scratch[3 * task] = part.count
        scratch[3 * task + 1] = part.mean
        scratch[3 * task + 2] = part.m2
    for c in range(p.C):
        acc.count = 0.0
        acc.mean = 0.0
        acc.m2 = 0.0
        for g in range(p.n_stripes):
            part.count = scratch[3 * (c * p.n_stripes + g)]
            part.mean = scratch[3 * (c * p.n_stripes + g) + 1]
            part.m2 = scratch[3 * (c * p.n_stripes + g) + 2]
            chan_merge(&acc, part)
        mean[c] = acc.mean
        m2[c] = acc.m2


# ------------------------------------------------ segments: elementwise

cdef inline void segment_stripe_affine(const floating* x, floating* y, SegmentPlan* p,
                                       Py_ssize_t c, Py_ssize_t g, double mean, double scale,
                                       double shift, int act, bint stream=False) noexcept nogil:
    """y = act(z), z = (x - mean) * scale + shift; stream: y written with non-temporal
    stores."""
    cdef Py_ssize_t u, r, first, stop, offset, nrows, ncols, at
    cdef floating mean_hi, mean_lo
    split_hi_lo(mean, &mean_hi, &mean_lo)
    first = stripe_start(p.n_units, p.n_stripes, g)
    stop = stripe_start(p.n_units, p.n_stripes, g + 1)
    for u in range(first, stop):
        segment_unit(p, c, u, &offset, &nrows, &ncols)
        for r in range(nrows):
            at = offset + r * p.C * p.S
            run_affine_act(x + at, y + at, NULL, NULL, ncols, mean_hi, mean_lo,
                           <floating>scale, <floating>shift, act, stream)


cdef inline void segment_stripe_grad_sums(const floating* x, const floating* dy, SegmentPlan* p,
                                          Py_ssize_t c, Py_ssize_t g, double mean,
                                          double* sum_dy, double* sum_dy_xmu,
                                          int act=ACT_NONE, floating z_scale=0,
                                          floating z_shift=0,
                                          floating* g_out=NULL) noexcept nogil:
    """Add the stripe's sum(dy) and sum(dy * (x - mean)); with an activation, of
    g = dy * act'(z), z = (x - mean) * z_scale + z_shift, also written to g_out (laid out
    like x) when given (see run_act_grad_sums)."""
    cdef Py_ssize_t u, r, first, stop, offset, nrows, ncols, at
    cdef floating mean_hi, mean_lo
    split_hi_lo(mean, &mean_hi, &mean_lo)
    first = stripe_start(p.n_units, p.n_stripes, g)
    stop = stripe_start(p.n_units, p.n_stripes, g + 1)
    for u in range(first, stop):
        segment_unit(p, c, u, &offset, &nrows, &ncols)
        for r in range(nrows):
            at = offset + r * p.C * p.S
            run_act_grad_sums(x + at, dy + at, ncols, mean_hi, mean_lo, act, z_scale, z_shift,
                              NULL if g_out == NULL else g_out + at, sum_dy, sum_dy_xmu)


cdef inline void segment_stripe_backward(const floating* x, const floating* dy, floating* dx,
                                         SegmentPlan* p, Py_ssize_t c, Py_ssize_t g, double mean,
                                         double k_dy, double k_x, double k_0,
                                         bint stream=False) noexcept nogil:
    """dx of the stripe's runs; stream: non-temporal stores (see _backward)."""
    cdef Py_ssize_t u, r, first, stop, offset, nrows, ncols, at
    cdef floating mean_hi, mean_lo
    split_hi_lo(mean, &mean_hi, &mean_lo)
    first = stripe_start(p.n_units, p.n_stripes, g)
    stop = stripe_start(p.n_units, p.n_stripes, g + 1)
    for u in range(first, stop):
        segment_unit(p, c, u, &offset, &nrows, &ncols)
        for r in range(nrows):
            at = offset + r * p.C * p.S
            run_affine_backward(x + at, dy + at, dx + at, ncols, mean_hi, mean_lo,
                                <floating>k_dy, <floating>k_x, <floating>k_0, stream)


# ------------------------------------------------------- runs strategy

cdef void runs_stripe_moments(const floating* x, Py_ssize_t C, Py_ssize_t S, Py_ssize_t n0,
                              Py_ssize_t n1, double* part) noexcept nogil:
    """Per-channel mean and m2 of samples [n0, n1) into part[c], part[C + c]
    (part: 3 * C doubles, the last C scratch).

    One pass in memory order: channel c's runs are summed about a shift K, the
    exact mean of the stripe's first run of c rounded to the working precision.
    Shifted sums lose a factor 1 + ((mean - K) / std)**2 of the working
    precision, so they are kept while K is within 2 standard deviations of the
    mean; otherwise (drifting data) the channel's runs are reduced again
    exactly, run by run (block_moments, Chan merges)."""
    cdef Py_ssize_t n, c
    cdef double count = <double>((n1 - n0) * S), s1, s2, delta
    cdef double* shift = part + 2 * C
    cdef Moments acc
    for c in range(C):
        shift[c] = <double><floating>block_moments(x + (n0 * C + c) * S, 1, S, S).mean
        part[c] = 0.0
        part[C + c] = 0.0
    for n in range(n0, n1):
        for c in range(C):
            row_centered_sums(x + (n * C + c) * S, S, <floating>shift[c], &part[c], &part[C + c])
    for c in range(C):
        s1 = part[c]
        s2 = part[C + c]
        delta = s1 / count                      # mean - K
        if delta * delta * count > 4.0 * (s2 - s1 * delta):
            acc.count = 0.0
            acc.mean = 0.0
            acc.m2 = 0.0
            for n in range(n0, n1):
                chan_merge(&acc, block_moments(x + (n * C + c) * S, 1, S, S))
            part[c] = acc.mean
            part[C + c] = acc.m2
        else:
            part[c] = shift[c] + delta
            part[C + c] = max(s2 - s1 * delta, 0.0)


cdef void runs_moments(const floating* x, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                       double* mean, double* m2, double* scratch, int n_threads) noexcept nogil:
    """Per-channel statistics of (N, C, S) data, runs strategy. scratch: 3*C*stripes."""
    cdef Py_ssize_t n_stripes = min(N, <Py_ssize_t>MAX_STRIPES), g, c
    cdef Moments acc, part
    for g in prange(n_stripes, num_threads=n_threads, schedule="static"):
        runs_stripe_moments(x, C, S, stripe_start(N, n_stripes, g),
                            stripe_start(N, n_stripes, g + 1), scratch + 3 * C * g)
    for c in range(C):
        acc.count = 0.0
        acc.mean = 0.0
        acc.m2 = 0.0
        for g in range(n_stripes):
            part.count = <double>(S * (stripe_start(N, n_stripes, g + 1)
                                       - stripe_start(N, n_stripes, g)))
            part.mean = scratch[3 * C * g + c]
            part.m2 = scratch[3 * C * g + C + c]
            chan_merge(&acc, part)
        mean[c] = acc.mean
        m2[c] = acc.m2


cdef void runs_stripe_grad_sums(const floating* x, const floating* dy, Py_ssize_t C,
                                Py_ssize_t S, Py_ssize_t n0, Py_ssize_t n1,
                                const floating* mean_hi, const floating* mean_lo,
                                double* part, int act, const floating* z,
                                floating* g_out) noexcept nogil:
    """Per-channel sum(dy), sum(dy*(x-mean)) of samples [n0, n1) into part[c], part[C + c]
    (with an activation: of g, see run_act_grad_sums; z: scale row then shift row)."""
    cdef Py_ssize_t n, c, at
    for c in range(2 * C):
        part[c] = 0.0
    for n in range(n0, n1):
        for c in range(C):
            at = (n * C + c) * S
            run_act_grad_sums(x + at, dy + at, S, mean_hi[c], mean_lo[c], act,
                              z[c] if act != ACT_NONE else 0, z[C + c] if act != ACT_NONE else 0,
                              NULL if g_out == NULL else g_out + at, &part[c], &part[C + c])


cdef void runs_grad_sums(const floating* x, const floating* dy, Py_ssize_t N, Py_ssize_t C,
                         Py_ssize_t S, const floating* mean_hi, const floating* mean_lo,
                         double* sum_dy, double* sum_dy_xmu, double* scratch,
                         int n_threads, int act=ACT_NONE, const floating* z=NULL,
                         floating* g_out=NULL) noexcept nogil:
    """Per-channel sum(dy), sum(dy*(x-mean)), runs strategy. scratch: 2*C*stripes.
    With an activation, sums of g = dy * act'(z) (z: scale row then shift row of C),
    also written to g_out when given."""
    cdef Py_ssize_t n_stripes = min(N, <Py_ssize_t>MAX_STRIPES), g, c
    for g in prange(n_stripes, num_threads=n_threads, schedule="static"):
        runs_stripe_grad_sums(x, dy, C, S, stripe_start(N, n_stripes, g),
                              stripe_start(N, n_stripes, g + 1), mean_hi, mean_lo,
                              scratch + 2 * C * g, act, z, g_out)
    for c in range(C):
        sum_dy[c] = 0.0
        sum_dy_xmu[c] = 0.0
        for g in range(n_stripes):
            sum_dy[c] += scratch[2 * C * g + c]
            sum_dy_xmu[c] += scratch[2 * C * g + C + c]


# ------------------------------------------------------- rows strategy

cdef void rows_stripe_exact(const floating* x, RowPlan* p, Py_ssize_t first, Py_ssize_t stop,
                            Py_ssize_t c0, Py_ssize_t nc, double* part_mean, double* part_m2,
                            double* unit_mean, double* unit_m2) noexcept nogil:
    """Exact statistics of a stripe's block of channels: two-pass moments per unit,
    units folded in order (Chan)."""
    cdef Py_ssize_t u, c, r0
    cdef double count, nrows, n, delta, w_unit, w_cross
    r0 = first * p.unit_rows
    count = min(p.R, r0 + p.unit_rows) - r0
    cols_moments(x + r0 * p.C + c0, <Py_ssize_t>count, p.C, nc, part_mean, part_m2)
    for u in range(first + 1, stop):
        r0 = u * p.unit_rows
        nrows = min(p.R, r0 + p.unit_rows) - r0
        cols_moments(x + r0 * p.C + c0, <Py_ssize_t>nrows, p.C, nc, unit_mean, unit_m2)
        n = count + nrows
        w_unit = nrows / n
        w_cross = count * nrows / n
        for c in range(nc):
            delta = unit_mean[c] - part_mean[c]
            part_mean[c] = part_mean[c] + delta * w_unit
            part_m2[c] = part_m2[c] + unit_m2[c] + delta * delta * w_cross
        count = n


cdef inline Py_ssize_t rows_scratch(RowPlan* p, Py_ssize_t rows) noexcept nogil:
    """Doubles of a rows strategy's scratch: `rows` rows of p.block per task
    (rows_moments: 4, rows_grad_sums: 2)."""
    return p.n_stripes * p.n_blocks * rows * p.block


cdef inline double* task_row(double* scratch, RowPlan* p, Py_ssize_t task, Py_ssize_t rows,
                             Py_ssize_t i) noexcept nogil:
    """Row i of task's `rows` rows of p.block doubles in a rows strategy's scratch."""
    return scratch + (task * rows + i) * p.block


cdef void rows_moments_task(const floating* x, RowPlan* p, double* scratch,
                            Py_ssize_t task) noexcept nogil:
    """One (stripe, channel block) of rows_moments: its stripe's mean and m2 into the
    task's first two scratch rows."""
    cdef Py_ssize_t g, b, u, first, stop, c, c0, nc, r0
    cdef double* part_mean = task_row(scratch, p, task, 4, 0)
    cdef double* part_m2 = task_row(scratch, p, task, 4, 1)
    cdef double* shift = task_row(scratch, p, task, 4, 2)
    cdef double* unit_m2 = task_row(scratch, p, task, 4, 3)
    cdef double count, s1, s2, centered
    cdef bint drifted
    g = task // p.n_blocks
    b = task % p.n_blocks
    c0 = b * p.block
    nc = min(p.C, c0 + p.block) - c0
    first = stripe_start(p.n_units, p.n_stripes, g)
    stop = stripe_start(p.n_units, p.n_stripes, g + 1)
    if stop - first == 1:  # a single unit: its exact moments are the stripe's
        rows_stripe_exact(x, p, first, stop, c0, nc, part_mean, part_m2, shift, unit_m2)
        return
    r0 = first * p.unit_rows
    for c in range(nc):
        shift[c] = 0.0
        unit_m2[c] = 0.0   # receives the pilot's squares, unused
    cols_shifted_sums(x + r0 * p.C + c0, PILOT_ROWS, p.C, nc, NULL, shift, unit_m2)
    for c in range(nc):
        shift[c] = <double><floating>(shift[c] / PILOT_ROWS)
        part_mean[c] = 0.0
        part_m2[c] = 0.0
    for u in range(first, stop):
        r0 = u * p.unit_rows
        cols_shifted_sums(x + r0 * p.C + c0, min(p.R, r0 + p.unit_rows) - r0, p.C, nc, shift,
                          part_mean, part_m2)
    count = <double>(min(p.R, stop * p.unit_rows) - first * p.unit_rows)
    drifted = False
    for c in range(nc):
        s1 = part_mean[c]
        s2 = part_m2[c]
        centered = s2 - s1 * (s1 / count)
        if s1 * s1 > 4.0 * centered * count:  # |mean - K| > 2 std
            drifted = True
        part_mean[c] = shift[c] + s1 / count
        part_m2[c] = 0.0 if centered < 0.0 else centered   # a NaN stays: see _overflow.py
    if drifted:
        rows_stripe_exact(x, p, first, stop, c0, nc, part_mean, part_m2, shift, unit_m2)


cdef void rows_moments(const floating* x, RowPlan* p, double* mean, double* m2,
                       double* scratch, int n_threads) noexcept nogil:
    """Per-channel statistics of (R, C) rows. scratch: tasks * 4 * block float64
    (task_rows).

    Each (stripe, channel block) is summed in one pass about a shift K per channel:
    the mean of the stripe's first PILOT_ROWS rows, rounded to the working precision
    (a whole unit, two-pass, cost a third of the work at 1024 channels).
    Shifted sums lose at most a factor 1 + ((mean - K) / std)**2 of the working
    precision's accuracy, so they are kept while K is within 2 standard deviations
    of the stripe's mean (2 standard deviations are 5.7 standard errors of a pilot
    mean of 8 rows); otherwise (data drifting along the rows) the stripe's block is
    recomputed exactly, unit by unit. Either way the result depends on the data only."""
    cdef Py_ssize_t task, g, b, c, first, stop
    cdef Moments acc, part
    if n_threads == 1:   # no parallel region: its setup costs tiny calls a microsecond
        for task in range(p.n_stripes * p.n_blocks):
            rows_moments_task(x, p, scratch, task)
    else:
        for task in prange(p.n_stripes * p.n_blocks, num_threads=n_threads, schedule="static"):
            rows_moments_task(x, p, scratch, task)
    # fold stripes in order, per channel
    for c in range(p.C):
        b = c // p.block
        acc.count = 0.0
        acc.mean = 0.0
        acc.m2 = 0.0
        for g in range(p.n_stripes):
            first = stripe_start(p.n_units, p.n_stripes, g)
            stop = stripe_start(p.n_units, p.n_stripes, g + 1)
            part.count = <double>(min(p.R, stop * p.unit_rows) - first * p.unit_rows)
            part.mean = task_row(scratch, p, g * p.n_blocks + b, 4, 0)[c - b * p.block]
            part.m2 = task_row(scratch, p, g * p.n_blocks + b, 4, 1)[c - b * p.block]
            chan_merge(&acc, part)
        mean[c] = acc.mean
        m2[c] = 0.0 if acc.m2 < 0.0 else acc.m2


cdef void rows_grad_sums_task(const floating* x, const floating* dy, RowPlan* p,
                              const floating* mean_hi, const floating* mean_lo, double* scratch,
                              int act, const floating* z_hi, const floating* z_scale,
                              const floating* z_shift, floating* g_out,
                              Py_ssize_t task) noexcept nogil:
    """One (stripe, channel block) of rows_grad_sums: its stripe's sums into the task's two
    scratch rows."""
    cdef Py_ssize_t g, b, u, first, stop, r0, r, c, c0, nc
    cdef double* part_g = task_row(scratch, p, task, 2, 0)
    cdef double* part_gx = task_row(scratch, p, task, 2, 1)
    g = task // p.n_blocks
    b = task % p.n_blocks
    c0 = b * p.block
    nc = min(p.C, c0 + p.block) - c0
    for c in range(nc):
        part_g[c] = 0.0
        part_gx[c] = 0.0
    first = stripe_start(p.n_units, p.n_stripes, g)
    stop = stripe_start(p.n_units, p.n_stripes, g + 1)
    for u in range(first, stop):
        # unit by unit: short working-precision sums, handed over in float64
        r0 = u * p.unit_rows
        if act_rows_interleave(act, fn_column_rows_per_lane(nc, p.C) * nc, sizeof(floating)):
            cols_act_grad_sums(x + r0 * p.C + c0, dy + r0 * p.C + c0, g_out + r0 * p.C + c0,
                               min(p.R, r0 + p.unit_rows) - r0, p.C, nc, mean_hi + c0,
                               mean_lo + c0, NULL if z_hi == NULL else z_hi + c0,
                               z_scale + c0, z_shift + c0, act, part_g, part_gx)
            continue
        if act != ACT_NONE:
            for r in range(r0, min(p.R, r0 + p.unit_rows)):
                row_affine_act(x + r * p.C, g_out + r * p.C, dy + r * p.C, c0, c0 + nc,
                               z_hi, z_scale, z_shift, act)
        cols_grad_sums(x + r0 * p.C + c0,
                       (dy if act == ACT_NONE else g_out) + r0 * p.C + c0,
                       min(p.R, r0 + p.unit_rows) - r0, p.C, nc, mean_hi + c0, mean_lo + c0,
                       part_g, part_gx)


cdef void rows_grad_sums(const floating* x, const floating* dy, RowPlan* p,
                         const floating* mean_hi, const floating* mean_lo, double* sum_dy,
                         double* sum_dy_xmu, double* scratch, int act,
                         const floating* z_hi, const floating* z_scale, const floating* z_shift,
                         floating* g_out, int n_threads) noexcept nogil:
    """Per-channel sum(dy), sum(dy*(x-mean)) of (R, C) rows. scratch: tasks * 2 * block.
    With an activation, g = dy * act'(z) is written to g_out, z from the coefficients z_*
    (affine_coefficients; z_hi may be NULL), and summed instead of dy while in cache: a
    unit's rows first, or row by row as they are summed (act_rows_interleave)."""
    cdef Py_ssize_t task, g, b, c
    if n_threads == 1:   # no parallel region (see rows_moments)
        for task in range(p.n_stripes * p.n_blocks):
            rows_grad_sums_task(x, dy, p, mean_hi, mean_lo, scratch, act, z_hi, z_scale,
                                z_shift, g_out, task)
    else:
        for task in prange(p.n_stripes * p.n_blocks, num_threads=n_threads, schedule="static"):
            rows_grad_sums_task(x, dy, p, mean_hi, mean_lo, scratch, act, z_hi, z_scale,
                                z_shift, g_out, task)
    for c in range(p.C):
        b = c // p.block
        sum_dy[c] = 0.0
        sum_dy_xmu[c] = 0.0
        for g in range(p.n_stripes):
            sum_dy[c] += task_row(scratch, p, g * p.n_blocks + b, 2, 0)[c - b * p.block]
            sum_dy_xmu[c] += task_row(scratch, p, g * p.n_blocks + b, 2, 1)[c - b * p.block]


cdef inline void row_affine_act(const floating* xrow, floating* yrow, const floating* dyrow,
                                Py_ssize_t c0, Py_ssize_t stop, const floating* hi,
                                const floating* scale, const floating* shift,
                                int act) noexcept nogil:
    """Channels [c0, stop) of one row: y = act(z), z = (x - hi[c]) * scale[c] + shift[c]
    (affine_coefficients; hi NULL: x * scale + shift); or, given dyrow, y = dy * act'(z)."""
    if dyrow == NULL and act == ACT_RELU:
        channels_relu(xrow + c0, yrow + c0, stop - c0, NULL if hi == NULL else hi + c0,
                      scale + c0, shift + c0)
    elif dyrow == NULL:
        channels_affine(xrow + c0, yrow + c0, 1, stop - c0, NULL if hi == NULL else hi + c0,
                        scale + c0, shift + c0)
        run_activate(yrow + c0, stop - c0, act)
    else:
        channels_act_grad(xrow + c0, dyrow + c0, yrow + c0, stop - c0,
                          NULL if hi == NULL else hi + c0, scale + c0, shift + c0, act)


cdef inline void affine_rows_chunk(const floating* x, floating* y, Py_ssize_t R,
                                   Py_ssize_t C, Py_ssize_t t, const floating* hi,
                                   const floating* scale, const floating* shift,
                                   bint stream) noexcept nogil:
    """Rows [t * AFFINE_ROWS, ...) of rows_affine's plain forward."""
    cdef Py_ssize_t r = t * AFFINE_ROWS
    channels_affine(x + r * C, y + r * C, min(R, r + AFFINE_ROWS) - r, C, hi, scale, shift,
                    stream)


cdef inline bint streams_act_rows(const void* y, Py_ssize_t C, Py_ssize_t itemsize) noexcept nogil:
    """Whether rows_affine can stream an activated output: rows of whole lines of a
    line-aligned y, so that no line is shared by two chunks (rows_act_streamed)."""
    return <size_t>y % 64 == 0 and (C * itemsize) % 64 == 0


cdef inline void act_chunk_streamed(const floating* x, floating* y, Py_ssize_t m, Py_ssize_t n,
                                    double* buf, const floating* hi, const floating* scale,
                                    const floating* shift, int act,
                                    Py_ssize_t ahead) noexcept nogil:
    """One chunk of rows_act_streamed: m rows of n channels (m > 1 only for whole rows)."""
    cdef floating* z = <floating*>fn_line_twin(buf, y)
    if ahead != 0:
        fn_prefetch_lines_l2(x + ahead, m * n * sizeof(floating))
    channels_affine(x, z, m, n, hi, scale, shift)
    run_activate(z, m * n, act)
    fn_stream_copy(y, z, m * n * sizeof(floating))


cdef void rows_act_streamed(const floating* x, floating* y, Py_ssize_t r0, Py_ssize_t r1,
                            Py_ssize_t C, const floating* hi, const floating* scale,
                            const floating* shift, int act, Py_ssize_t ahead) noexcept nogil:
    """Rows [r0, r1) of rows_affine with an activation, streamed: a chunk of at most
    STREAM_ACT_CHUNK_BYTES (whole rows, or a piece of a longer row) is formed in an L1
    scratch (z, then act(z) in place) and copied out with non-temporal stores
    (fn_stream_copy), so that y's lines are never read for ownership; same values as
    row_affine_act, and the chunk size of the rows family's fn_affine_act_streamed. ahead
    (values, 0: none): each chunk also prefetches x's lines that far ahead into L2, a few
    at a time. Out of line: the scratch stays in this frame."""
    cdef double buf[(STREAM_ACT_CHUNK_BYTES >> 3) + 8]    # a chunk, and a line to align it
    cdef Py_ssize_t chunk = STREAM_ACT_CHUNK_BYTES // sizeof(floating)
    cdef Py_ssize_t rows = max(1, chunk // C)    # whole rows per chunk
    cdef Py_ssize_t r, c0, m, n
    r = r0
    while r < r1:
        m = min(rows, r1 - r)
        c0 = 0
        while c0 < C:    # one pass for whole rows, pieces of chunk values of longer ones
            n = min(C - c0, chunk) if m == 1 else C
            act_chunk_streamed(x + r * C + c0, y + r * C + c0, m, n, buf,
                               NULL if hi == NULL else hi + c0, scale + c0, shift + c0, act,
                               ahead)
            c0 += n
        r += m


cdef void rows_affine(const floating* x, floating* y, Py_ssize_t R, Py_ssize_t C,
                      const floating* hi, const floating* scale, const floating* shift,
                      int act, int n_threads, bint stream=False,
                      Py_ssize_t ahead=0) noexcept nogil:
    """y = act(z) over every row and channel (row_affine_act). A plain forward
    goes AFFINE_ROWS rows per call (one call per row cost 8% more instructions at 128
    channels); stream: non-temporal stores, one fence per thread (with an activation
    only for whole-line rows, streams_act_rows, and then ahead as in rows_act_streamed)."""
    cdef Py_ssize_t r, t
    if act != ACT_NONE and stream and streams_act_rows(y, C, sizeof(floating)):
        if n_threads == 1:
            rows_act_streamed(x, y, 0, R, C, hi, scale, shift, act, ahead)
            fence_if(True)
            return
        with parallel(num_threads=n_threads):
            for t in prange((R + AFFINE_ROWS - 1) // AFFINE_ROWS, schedule="static"):
                rows_act_streamed(x, y, t * AFFINE_ROWS, min(R, (t + 1) * AFFINE_ROWS), C, hi,
                                  scale, shift, act, ahead)
            fence_if(True)
        return
    if act == ACT_NONE:
        # no parallel region for a small call at one thread (see rows_moments); larger
        # ones keep the parallel loop, whose outlined body gcc compiles tighter (the plain
        # loop, inlined into _channel_elementwise, took 8% more instructions on
        # (8,64,56,56) channels-last: 5.79M against 5.35M, callgrind)
        if n_threads == 1 and R * C <= SMALL_CALL_VALUES:
            for t in range((R + AFFINE_ROWS - 1) // AFFINE_ROWS):
                affine_rows_chunk(x, y, R, C, t, hi, scale, shift, stream)
            fence_if(stream)
            return
        with parallel(num_threads=n_threads):
            for t in prange((R + AFFINE_ROWS - 1) // AFFINE_ROWS, schedule="static"):
                affine_rows_chunk(x, y, R, C, t, hi, scale, shift, stream)
            fence_if(stream)
        return
    if n_threads == 1:
        for r in range(R):
            row_affine_act(x + r * C, y + r * C, NULL, 0, C, hi, scale, shift, act)
        return
    for r in prange(R, num_threads=n_threads, schedule="static"):
        row_affine_act(x + r * C, y + r * C, NULL, 0, C, hi, scale, shift, act)


cdef floating* affine_rows_coefficients(const double* mean, const double* scale,
                                        const double* shift, Py_ssize_t C,
                                        floating* out) noexcept nogil:
    """out[0:C] = hi, out[C:2C] = scale, out[2C:3C] = shift (affine_coefficients per
    channel); returns out's hi part, or NULL when every hi is 0 (no subtraction)."""
    cdef Py_ssize_t c
    cdef bint centered = True
    for c in range(C):
        affine_coefficients(mean[c], scale[c], shift[c], &out[c], &out[C + c], &out[2 * C + c])
        centered = centered and out[c] == 0
    return NULL if centered else out


cdef inline void row_backward_ahead(const floating* x, const floating* dy, floating* dx,
                                    Py_ssize_t r, Py_ssize_t C, const floating* mean_hi,
                                    const floating* k_dy, const floating* k_x,
                                    const floating* k_0, bint stream,
                                    Py_ssize_t ahead) noexcept nogil:
    """Row r of rows_affine_backward."""
    if ahead != 0:
        fn_prefetch_lines_l2(x + r * C + ahead, C * sizeof(floating))
        fn_prefetch_lines_l2(dy + r * C + ahead, C * sizeof(floating))
    channels_backward(x + r * C, dy + r * C, dx + r * C, C, mean_hi, k_dy, k_x, k_0, stream)


cdef void rows_affine_backward(const floating* x, const floating* dy, floating* dx,
                               Py_ssize_t R, Py_ssize_t C, const floating* mean_hi,
                               const floating* k_dy, const floating* k_x, const floating* k_0,
                               int n_threads, bint stream=False, Py_ssize_t ahead=0) noexcept nogil:
    """dx = k_dy * dy + k_x * (x - mean_hi) + k_0 per channel over (R, C) rows, k_0 with
    the mean's tail folded in (see channels_backward); stream: non-temporal stores, one
    fence per thread; ahead (values, 0: none): also prefetch x's and dy's rows that far
    ahead into L2, a row at a time."""
    cdef Py_ssize_t r
    if n_threads == 1 and R * C <= SMALL_CALL_VALUES:   # see rows_affine
        for r in range(R):
            row_backward_ahead(x, dy, dx, r, C, mean_hi, k_dy, k_x, k_0, stream, ahead)
        fence_if(stream)
        return
    with parallel(num_threads=n_threads):
        for r in prange(R, schedule="static"):
            row_backward_ahead(x, dy, dx, r, C, mean_hi, k_dy, k_x, k_0, stream, ahead)
        fence_if(stream)


# --------------------------------------------------------- coefficients

# Coefficients are returned as structs, not through pointers: inside prange,
# Cython makes a variable thread-private only when it is assigned directly.
cdef struct Normalization:
    double var      # biased variance
    double scale    # y = (x - mean) * scale + shift
    double shift


cdef struct BackwardCoefficients:
    double k_dy     # dx = k_dy * dy + k_x * (x - mean) + k_0
    double k_x
    double k_0


cdef inline Normalization normalize_coefficients(double m2, double count, double weight,
                                                 double bias, double eps) noexcept nogil:
    cdef Normalization n
    n.var = m2 / count
    n.scale = weight / sqrt(n.var + eps)
    n.shift = bias
    return n


cdef inline BackwardCoefficients backward_coefficients(double sum_dy, double sum_dy_xmu,
                                                       double count, double invstd, double weight,
                                                       bint training) noexcept nogil:
    """Training differentiates through the batch mean and variance:
      dx = w*invstd * (dy - mean(dy) - (x-mean)*invstd^2 * mean(dy*(x-mean)));
    eval treats the (running) statistics as constants: dx = w*invstd*dy."""
    cdef BackwardCoefficients k
    k.k_dy = weight * invstd
    if training and count > 0:
        k.k_x = -weight * invstd * invstd * invstd * sum_dy_xmu / count
        k.k_0 = -weight * invstd * sum_dy / count
    else:
        k.k_x = 0.0
        k.k_0 = 0.0
    return k


cdef extern from "<math.h>" nogil:
    double sqrt(double x)


# ---------------------------------------------------------- public API

def channel_moments(const floating[:, :, ::1] x, double[::1] mean, double[::1] m2, int n_threads):
    """Per-channel mean and sum of squared deviations of an (N, C, S) array.

    IN  x: (N, C, S) C-contiguous, N*S > 0.
    OUT mean, m2: (C,) float64.
    """
    _moments(&x[0, 0, 0], x.shape[0], x.shape[1], x.shape[2], &mean[0], &m2[0], n_threads)


cdef _moments(const floating* x, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, double* mean,
              double* m2, int n_threads):
    """channel_moments of the (N, C, S) array at x (N*S > 0)."""
    cdef SegmentPlan sp
    cdef RowPlan rp
    cdef cnp.ndarray work
    cdef double* scratch
    if use_runs(N, S, sizeof(floating)):
        work = np.empty(3 * C * min(N, <Py_ssize_t>MAX_STRIPES))
        scratch = <double*>cnp.PyArray_DATA(work)
        with nogil:
            runs_moments(x, N, C, S, mean, m2, scratch, n_threads)
    elif S == 1:
        rp = row_plan(N, C)
        work = np.empty(rows_scratch(&rp, 4))
        scratch = <double*>cnp.PyArray_DATA(work)
        with nogil:
            rows_moments(x, &rp, mean, m2, scratch, n_threads)
    else:
        sp = segment_plan(N, C, S)
        work = np.empty(C * sp.n_stripes * 3)
        scratch = <double*>cnp.PyArray_DATA(work)
        with nogil:
            segment_moments_split(x, &sp, mean, m2, scratch, n_threads)


def channel_normalize(cnp.ndarray x, cnp.ndarray mean, cnp.ndarray scale, cnp.ndarray shift,
                      cnp.ndarray y, int n_threads, int act=0):
    """y = act((x - mean[c]) * scale[c] + shift[c]), the mean subtracted in full precision.

    IN  x: (N, C, S) C-contiguous float32/float64; mean, scale, shift: (C,) float64.
    OUT y: like x. (Arrays, not typed memoryviews: see channel_forward_train.)
    """
    cdef Py_ssize_t N = cnp.PyArray_DIM(x, 0), C = cnp.PyArray_DIM(x, 1)
    cdef Py_ssize_t S = cnp.PyArray_DIM(x, 2)
    cdef const double* m = <const double*>cnp.PyArray_DATA(mean)
    cdef const double* a = <const double*>cnp.PyArray_DATA(scale)
    cdef const double* b = <const double*>cnp.PyArray_DATA(shift)
    if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT:
        _channel_elementwise(<const float*>cnp.PyArray_DATA(x), N, C, S, m, a, b, act,
                             <float*>cnp.PyArray_DATA(y), n_threads)
    else:
        _channel_elementwise(<const double*>cnp.PyArray_DATA(x), N, C, S, m, a, b, act,
                             <double*>cnp.PyArray_DATA(y), n_threads)


cdef inline double value_at(const char* data, bint is_float, Py_ssize_t i) noexcept nogil:
    """Element i of a contiguous float32 (is_float) or float64 array, as a double."""
    return (<const float*>data)[i] if is_float else (<const double*>data)[i]


def channel_eval_coefficients(cnp.ndarray running_mean, cnp.ndarray running_var, object weight,
                              object bias, double eps, cnp.ndarray out):
    """Eval-mode BatchNorm coefficients in one call (a tiny call cannot afford the
    half-dozen NumPy operations): out[0] = running mean, out[1] = invstd =
    1 / sqrt(running var + eps), out[2] = weight * invstd, out[3] = bias, in float64,
    exactly as NumPy computes them (weight None: 1, bias None: 0).

    IN  running_mean, running_var, weight, bias: (C,) contiguous float32 or float64.
    OUT out: (4, C) float64.
    """
    cdef Py_ssize_t C = cnp.PyArray_DIM(running_mean, 0), c
    cdef double* o = <double*>cnp.PyArray_DATA(out)
    cdef const char* rm = <const char*>cnp.PyArray_DATA(running_mean)
    cdef const char* rv = <const char*>cnp.PyArray_DATA(running_var)
    cdef const char* w = NULL if weight is None else <const char*>cnp.PyArray_DATA(weight)
    cdef const char* b = NULL if bias is None else <const char*>cnp.PyArray_DATA(bias)
    cdef bint rm_f = cnp.PyArray_TYPE(running_mean) == cnp.NPY_FLOAT
    cdef bint rv_f = cnp.PyArray_TYPE(running_var) == cnp.NPY_FLOAT
    cdef bint w_f = weight is not None and cnp.PyArray_TYPE(weight) == cnp.NPY_FLOAT
    cdef bint b_f = bias is not None and cnp.PyArray_TYPE(bias) == cnp.NPY_FLOAT
    for c in range(C):
        o[c] = value_at(rm, rm_f, c)
        o[C + c] = 1.0 / sqrt(value_at(rv, rv_f, c) + eps)
        o[2 * C + c] = (1.0 if w == NULL else value_at(w, w_f, c)) * o[C + c]
        o[3 * C + c] = 0.0 if b == NULL else value_at(b, b_f, c)


cdef _channel_elementwise(const floating* x, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                          const double* mean, const double* scale, const double* shift,
                          int act, floating* y, int n_threads):
    """y = act(z), z = (x - mean) * scale + shift per channel, over the (N, C, S) arrays at
    x and y. Either layout is walked in memory order (a channel-major walk over (N, C, S)
    restarts the hardware prefetchers at every run and ran at half the copy speed)."""
    cdef Py_ssize_t run, c
    cdef floating[:, ::1] w
    cdef floating* hi
    if S == 1:
        w = np.empty((3, C), np.float32 if floating is float else np.float64)
        with nogil:
            hi = affine_rows_coefficients(mean, scale, shift, C, &w[0, 0])
            rows_affine(x, y, N, C, hi, &w[1, 0], &w[2, 0], act, n_threads,
                        N * C * <Py_ssize_t>sizeof(floating) >= STREAM_BYTES)
        return
    w = _working_copies(x, C, mean, scale, shift, NULL)
    # a large forward output goes straight to memory (non-temporal stores), in runs long
    # enough that their plainly written ends are few (fn_affine_out)
    cdef bint stream = (N * C * S * <Py_ssize_t>sizeof(floating) >= STREAM_BYTES
                        and S * <Py_ssize_t>sizeof(floating) >= STREAM_RUN_BYTES)
    with nogil, parallel(num_threads=n_threads):
        for run in prange(N * C, schedule="static"):
            c = run % C
            run_affine_act(x + run * S, y + run * S, NULL, NULL, S,
                           w[0, c], w[1, c], w[2, c], w[3, c], act, stream)
        fence_if(stream)


cdef inline void train_channel(const floating* x, floating* y, SegmentPlan* sp, Py_ssize_t c,
                               double weight, double bias, double eps, double* mean,
                               double* var, int act, bint stream) noexcept nogil:
    """Channel c's batch statistics, then its output while it is in cache
    (channel_forward_train with whole channels per thread)."""
    cdef Py_ssize_t g
    cdef Moments m = segment_channel_moments(x, sp, c)
    cdef Normalization norm = normalize_coefficients(m.m2, m.count, weight, bias, eps)
    mean[c] = m.mean
    var[c] = norm.var
    for g in range(sp.n_stripes):
        segment_stripe_affine(x, y, sp, c, g, m.mean, norm.scale, norm.shift, act, stream)


def channel_forward_train(cnp.ndarray x, cnp.ndarray weight, cnp.ndarray bias, double eps,
                          cnp.ndarray y, cnp.ndarray mean, cnp.ndarray var, int n_threads,
                          int act=0):
    """Batch statistics and normalization (then activation act) in one call.

    IN  x: (N, C, S) C-contiguous float32/float64, N*S > 0; weight, bias: (C,) float64
        (ones/zeros without affine).
    OUT y: like x; mean, var: (C,) float64 batch mean and biased variance.
    Arrays, not typed memoryviews: acquiring seven of those took ~2 us of a 3.3 us call
    on (8, 16) (see _rows.pxi's entry points).
    """
    cdef Py_ssize_t N = cnp.PyArray_DIM(x, 0), C = cnp.PyArray_DIM(x, 1)
    cdef Py_ssize_t S = cnp.PyArray_DIM(x, 2)
    cdef const double* w = <const double*>cnp.PyArray_DATA(weight)
    cdef const double* b = <const double*>cnp.PyArray_DATA(bias)
    cdef double* p_mean = <double*>cnp.PyArray_DATA(mean)
    cdef double* p_var = <double*>cnp.PyArray_DATA(var)
    if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT:
        _forward_train(<const float*>cnp.PyArray_DATA(x), <float*>cnp.PyArray_DATA(y), N, C, S,
                       w, b, eps, p_mean, p_var, n_threads, act)
    else:
        _forward_train(<const double*>cnp.PyArray_DATA(x), <double*>cnp.PyArray_DATA(y), N, C,
                       S, w, b, eps, p_mean, p_var, n_threads, act)


cdef _forward_train(const floating* x, floating* y, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                    const double* weight, const double* bias, double eps, double* mean,
                    double* var, int n_threads, int act):
    cdef Py_ssize_t c
    cdef SegmentPlan sp = segment_plan(N, C, S)
    cdef Normalization norm
    cdef cnp.ndarray work
    cdef double* m2
    cdef double* scales
    cdef double* shifts
    cdef bint stream = N * C * S * <Py_ssize_t>sizeof(floating) >= STREAM_BYTES
    if S > 1 and fuse_per_channel(&sp, sizeof(floating), 1, n_threads):
        with nogil:
            if n_threads == 1:   # no parallel region (see rows_moments)
                for c in range(C):
                    train_channel(x, y, &sp, c, weight[c], bias[c], eps, mean, var, act,
                                  stream)
                fence_if(stream)
            else:
                with parallel(num_threads=n_threads):
                    for c in prange(C, schedule="static"):
                        train_channel(x, y, &sp, c, weight[c], bias[c], eps, mean, var, act,
                                      stream)
                    fence_if(stream)
        return
    work = np.empty(3 * C)
    m2 = <double*>cnp.PyArray_DATA(work)
    scales = m2 + C
    shifts = m2 + 2 * C
    _moments(x, N, C, S, mean, m2, n_threads)
    for c in range(C):
        norm = normalize_coefficients(m2[c], <double>(N * S), weight[c], bias[c], eps)
        var[c] = norm.var
        scales[c] = norm.scale
        shifts[c] = norm.shift
    _channel_elementwise(x, N, C, S, mean, scales, shifts, act, y, n_threads)


def channel_update_running(floating[:] running_mean, floating[:] running_var,
                           const double[::1] mean, const double[::1] var, double count,
                           double momentum):
    """running = (1 - momentum) * running + momentum * batch statistic, the variance
    unbiased (count > 1 values per channel), computed in float64 then rounded to the
    running arrays' dtype. In C: a tiny batch cannot afford six NumPy calls."""
    cdef Py_ssize_t c
    cdef double unbias = count / (count - 1.0)
    for c in range(mean.shape[0]):
        running_mean[c] = <floating>((1.0 - momentum) * running_mean[c] + momentum * mean[c])
        running_var[c] = <floating>((1.0 - momentum) * running_var[c]
                                    + momentum * (var[c] * unbias))


def channel_invstd(const double[::1] mean, const double[::1] var, double eps,
                   double[::1] invstd):
    """invstd = 1 / sqrt(var + eps); returns whether any mean or var is not finite
    (an overflowed or NaN statistic: see _overflow.py)."""
    cdef Py_ssize_t c
    cdef bint finite = True
    for c in range(var.shape[0]):
        invstd[c] = 1.0 / sqrt(var[c] + eps)
        # x - x is 0 for finite x, NaN for inf and NaN
        finite = finite and var[c] - var[c] == 0.0 and mean[c] - mean[c] == 0.0
    return not finite


def channel_grad_sums(const floating[:, :, ::1] x, const floating[:, :, ::1] dy,
                      const double[::1] mean, double[::1] sum_dy, double[::1] sum_dy_xmu,
                      int n_threads, int act=0, const double[::1] scale=None,
                      const double[::1] shift=None, floating[:, :, ::1] g_out=None):
    """Per-channel sum(dy) and sum(dy * (x - mean)), in float64.

    IN  x, dy: (N, C, S), N*S > 0; mean: (C,).  OUT sum_dy, sum_dy_xmu: (C,).
    With act != 0 (and scale, shift: (C,) float64 as for channel_normalize): the sums of
    g = dy * act'(z) instead, z recomputed from x; g_out (like x, required then) receives
    g, for channel_backward_apply to take in dy's place.
    """
    _grad_sums(&x[0, 0, 0], &dy[0, 0, 0], x.shape[0], x.shape[1], x.shape[2], &mean[0],
               &sum_dy[0], &sum_dy_xmu[0], n_threads, act, &scale[0] if act else NULL,
               &shift[0] if act else NULL, &g_out[0, 0, 0] if act else NULL)


cdef _grad_sums(const floating* x, const floating* dy, Py_ssize_t N, Py_ssize_t C,
                Py_ssize_t S, const double* mean, double* sum_dy, double* sum_dy_xmu,
                int n_threads, int act=ACT_NONE, const double* scale=NULL,
                const double* shift=NULL, floating* g_out=NULL):
    """channel_grad_sums of the (N, C, S) arrays at x and dy. With an activation (act,
    and scale, shift per channel as for channel_normalize), the sums of g = dy * act'(z),
    z recomputed from x, formed piece by piece; g is also written to g_out (like x) when
    given, and must be for channels-last rows (S == 1). The sums are the same either way."""
    cdef Py_ssize_t task, c, g
    cdef SegmentPlan sp
    cdef RowPlan rp
    cdef double[::1] flat
    cdef floating[:, ::1] w
    cdef floating[:, ::1] z     # channels-last activation: rows hi, scale, shift
    cdef floating* hi = NULL
    if S == 1:
        rp = row_plan(N, C)
        flat = np.empty(rows_scratch(&rp, 2))
        w = _working_copies(x, C, mean, NULL, NULL, NULL)
        if act != ACT_NONE:
            z = np.empty((3, C), np.float32 if floating is float else np.float64)
            hi = affine_rows_coefficients(mean, scale, shift, C, &z[0, 0])
        with nogil:
            rows_grad_sums(x, dy, &rp, &w[0, 0], &w[1, 0], sum_dy, sum_dy_xmu, &flat[0],
                           act, hi, &z[1, 0] if act != ACT_NONE else NULL,
                           &z[2, 0] if act != ACT_NONE else NULL, g_out, n_threads)
        return
    w = _working_copies(x, C, mean, scale, shift, NULL)   # rows 2, 3: scale, shift
    if use_runs(N, S, sizeof(floating)):
        flat = np.empty(2 * C * min(N, <Py_ssize_t>MAX_STRIPES))
        with nogil:
            runs_grad_sums(x, dy, N, C, S, &w[0, 0], &w[1, 0], sum_dy, sum_dy_xmu, &flat[0],
                           n_threads, act, &w[2, 0] if act != ACT_NONE else NULL, g_out)
        return
    sp = segment_plan(N, C, S)
    flat = np.zeros(C * sp.n_stripes * 2)
    with nogil:
        for task in prange(C * sp.n_stripes, num_threads=n_threads, schedule="static"):
            c = task // sp.n_stripes
            segment_stripe_grad_sums(x, dy, &sp, c, task % sp.n_stripes, mean[c],
                                     &flat[2 * task], &flat[2 * task + 1], act,
                                     w[2, c] if act != ACT_NONE else 0,
                                     w[3, c] if act != ACT_NONE else 0, g_out)
        for c in range(C):
            sum_dy[c] = 0.0
            sum_dy_xmu[c] = 0.0
            for g in range(sp.n_stripes):
                sum_dy[c] += flat[2 * (c * sp.n_stripes + g)]
                sum_dy_xmu[c] += flat[2 * (c * sp.n_stripes + g) + 1]


def channel_backward_coefficients(const double[::1] sum_dy, const double[::1] sum_dy_xmu,
                                  double count, const double[::1] invstd,
                                  const double[::1] weight, bint training, double[::1] k_dy,
                                  double[::1] k_x, double[::1] k_0):
    """Coefficients of dx = k_dy*dy + k_x*(x - mean) + k_0 per channel (see
    backward_coefficients). count is the number of values per channel."""
    _backward_coefficients(&sum_dy[0], &sum_dy_xmu[0], sum_dy.shape[0], count, &invstd[0],
                           &weight[0], training, &k_dy[0], &k_x[0], &k_0[0])


cdef void _backward_coefficients(const double* sum_dy, const double* sum_dy_xmu, Py_ssize_t C,
                                 double count, const double* invstd, const double* weight,
                                 bint training, double* k_dy, double* k_x,
                                 double* k_0) noexcept nogil:
    cdef Py_ssize_t c
    cdef BackwardCoefficients k
    for c in range(C):
        k = backward_coefficients(sum_dy[c], sum_dy_xmu[c], count, invstd[c], weight[c], training)
        k_dy[c] = k.k_dy
        k_x[c] = k.k_x
        k_0[c] = k.k_0


def channel_backward_apply(const floating[:, :, ::1] x, const floating[:, :, ::1] dy,
                           const double[::1] mean, const double[::1] k_dy,
                           const double[::1] k_x, const double[::1] k_0,
                           floating[:, :, ::1] dx, int n_threads):
    """dx = k_dy[c]*dy + k_x[c]*(x - mean[c]) + k_0[c].

    IN  x, dy: (N, C, S); mean, k_dy, k_x, k_0: (C,) float64.  OUT dx: like x (may be dy).
    Walked in memory order, as _channel_elementwise.
    """
    _backward_apply(&x[0, 0, 0], &dy[0, 0, 0], &dx[0, 0, 0], x.shape[0], x.shape[1],
                    x.shape[2], &mean[0], &k_dy[0], &k_x[0], &k_0[0], n_threads)


cdef _backward_apply(const floating* x, const floating* dy, floating* dx, Py_ssize_t N,
                     Py_ssize_t C, Py_ssize_t S, const double* mean, const double* k_dy,
                     const double* k_x, const double* k_0, int n_threads, int act=ACT_NONE,
                     const double* scale=NULL, const double* shift=NULL):
    """channel_backward_apply of the (N, C, S) arrays at x, dy and dx. With an activation
    (S > 1; scale, shift as for channel_normalize), dy is the gradient of act's output
    and g = dy * act'(z) takes its place, formed piece by piece in dx."""
    cdef Py_ssize_t run, c
    cdef floating[:, ::1] w = _working_copies(x, C, mean, k_dy, k_x, k_0)
    cdef floating[:, ::1] z = w     # activation: rows 2 and 3 are scale and shift
    if act != ACT_NONE:
        z = _working_copies(x, C, mean, scale, shift, NULL)
    if S == 1:
        for c in range(C):
            fold_mean_tail(mean[c], k_x[c], k_0[c], &w[0, c], &w[4, c])
        with nogil:
            rows_affine_backward(x, dy, dx, N, C, &w[0, 0], &w[2, 0], &w[3, 0], &w[4, 0],
                                 n_threads, N * C * <Py_ssize_t>sizeof(floating) >= STREAM_BYTES)
        return
    with nogil:
        for run in prange(N * C, num_threads=n_threads, schedule="static"):
            c = run % C
            run_act_affine_backward(x + run * S, dy + run * S, dx + run * S, S, w[0, c],
                                    w[1, c], w[2, c], w[3, c], w[4, c], act, z[2, c], z[3, c])


def channel_backward(cnp.ndarray x, cnp.ndarray dy, cnp.ndarray mean, cnp.ndarray invstd,
                     cnp.ndarray weight, bint training, cnp.ndarray dx, cnp.ndarray sum_dy,
                     cnp.ndarray sum_dy_xmu, int n_threads, int act=0, object bias=None):
    """Input gradient and the per-channel sums behind the weight/bias gradients.

    IN  x, dy: (N, C, S) C-contiguous float32/float64, N*S > 0; mean, invstd: (C,)
        float64 statistics the forward used (batch ones in training, running ones in
        eval); weight: (C,) float64; act: the forward's activation, with bias (C,)
        float64 when act != 0.
    OUT dx: like x; sum_dy (= grad bias), sum_dy_xmu (* invstd = grad weight): (C,)
        float64, sums of g = dy * act'(z) instead of dy with an activation.
    Arrays, not typed memoryviews (see channel_forward_train): with them, and the
    memoryviews of the three kernels it called, BatchNorm1d (8, 16) backward took 18.5 us,
    12.6 us without (torch 27.2 us).
    """
    cdef Py_ssize_t N = cnp.PyArray_DIM(x, 0), C = cnp.PyArray_DIM(x, 1)
    cdef Py_ssize_t S = cnp.PyArray_DIM(x, 2)
    cdef const double* p_bias = NULL if bias is None else <const double*>cnp.PyArray_DATA(bias)
    if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT:
        _backward(<const float*>cnp.PyArray_DATA(x), <const float*>cnp.PyArray_DATA(dy),
                  <float*>cnp.PyArray_DATA(dx), N, C, S, <const double*>cnp.PyArray_DATA(mean),
                  <const double*>cnp.PyArray_DATA(invstd),
                  <const double*>cnp.PyArray_DATA(weight), training,
                  <double*>cnp.PyArray_DATA(sum_dy), <double*>cnp.PyArray_DATA(sum_dy_xmu),
                  n_threads, act, p_bias)
    else:
        _backward(<const double*>cnp.PyArray_DATA(x), <const double*>cnp.PyArray_DATA(dy),
                  <double*>cnp.PyArray_DATA(dx), N, C, S, <const double*>cnp.PyArray_DATA(mean),
                  <const double*>cnp.PyArray_DATA(invstd),
                  <const double*>cnp.PyArray_DATA(weight), training,
                  <double*>cnp.PyArray_DATA(sum_dy), <double*>cnp.PyArray_DATA(sum_dy_xmu),
                  n_threads, act, p_bias)


cdef _backward(const floating* x, const floating* dy, floating* dx, Py_ssize_t N,
               Py_ssize_t C, Py_ssize_t S, const double* mean, const double* invstd,
               const double* weight, bint training, double* sum_dy, double* sum_dy_xmu,
               int n_threads, int act, const double* bias):
    cdef Py_ssize_t c, g
    cdef SegmentPlan sp = segment_plan(N, C, S)
    cdef BackwardCoefficients k
    cdef double stripe_dy, stripe_dy_xmu, count = <double>(N * S)
    cdef cnp.ndarray work
    cdef double* kd
    cdef double* kx
    cdef double* k0
    cdef double* scale
    cdef floating z_scale, z_shift
    cdef bint keep_g, stream
    if S > 1 and fuse_per_channel(&sp, sizeof(floating), 2, n_threads):
        # Per channel, dx of STREAM_BYTES and more is streamed without an activation
        # (with one, g sits in dx's lines, just written and read). Kernels A/B, 6
        # interleaved rounds, BatchNorm2d (32,64,56,56) and BatchNorm1d (32,64,3000):
        # 1.20-1.24x at 1 thread, 1.22x at 2; with relu or silu 0.77-0.88x.
        stream = (act == ACT_NONE
                  and N * C * S * <Py_ssize_t>sizeof(floating) >= STREAM_BYTES)
        with nogil:
            for c in prange(C, num_threads=n_threads, schedule="static"):
                z_scale = <floating>(weight[c] * invstd[c]) if act != ACT_NONE else 0
                z_shift = <floating>bias[c] if act != ACT_NONE else 0
                # per-stripe partial sums added in order, exactly as channel_grad_sums does
                sum_dy[c] = 0.0
                sum_dy_xmu[c] = 0.0
                for g in range(sp.n_stripes):
                    stripe_dy = 0.0
                    stripe_dy_xmu = 0.0
                    # an activation's g is kept in dx: the channel is in cache, forming
                    # g again would only add arithmetic
                    segment_stripe_grad_sums(x, dy, &sp, c, g, mean[c], &stripe_dy,
                                             &stripe_dy_xmu, act, z_scale, z_shift, dx)
                    sum_dy[c] += stripe_dy
                    sum_dy_xmu[c] += stripe_dy_xmu
                k = backward_coefficients(sum_dy[c], sum_dy_xmu[c], count, invstd[c], weight[c],
                                          training)
                for g in range(sp.n_stripes):
                    segment_stripe_backward(x, dy if act == ACT_NONE else dx, dx, &sp, c, g,
                                            mean[c], k.k_dy, k.k_x, k.k_0, stream)
                fence_if(stream)
        return
    # Two passes over memory: the sums read x and dy, the dx pass reads them again. An
    # activation's g = dy * act'(z) is formed in the sums and either kept in dx for the dx
    # pass (channels-last rows, costly activations) or formed again there.
    work = np.empty(4 * C)
    kd = <double*>cnp.PyArray_DATA(work)
    kx = kd + C
    k0 = kd + 2 * C
    scale = kd + 3 * C
    for c in range(C):
        scale[c] = weight[c] * invstd[c]
    keep_g = act != ACT_NONE and (S == 1 or not act_grad_is_cheap(act))
    _grad_sums(x, dy, N, C, S, mean, sum_dy, sum_dy_xmu, n_threads, act, scale, bias,
               dx if keep_g else NULL)
    _backward_coefficients(sum_dy, sum_dy_xmu, C, count, invstd, weight, training, kd, kx, k0)
    if keep_g:
        dy = dx
        act = ACT_NONE
    _backward_apply(x, dy, dx, N, C, S, mean, kd, kx, k0, n_threads, act, scale, bias)


cdef floating[:, ::1] _working_copies(const floating* like, Py_ssize_t C, const double* mean,
                                      const double* a, const double* b, const double* c):
    """Per-channel float64 values of C channels in the data's precision (like: any pointer
    of that type) for the elementwise kernels: rows 0 and 1 of the result are mean split
    into hi and lo parts, rows 2, 3, 4 the arrays a, b, c (NULL skips one). Filled in C:
    a tiny call cannot afford a NumPy call per array."""
    cdef Py_ssize_t i
    cdef floating[:, ::1] w = np.empty((5, C), np.float32 if floating is float else np.float64)
    for i in range(C):
        split_hi_lo(mean[i], &w[0, i], &w[1, i])
        if a != NULL:
            w[2, i] = <floating>a[i]
        if b != NULL:
            w[3, i] = <floating>b[i]
        if c != NULL:
            w[4, i] = <floating>c[i]
    return w
