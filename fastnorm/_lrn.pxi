# Local response norm family: a window over channels at every (n, position).
#
#   s_c  = k + alpha/size * sum_{c' in W(c)} x_{c'}^2,   W(c) = [c - size//2, c + (size-1)//2]
#   y_c  = x_c * s_c^-beta
#   dx_j = dy_j * s_j^-beta - (2 alpha beta / size) * x_j * sum_{c in W'(j)} t_c,
#          t_c = dy_c * x_c * s_c^(-beta-1),      W'(j) = [j - (size-1)//2, j + size//2]
# Channels outside [0, C) count as zero (PyTorch's zero padding).
#
# Window sums (van Herk / Gil-Werman): cut the zero-padded channel axis into
# blocks of `size`. A window starting at a block start is one whole block;
# any other window is a suffix of one block plus a prefix of the next. Block
# suffix sums are built backwards when a window enters a new block, and the
# next block's prefix grows by one channel per step: O(1) work per element
# whatever the size. Unlike a running sum (add the entering channel, subtract
# the leaving one), nothing is ever subtracted: a window sum of squares is a
# sum of non-negative float64 terms, never negative, with no cancellation or
# drift however the magnitudes vary, and a NaN/inf reaches exactly the windows
# that contain it. The same machinery computes the mirrored sum of t.
#
# Every position (n, spatial) is independent, so the arithmetic of an element
# never depends on how positions are grouped into tasks, nor on the thread count.
# Positions are processed in rows of `width` values so that inner loops
# vectorize along them:
#   * channels-first (N, C, S), S > 1: channel c of a task is x[n, c, s0:s0+width];
#   * channels-last rows (R, C, 1): a tile of `width` rows is transposed into
#     a (C, width) scratch, processed like channels-first, and transposed back.
#
# Public entry points (inputs validated in Python; no GIL, never raise):
#   lrn_forward   IN x                 OUT y
#   lrn_backward  IN x, dy             OUT dx   (s recomputed from x: x is read anyway)

import numpy as np
from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.math cimport pow, sqrt

from fastnorm._common cimport fn_lrn_pow075_f32
from libc.string cimport memset

cdef enum:
    # Positions per row: long enough to vectorize, short enough that a
    # task's rows stay in L1/L2.
    LRN_ROW = 512
    LRN_MIN_ROW = 16
    # float64 values of one window's block storage (sets the row length when
    # size is large) and working-precision values of a channels-last tile.
    LRN_WINDOW_ELEMS = 1 << 15
    LRN_TILE_ELEMS = 1 << 15


cdef struct Lrn:
    Py_ssize_t C, size, lo, hi   # W(c) = [c - lo, c + hi]
    double k, a, beta, coef      # a = alpha/size, coef = 2 alpha beta / size
    bint beta_075                # s^-0.75 = 1 / (sqrt(s) * sqrt(sqrt(s)))


cdef struct LrnPlan:
    Py_ssize_t N, C, S
    bint rows             # S == 1: channels-last rows, transposed in tiles
    Py_ssize_t width      # positions per task
    Py_ssize_t per_n      # tasks per n (channels-first)
    Py_ssize_t n_tasks
    Py_ssize_t ring       # block rows kept by a window: min(size, C)
    Py_ssize_t n_doubles  # float64 scratch per thread
    Py_ssize_t n_work     # working-precision scratch per thread


cdef struct Window:
    # Sliding window sums over channels, `w` positions at a time.
    Py_ssize_t C, w, lo, hi, size
    Py_ssize_t first      # channel of suffix row 0 (start of the current block)
    Py_ssize_t source_rows  # source channel r is row r % source_rows (a ring when < C)
    double* suffix        # (min(size, C) + 1, w): the current block's suffix sums, then zeros
    double* prefix        # (w,): running sum of the next block's channels


# ------------------------------------------------------------- row helpers

cdef inline void row_add_terms(const double* prev, const floating* v, double* dst, Py_ssize_t w,
                               bint square) noexcept nogil:
    """dst = prev + v**2 (square) or prev + v, in float64 (dst may be prev)."""
    cdef Py_ssize_t s
    if square:
        for s in range(w):
            dst[s] = prev[s] + <double>v[s] * <double>v[s]
    else:
        for s in range(w):
            dst[s] = prev[s] + <double>v[s]


cdef inline void row_inv_pow(const double* suffix, const double* prefix, floating* out,
                             Py_ssize_t w, Lrn* p, bint plus_one) noexcept nogil:
    """out = s^-beta (or s^-(beta+1) with plus_one), s = k + a * (suffix + prefix).

    beta = 0.75 takes square roots (see fn_lrn_pow075_f32 for float32), a few
    ulp from exact; other betas call pow in float64."""
    cdef Py_ssize_t i
    cdef double k = p.k, a = p.a, exponent = -(p.beta + plus_one)
    cdef double scale, root
    if p.beta_075:
        if floating is float:
            fn_lrn_pow075_f32(suffix, prefix, out, w, k, a, plus_one)
        else:
            for i in range(w):
                scale = k + a * (suffix[i] + prefix[i])
                root = sqrt(scale)
                out[i] = 1 / (root * sqrt(root) * (scale if plus_one else 1))
    else:
        for i in range(w):
            out[i] = <floating>pow(k + a * (suffix[i] + prefix[i]), exponent)


# ------------------------------------------------------------ window sums

cdef inline void window_init(Window* win, Py_ssize_t C, Py_ssize_t w, Py_ssize_t lo, Py_ssize_t hi,
                             Py_ssize_t source_rows, double* storage) noexcept nogil:
    """storage: (min(lo + hi + 1, C) + 2) * w float64 values."""
    win.C = C
    win.w = w
    win.lo = lo
    win.hi = hi
    win.size = lo + hi + 1
    win.first = 0
    win.source_rows = source_rows
    win.suffix = storage
    win.prefix = storage + (min(win.size, C) + 1) * w


cdef inline const double* window_next(Window* win, const floating* v, Py_ssize_t stride,
                                      bint square, Py_ssize_t c) noexcept nogil:
    """Advance to channel c (call for c = 0, 1, ..., C - 1 in order). Then, per
    position, the sum over channels c' in [c - lo, c + hi] of v_{c'}**2 (square)
    or v_{c'} is returned_row + win.prefix. v_r is the row v + (r % source_rows)
    * stride; the call reads channels up to c + hi."""
    cdef Py_ssize_t w = win.w, r, last, j
    cdef double* suffix = win.suffix
    if c % win.size == 0:
        # The window starts a block (in zero-padded coordinates): it is the
        # whole block. Build the block's suffix sums, last channel first.
        win.first = max(0, c - win.lo)
        last = min(win.C, c - win.lo + win.size) - 1
        memset(suffix + (last + 1 - win.first) * w, 0, w * sizeof(double))
        for r in range(last, win.first - 1, -1):
            row_add_terms(suffix + (r + 1 - win.first) * w, v + (r % win.source_rows) * stride,
                          suffix + (r - win.first) * w, w, square)
        memset(win.prefix, 0, w * sizeof(double))
    else:
        # a suffix of this block + a prefix of the next one, which grows by c + hi
        j = c + win.hi
        if j < win.C:
            row_add_terms(win.prefix, v + (j % win.source_rows) * stride, win.prefix, w, square)
    return suffix + (max(c - win.lo, win.first) - win.first) * w


# ------------------------------------------------------------ block kernels

cdef void forward_block(const floating* x, floating* y, Py_ssize_t stride, Py_ssize_t w, Lrn* p,
                        double* dwork, floating* work) noexcept nogil:
    """y = x * s^-beta for w positions; channel c is the row at c * stride.
    dwork: (min(size, C) + 2) * w float64; work: w values."""
    cdef Window win
    cdef Py_ssize_t c, i
    cdef const double* suffix
    cdef const floating* xc
    cdef floating* yc
    window_init(&win, p.C, w, p.lo, p.hi, p.C, dwork)
    for c in range(p.C):
        suffix = window_next(&win, x, stride, True, c)
        row_inv_pow(suffix, win.prefix, work, w, p, False)
        xc = x + c * stride
        yc = y + c * stride
        for i in range(w):
            yc[i] = xc[i] * work[i]


cdef void backward_block(const floating* x, const floating* dy, floating* dx, Py_ssize_t stride,
                         Py_ssize_t w, Lrn* p, Py_ssize_t ring, double* dwork,
                         floating* work) noexcept nogil:
    """dx for w positions (rows as in forward_block).
    ring = min(size, C); dwork: 2 * (ring + 2) * w float64; work: (ring + 1) * w values.

    Step c first gives channel c its own part, dx_c = dy_c * s_c^-beta, and
    stores t_c in a ring of `ring` rows; then channel j = c - size//2, whose
    mirrored window now has every t it needs, gets its window term."""
    cdef Window scales, grads
    cdef floating* inv1 = work       # s^-(beta+1)
    cdef floating* t = work + w
    cdef Py_ssize_t c, j, i
    cdef const double* suffix
    cdef const double* prefix
    cdef const floating* xc
    cdef const floating* dyc
    cdef floating* dxc
    cdef floating* tc
    cdef floating coef = <floating>p.coef
    cdef double k = p.k, a = p.a
    window_init(&scales, p.C, w, p.lo, p.hi, p.C, dwork)
    window_init(&grads, p.C, w, p.hi, p.lo, ring, dwork + (ring + 2) * w)
    for c in range(p.C + p.lo):
        if c < p.C:
            suffix = window_next(&scales, x, stride, True, c)
            prefix = scales.prefix
            row_inv_pow(suffix, prefix, inv1, w, p, True)
            xc = x + c * stride
            dyc = dy + c * stride
            dxc = dx + c * stride
            tc = t + (c % ring) * w
            for i in range(w):
                # s^-beta = s * s^-(beta+1): one power serves both terms
                dxc[i] = dyc[i] * (inv1[i] * <floating>(k + a * (suffix[i] + prefix[i])))
                tc[i] = dyc[i] * xc[i] * inv1[i]
        j = c - p.lo
        if j >= 0:
            suffix = window_next(&grads, t, w, False, j)
            prefix = grads.prefix
            xc = x + j * stride
            dxc = dx + j * stride
            for i in range(w):
                dxc[i] = dxc[i] - coef * xc[i] * <floating>(suffix[i] + prefix[i])


# ------------------------------------------------- channels-last tiles

cdef inline void tile_gather(const floating* src, floating* tile, Py_ssize_t C,
                             Py_ssize_t w) noexcept nogil:
    """tile (C, w) <- w rows of C channels."""
    cdef Py_ssize_t r, c
    for r in range(w):
        for c in range(C):
            tile[c * w + r] = src[r * C + c]


cdef inline void tile_scatter(const floating* tile, floating* dst, Py_ssize_t C,
                              Py_ssize_t w) noexcept nogil:
    """w rows of C channels <- tile (C, w)."""
    cdef Py_ssize_t r, c
    for r in range(w):
        for c in range(C):
            dst[r * C + c] = tile[c * w + r]


# ---------------------------------------------------------------- planning

cdef Lrn lrn_params(Py_ssize_t C, Py_ssize_t size, double alpha, double beta,
                    double k) noexcept nogil:
    cdef Lrn p
    p.C = C
    p.size = size
    p.lo = size // 2
    p.hi = (size - 1) // 2
    p.k = k
    p.a = alpha / size
    p.beta = beta
    p.coef = 2.0 * alpha * beta / size
    p.beta_075 = beta == 0.75
    return p


cdef LrnPlan lrn_plan(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t size,
                      bint backward) noexcept nogil:
    """Tasks and scratch sizes; fixed by the shape and size alone."""
    cdef LrnPlan q
    cdef Py_ssize_t positions, tiles
    q.N = N
    q.C = C
    q.S = S
    q.rows = S == 1
    q.ring = min(size, C)
    q.width = min(<Py_ssize_t>LRN_ROW, max(<Py_ssize_t>LRN_MIN_ROW, LRN_WINDOW_ELEMS // (q.ring + 2)))
    if q.rows:
        q.width = min(q.width, max(<Py_ssize_t>LRN_MIN_ROW, LRN_TILE_ELEMS // C))
    positions = N if q.rows else S
    q.width = min(q.width, positions)
    q.per_n = 1 if q.rows else (S + q.width - 1) // q.width
    q.n_tasks = (N + q.width - 1) // q.width if q.rows else N * q.per_n
    if backward:
        q.n_doubles = 2 * (q.ring + 2) * q.width
        q.n_work = (q.ring + 1) * q.width
        tiles = 3       # x, dy, dx
    else:
        q.n_doubles = (q.ring + 2) * q.width
        q.n_work = q.width
        tiles = 2       # x, y
    if q.rows:
        q.n_work += tiles * C * q.width
    return q


cdef inline void task_span(LrnPlan* q, Py_ssize_t task, Py_ssize_t* offset, Py_ssize_t* stride,
                           Py_ssize_t* w) noexcept nogil:
    """Where task's first value is, the distance between its channels, its width."""
    cdef Py_ssize_t n, s0
    if q.rows:
        s0 = task * q.width
        w[0] = min(q.N, s0 + q.width) - s0
        offset[0] = s0 * q.C
        stride[0] = 1
    else:
        n = task // q.per_n
        s0 = (task % q.per_n) * q.width
        w[0] = min(q.S, s0 + q.width) - s0
        offset[0] = n * q.C * q.S + s0
        stride[0] = q.S


cdef void forward_task(const floating* x, floating* y, LrnPlan* q, Lrn* p, Py_ssize_t task,
                       double* dwork, floating* work) noexcept nogil:
    cdef Py_ssize_t offset, stride, w
    cdef floating* x_tile
    cdef floating* y_tile
    task_span(q, task, &offset, &stride, &w)
    if not q.rows:
        forward_block(x + offset, y + offset, stride, w, p, dwork, work)
        return
    x_tile = work + q.width
    y_tile = x_tile + q.C * w
    tile_gather(x + offset, x_tile, q.C, w)
    forward_block(x_tile, y_tile, w, w, p, dwork, work)
    tile_scatter(y_tile, y + offset, q.C, w)


cdef void backward_task(const floating* x, const floating* dy, floating* dx, LrnPlan* q, Lrn* p,
                        Py_ssize_t task, double* dwork, floating* work) noexcept nogil:
    cdef Py_ssize_t offset, stride, w
    cdef floating* x_tile
    cdef floating* dy_tile
    cdef floating* dx_tile
    task_span(q, task, &offset, &stride, &w)
    if not q.rows:
        backward_block(x + offset, dy + offset, dx + offset, stride, w, p, q.ring, dwork, work)
        return
    x_tile = work + (q.ring + 1) * q.width
    dy_tile = x_tile + q.C * w
    dx_tile = dy_tile + q.C * w
    tile_gather(x + offset, x_tile, q.C, w)
    tile_gather(dy + offset, dy_tile, q.C, w)
    backward_block(x_tile, dy_tile, dx_tile, w, w, p, q.ring, dwork, work)
    tile_scatter(dx_tile, dx + offset, q.C, w)


# -------------------------------------------------------------- public API

def lrn_forward(const floating[:, :, ::1] x, floating[:, :, ::1] y, Py_ssize_t size, double alpha,
                double beta, double k, int n_threads):
    """Local response norm forward.

    IN  x: (N, C, S) channels-first, or (R, C, 1) channels-last rows; size >= 1.
    OUT y: like x.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2], task, tid
    cdef Lrn p = lrn_params(C, size, alpha, beta, k)
    cdef LrnPlan q = lrn_plan(N, C, S, size, False)
    cdef double[:, ::1] dwork
    cdef floating[:, ::1] work
    if N * C * S == 0:
        return
    n_threads = max(1, min(n_threads, q.n_tasks))
    dwork = np.empty((n_threads, q.n_doubles))
    work = np.empty((n_threads, q.n_work), dtype=np.float32 if floating is float else np.float64)
    with nogil:
        for task in prange(q.n_tasks, num_threads=n_threads, schedule="static"):
            tid = threadid()
            forward_task(&x[0, 0, 0], &y[0, 0, 0], &q, &p, task, &dwork[tid, 0], &work[tid, 0])


def lrn_backward(const floating[:, :, ::1] x, const floating[:, :, ::1] dy,
                 floating[:, :, ::1] dx, Py_ssize_t size, double alpha, double beta, double k,
                 int n_threads):
    """Local response norm backward (the scale is recomputed from x).

    IN  x, dy: (N, C, S) channels-first, or (R, C, 1) channels-last rows; size >= 1.
    OUT dx: like x.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2], task, tid
    cdef Lrn p = lrn_params(C, size, alpha, beta, k)
    cdef LrnPlan q = lrn_plan(N, C, S, size, True)
    cdef double[:, ::1] dwork
    cdef floating[:, ::1] work
    if N * C * S == 0:
        return
    n_threads = max(1, min(n_threads, q.n_tasks))
    dwork = np.empty((n_threads, q.n_doubles))
    work = np.empty((n_threads, q.n_work), dtype=np.float32 if floating is float else np.float64)
    with nogil:
        for task in prange(q.n_tasks, num_threads=n_threads, schedule="static"):
            tid = threadid()
            backward_task(&x[0, 0, 0], &dy[0, 0, 0], &dx[0, 0, 0], &q, &p, task,
                          &dwork[tid, 0], &work[tid, 0])
