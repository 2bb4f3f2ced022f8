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
# sum of at most `size` non-negative terms, never negative, with no
# cancellation or drift however the magnitudes vary, and a NaN/inf reaches
# exactly the windows that contain it. The same machinery computes the
# mirrored sum of t.
#
# Accumulator precision (acc_t): float64, except float32 data with size <=
# FLOAT_SUMS_MAX_SIZE, summed in float32. Without subtraction the relative
# error of such a sum is below size * 2^-24 (<= 5e-7) whatever the data, the
# order of the final rounding of y; float32 sums halve the work of the window
# and skip a float64 -> float32 conversion per element (~1.6x faster forward).
#
# Every position (n, spatial) is independent, so the arithmetic of an element
# never depends on how positions are grouped into tasks, nor on the thread count.
# The direct route (LrnPlan.direct: float32, beta = 0.75, size <= FN_LRN_ROWS_MAX_SIZE,
# the common case) needs none of the window machinery below: each window sum is its
# size neighbouring squares added in channel order (at most 8 non-negative terms).
# Channels-last rows go to fn_lrn_rows_*075_f32 (a position's channels are
# contiguous: in L1, eight rows per pass), channels-first memory to
# fn_lrn_planes_*075_f32 (strips of 8 positions walked down the channels, the
# window's squares, t and own parts in registers, the rows ahead prefetched). Both
# give every element the same operations, so the two layouts give the same bits.
#
# Otherwise positions are processed in rows of `width` values so that inner loops
# vectorize along them:
#   * channels-first (N, C, S), S > 1: channel c of a task is x[n, c, s0:s0+width],
#     ideally a whole channel plane, so that a task streams through memory;
#   * channels-last rows: a tile of `block` rows is transposed into
#     a (C, block) scratch (fn_lrn_tile_in/out: in-register 8x8 transposes),
#     processed like channels-first, and transposed back. A task is a run of
#     tiles: while a tile is computed, the memory of the next one is
#     prefetched (read, and for writing), so that the transposes find it in
#     cache instead of waiting for memory in bursts (2-3x slower).
#
# Speed of float32 with beta = 0.75 and windows past the direct route's: the power and
# the outputs come from fused AVX2 primitives (fn_lrn_forward075_f64, fn_lrn_backward075_f64 in
# _simd.h: rsqrt estimate + correction, a few ulp). The x^2 window leaves the
# growth of its prefix to them (window_next's `grow`), so that a channel's
# first reads from memory overlap their arithmetic, and they prefetch the rows
# a block's Ahead names (channels-first: those needed at the next step;
# channels-last: the next tile). Other dtypes and betas use the plain loops below.
# Channels-first outputs of STREAM_BYTES and more (y, and dx, each written once)
# bypass the caches (fn_row_stream in _simd.h), 8-12% faster at one thread.
#
# Public entry points (inputs validated in Python; the kernels run without the GIL and
# never raise, only a failed scratch allocation raises MemoryError first):
#   lrn_forward   IN x                 OUT y
#   lrn_backward  IN x, dy             OUT dx   (s recomputed from x: x is read anyway)

cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.math cimport pow, sqrt
from libc.stdlib cimport free, malloc
from libc.string cimport memset

from fastnorm._common cimport (
    fn_lrn_backward075_f64, fn_lrn_forward075_f64,
    fn_lrn_window_term_f32, fn_lrn_window_term_f64,
    fn_lrn_tile_in_f32, fn_lrn_tile_in_f64, fn_lrn_tile_out_f32, fn_lrn_tile_out_f64,
    fn_lrn_planes_backward075_f32, fn_lrn_planes_forward075_f32,
    fn_lrn_rows_backward075_f32, fn_lrn_rows_forward075_f32, fn_lrn_rows_scratch,
    fn_prefetch_lines, fn_stream_fence, FN_LRN_ROWS_MAX_SIZE, STREAM_BYTES, STREAM_RUN_BYTES,
)

ctypedef fused acc_t:
    float
    double

cdef enum:
    # Positions per row: ideally a whole channel plane (channels-first), so
    # that a task streams through contiguous memory; at most what keeps a
    # window's storage (size + 2 rows) within LRN_WINDOW_BYTES, at least
    # LRN_MIN_ROW (shorter rows cost more in loop overhead than they gain in
    # parallelism); in between, short enough to leave LRN_MIN_TASKS tasks.
    LRN_MIN_ROW = 256
    LRN_MAX_ROW = 4096
    LRN_WINDOW_BYTES = 96 * 1024
    LRN_MIN_TASKS = 16
    # Bytes of a channels-last tile, per array: the tiles of a block and those
    # of the next one, prefetched meanwhile, stay in L2 (128 KiB measured
    # slower, and so did 16 KiB: the per-channel overhead of short rows).
    LRN_TILE_BYTES = 32 * 1024
    LRN_MIN_TILE_ROW = 16
    LRN_TILE_ALIGN = 8      # tile widths are whole vectors of positions
    # Largest window summed in float32 for float32 data (see above).
    FLOAT_SUMS_MAX_SIZE = 8
    # Scratch rows (window sums, the t ring) start on cache lines: their length is
    # rounded up to LRN_PITCH values and each thread's scratch is line-aligned, so
    # that the loops over a row load them aligned (misaligned, the streamed forward
    # gained 3% instead of 14%: C driver).
    LRN_PITCH = 16


cdef struct Lrn:
    Py_ssize_t C, size, lo, hi   # W(c) = [c - lo, c + hi]
    double k, a, beta, coef      # a = alpha/size, coef = 2 alpha beta / size
    bint beta_075                # s^-0.75 from square roots, not pow


cdef struct LrnPlan:
    Py_ssize_t N, C, S
    bint rows             # S == 1: channels-last rows (off the direct route: in tiles)
    bint direct           # float32 data, beta = 0.75 and size <= FN_LRN_ROWS_MAX_SIZE: no window
                          # storage; rows: fn_lrn_rows_*075_f32 on the rows themselves, no
                          # tiles; channels-first: fn_lrn_planes_*075_f32 (_simd.h)
    Py_ssize_t block      # positions per block (a window's width; rows: per tile)
    Py_ssize_t width      # positions per task (rows: whole tiles)
    Py_ssize_t per_n      # tasks per n (channels-first)
    Py_ssize_t n_tasks
    Py_ssize_t ring       # block rows kept by a window: min(size, C)
    Py_ssize_t own_rows   # backward: rows of dx's own part kept until the window term, size//2 + 1
    Py_ssize_t n_sums     # accumulator scratch per thread
    Py_ssize_t n_work     # working-precision scratch per thread
    bint stream           # channels-first output (y or dx) of STREAM_BYTES and more, in rows
                          # of at least STREAM_RUN_BYTES: written with non-temporal stores.
                          # (Channels-last tiles stay plain: streamed from the 8x8
                          # transposes, whose blocks fill half lines, they ran 1.18x
                          # slower, and transposed into a staging tile then streamed
                          # line by line 1.13x slower, the backward 1.10x.)


cdef struct Ahead:
    # Memory a block prefetches for later while it computes: at channel step
    # c, the row (the block's width of values) at x + c * stride bytes if
    # c < x_rows, and likewise from dy (to be read; the fused float32
    # primitives spread those loads over their loop, the plain loops ask at
    # once) and from out (to be written). NULL: nothing.
    const void* x
    const void* dy
    void* out
    Py_ssize_t stride, x_rows, dy_rows, out_rows


cdef struct Window:
    # Sliding window sums over channels, w positions at a time, kept in an
    # accumulator storage of (min(size, C) + 2) rows of w (pitch apart): the current
    # block's suffix sums, a row of zeros, then the next block's prefix sum.
    Py_ssize_t C, w, lo, hi, size
    Py_ssize_t pitch        # distance between storage rows: row_pitch(w)
    Py_ssize_t first        # channel of suffix row 0 (start of the current block)
    Py_ssize_t prefix_at    # offset of the prefix row in the storage
    Py_ssize_t source_rows  # source channel r is row r % source_rows (a ring when < C)


# ------------------------------------------------------------- row helpers

cdef inline void row_add_terms(const acc_t* prev, const floating* v, acc_t* dst, Py_ssize_t w,
                               bint square) noexcept nogil:
    """dst = prev + v**2 (square) or prev + v, in acc_t (dst may be prev)."""
    cdef Py_ssize_t i
    if square:
        for i in range(w):
            dst[i] = prev[i] + <acc_t>v[i] * <acc_t>v[i]
    else:
        for i in range(w):
            dst[i] = prev[i] + <acc_t>v[i]


cdef inline void row_neg_power(const acc_t* suffix, const acc_t* prefix, floating* out,
                               Py_ssize_t w, Lrn* p) noexcept nogil:
    """out = s^-beta, s = k + a * (suffix + prefix), in float64 (beta = 0.75:
    two square roots and a division, vectorized; other betas: pow)."""
    cdef Py_ssize_t i
    cdef double k = p.k, a = p.a, root
    if p.beta_075:
        for i in range(w):
            root = sqrt(k + a * (<double>suffix[i] + <double>prefix[i]))
            out[i] = <floating>(1 / (root * sqrt(root)))
    else:
        for i in range(w):
            out[i] = <floating>pow(k + a * (<double>suffix[i] + <double>prefix[i]), -p.beta)


cdef inline void lrn_row_forward(const acc_t* suffix, acc_t* prefix, const floating* grow,
                             const floating* x, floating* y, Py_ssize_t w, Lrn* p,
                             const floating* prefetch, bint stream) noexcept nogil:
    """y = x * s^-beta, s = k + a * (suffix + prefix), after prefix += grow**2
    when grow is not NULL (the growth window_next left to its caller).

    float32 with beta = 0.75 (float64 sums) goes to fn_lrn_forward075_f64, which also adds grow
    inside its loop, prefetches the row at prefetch for the next call (spread
    over its loop; the plain loops ask for it at once) and, with stream, writes
    y with non-temporal stores (the plain loops ignore stream)."""
    cdef Py_ssize_t i
    if floating is float:
        if acc_t is double:   # (float sums with beta = 0.75 take the direct route)
            if p.beta_075:
                fn_lrn_forward075_f64(suffix, prefix, grow, x, y, w, p.k, p.a, prefetch, stream)
                return
    if prefetch != NULL:
        fn_prefetch_lines(prefetch, w * sizeof(floating), False)
    if grow != NULL:
        row_add_terms(prefix, grow, prefix, w, True)
    row_neg_power(suffix, prefix, y, w, p)
    for i in range(w):
        y[i] = x[i] * y[i]


cdef inline void row_backward_own(const acc_t* suffix, acc_t* prefix, const floating* grow,
                                  const floating* x, const floating* dy, floating* dx,
                                  floating* t, Py_ssize_t w, Lrn* p, const floating* prefetch,
                                  const floating* prefetch2) noexcept nogil:
    """dx = dy * s^-beta (channel's own part) and t = dy * x * s^-(beta+1), s and
    grow as in lrn_row_forward. s^-(beta+1) is s^-beta / s, never s^-beta * s^-1,
    so that s = inf gives 0, not inf * 0.

    float32 with beta = 0.75 (float64 sums) goes to fn_lrn_backward075_f64; the rows at prefetch
    and prefetch2 are prefetched as in lrn_row_forward."""
    cdef Py_ssize_t i
    cdef double k = p.k, a = p.a
    if floating is float:
        if acc_t is double:   # (float sums with beta = 0.75 take the direct route)
            if p.beta_075:
                fn_lrn_backward075_f64(suffix, prefix, grow, x, dy, dx, t, w, p.k, p.a,
                                       prefetch, prefetch2)
                return
    if prefetch != NULL:
        fn_prefetch_lines(prefetch, w * sizeof(floating), False)
    if prefetch2 != NULL:
        fn_prefetch_lines(prefetch2, w * sizeof(floating), False)
    if grow != NULL:
        row_add_terms(prefix, grow, prefix, w, True)
    row_neg_power(suffix, prefix, dx, w, p)      # dx holds s^-beta for a moment
    for i in range(w):
        t[i] = dy[i] * x[i] * (dx[i] / <floating>(k + a * (<double>suffix[i] + <double>prefix[i])))
    for i in range(w):
        dx[i] = dy[i] * dx[i]


cdef inline void row_window_term(const acc_t* suffix, acc_t* prefix, const floating* grow,
                                 const floating* x, const floating* own, floating* dx,
                                 Py_ssize_t w, floating coef, bint stream) noexcept nogil:
    """dx = own - coef * x * (suffix + prefix), after prefix += grow (unless NULL).
    float data: fn_lrn_window_term_*, which writes dx with non-temporal stores
    when stream (double data: plain loops, never streamed)."""
    cdef Py_ssize_t i
    if floating is float:
        if acc_t is float:
            fn_lrn_window_term_f32(suffix, prefix, grow, x, own, dx, w, coef, stream)
        else:
            fn_lrn_window_term_f64(suffix, prefix, grow, x, own, dx, w, coef, stream)
        return
    if grow != NULL:
        for i in range(w):
            prefix[i] = prefix[i] + <acc_t>grow[i]
            dx[i] = own[i] - coef * x[i] * <floating>(suffix[i] + prefix[i])
    else:
        for i in range(w):
            dx[i] = own[i] - coef * x[i] * <floating>(suffix[i] + prefix[i])


# ------------------------------------------------------------ window sums

cdef inline Py_ssize_t row_pitch(Py_ssize_t w) noexcept nogil:
    return (w + LRN_PITCH - 1) // LRN_PITCH * LRN_PITCH


cdef inline void window_init(Window* win, Py_ssize_t C, Py_ssize_t w, Py_ssize_t lo, Py_ssize_t hi,
                             Py_ssize_t source_rows) noexcept nogil:
    win.C = C
    win.w = w
    win.lo = lo
    win.hi = hi
    win.size = lo + hi + 1
    win.pitch = row_pitch(w)
    win.first = 0
    win.prefix_at = (min(win.size, C) + 1) * win.pitch
    win.source_rows = source_rows


cdef inline const acc_t* window_next(Window* win, acc_t* storage, const floating* v,
                                     Py_ssize_t stride, bint square, Py_ssize_t c,
                                     const floating** grow) noexcept nogil:
    """Advance to channel c (call for c = 0, 1, ..., C - 1 in order). Then, per
    position, the sum over channels c' in [c - lo, c + hi] of v_{c'}**2 (square)
    or v_{c'} is returned_row + storage[prefix_at:]. v_r is the row
    v + (r % source_rows) * stride; the call reads channels up to c + hi.

    grow NULL: the prefix row is brought up to date here. Otherwise *grow is
    set to the row (or NULL) whose term the caller still has to add to the
    prefix row before using it, in its own loop: the newest channel is read
    there for the first time, and its loads then overlap the caller's work."""
    cdef Py_ssize_t w = win.w, r, last, j
    cdef acc_t* suffix = storage
    cdef acc_t* prefix = storage + win.prefix_at
    if grow != NULL:
        grow[0] = NULL
    if c % win.size == 0:
        # The window starts a block (in zero-padded coordinates): it is the
        # whole block. Build the block's suffix sums, last channel first.
        win.first = max(0, c - win.lo)
        last = min(win.C, c - win.lo + win.size) - 1
        memset(suffix + (last + 1 - win.first) * win.pitch, 0, w * sizeof(acc_t))
        for r in range(last, win.first - 1, -1):
            row_add_terms(suffix + (r + 1 - win.first) * win.pitch,
                          v + (r % win.source_rows) * stride, suffix + (r - win.first) * win.pitch,
                          w, square)
        memset(prefix, 0, w * sizeof(acc_t))
    else:
        # a suffix of this block + a prefix of the next one, which grows by c + hi
        j = c + win.hi
        if j < win.C:
            if grow != NULL:
                grow[0] = v + (j % win.source_rows) * stride
            else:
                row_add_terms(prefix, v + (j % win.source_rows) * stride, prefix, w, square)
    return suffix + (max(c - win.lo, win.first) - win.first) * win.pitch


# ------------------------------------------------------------ block kernels

cdef inline const floating* ahead_row(const void* base, Py_ssize_t c, Py_ssize_t rows,
                                     Py_ssize_t stride, const floating* like) noexcept nogil:
    """Row c of an Ahead array (like: any pointer of the element type), or NULL."""
    return <const floating*>(<const char*>base + c * stride) if base != NULL and c < rows else NULL


cdef inline void prefetch_out_row(Ahead* ahead, Py_ssize_t c, Py_ssize_t row_bytes) noexcept nogil:
    if ahead.out != NULL and c < ahead.out_rows:
        fn_prefetch_lines(<char*>ahead.out + c * ahead.stride, row_bytes, True)


cdef void forward_block(const floating* x, floating* y, Py_ssize_t stride, Py_ssize_t w, Lrn* p,
                        acc_t* sums, Ahead* ahead, bint stream) noexcept nogil:
    """y = x * s^-beta for w positions; channel c is the row at c * stride.
    sums: (min(size, C) + 2) * row_pitch(w). ahead: what to prefetch meanwhile. stream:
    y rows written with non-temporal stores (fence before y is read)."""
    cdef Window win
    cdef Py_ssize_t c
    cdef const acc_t* suffix
    cdef acc_t* prefix = sums + (min(p.size, p.C) + 1) * row_pitch(w)
    cdef const floating* grow
    window_init(&win, p.C, w, p.lo, p.hi, p.C)
    for c in range(p.C):
        suffix = window_next(&win, sums, x, stride, True, c, &grow)
        lrn_row_forward(suffix, prefix, grow, x + c * stride, y + c * stride, w, p,
                        ahead_row(ahead.x, c, ahead.x_rows, ahead.stride, x), stream)
        prefetch_out_row(ahead, c, w * sizeof(floating))


cdef void lrn_backward_block(const floating* x, const floating* dy, floating* dx,
                             Py_ssize_t stride, Py_ssize_t w, Lrn* p, LrnPlan* q, acc_t* sums,
                             floating* t, floating* own, Ahead* ahead,
                             bint stream) noexcept nogil:
    """dx for w positions (rows as in forward_block).
    sums: 2 * (q.ring + 2) * pitch; t: q.ring * pitch; own: q.own_rows * pitch (pitch =
    row_pitch(w)). stream: dx rows written with non-temporal stores (fence before dx is
    read).

    Step c first gives channel c its own part, dy_c * s_c^-beta, kept in a ring
    of size//2 + 1 rows (own), and stores t_c in a ring of `ring` rows; then
    channel j = c - size//2, whose mirrored window now has every t it needs, gets
    dx_j = own_j - its window term: each dx row is written once."""
    cdef Window scales, grads
    cdef acc_t* scale_sums = sums
    cdef Py_ssize_t pitch = row_pitch(w), ring = q.ring, own_rows = q.own_rows
    cdef acc_t* grad_sums = sums + (ring + 2) * pitch
    cdef acc_t* scale_prefix = scale_sums + (ring + 1) * pitch
    cdef acc_t* grad_prefix = grad_sums + (ring + 1) * pitch
    cdef Py_ssize_t c, j
    cdef const acc_t* suffix
    cdef const floating* grow
    window_init(&scales, p.C, w, p.lo, p.hi, p.C)
    window_init(&grads, p.C, w, p.hi, p.lo, ring)
    for c in range(p.C + p.lo):
        if c < p.C:
            suffix = window_next(&scales, scale_sums, x, stride, True, c, &grow)
            row_backward_own(suffix, scale_prefix, grow, x + c * stride, dy + c * stride,
                             own + (c % own_rows) * pitch, t + (c % ring) * pitch, w, p,
                             ahead_row(ahead.x, c, ahead.x_rows, ahead.stride, x),
                             ahead_row(ahead.dy, c, ahead.dy_rows, ahead.stride, x))
            prefetch_out_row(ahead, c, w * sizeof(floating))
        j = c - p.lo
        if j >= 0:
            suffix = window_next(&grads, grad_sums, t, pitch, False, j, &grow)
            row_window_term(suffix, grad_prefix, grow, x + j * stride,
                            own + (j % own_rows) * pitch, dx + j * stride, w, <floating>p.coef,
                            stream)


# ------------------------------------------------- channels-last tiles

cdef inline void tile_gather(const floating* src, floating* tile, Py_ssize_t C,
                             Py_ssize_t w) noexcept nogil:
    """tile (C, w) <- w rows of C channels."""
    if floating is float:
        fn_lrn_tile_in_f32(src, tile, C, w)
    else:
        fn_lrn_tile_in_f64(src, tile, C, w)


cdef inline void tile_scatter(const floating* tile, floating* dst, Py_ssize_t C,
                              Py_ssize_t w) noexcept nogil:
    """w rows of C channels <- tile (C, w)."""
    if floating is float:
        fn_lrn_tile_out_f32(tile, dst, C, w)
    else:
        fn_lrn_tile_out_f64(tile, dst, C, w)


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
                      Py_ssize_t item_bytes, Py_ssize_t acc_bytes, bint backward,
                      bint float_075) noexcept nogil:
    """Tasks and scratch sizes; fixed by the shape, size, data and accumulator
    types (the result of an element never depends on them anyway). float_075: float32
    data with beta = 0.75 (both layouts then take the direct route for windows of at
    most FN_LRN_ROWS_MAX_SIZE)."""
    cdef LrnPlan q
    cdef Py_ssize_t tiles, positions, width
    q.N = N
    q.C = C
    q.S = S
    q.rows = S == 1
    q.direct = float_075 and size <= FN_LRN_ROWS_MAX_SIZE
    q.ring = min(size, C)
    q.own_rows = size // 2 + 1
    positions = N if q.rows else N * S
    width = min(LRN_WINDOW_BYTES // ((q.ring + 2) * acc_bytes),
                (positions + LRN_MIN_TASKS - 1) // LRN_MIN_TASKS)
    width = min(max(width, <Py_ssize_t>LRN_MIN_ROW), <Py_ssize_t>LRN_MAX_ROW)
    if q.rows:
        # a tile holds C * block values (many channels make it narrow), whole
        # vectors of positions; a task takes consecutive tiles, so that the
        # next one can be prefetched while one is computed
        q.block = min(width, max(<Py_ssize_t>LRN_MIN_TILE_ROW,
                                 LRN_TILE_BYTES // (C * item_bytes)))
        q.block = min(q.block // LRN_TILE_ALIGN * LRN_TILE_ALIGN, N)
        tiles = (N + q.block - 1) // q.block
        q.width = (tiles + LRN_MIN_TASKS - 1) // LRN_MIN_TASKS * q.block
        q.per_n = 1
        q.n_tasks = (N + q.width - 1) // q.width
    else:
        if width < S:   # equal rows: ceil(S / width) of them per channel plane
            width = (S + (S + width - 1) // width - 1) // ((S + width - 1) // width)
        q.width = q.block = min(width, S)
        q.per_n = (S + q.width - 1) // q.width
        q.n_tasks = N * q.per_n
    if backward:
        q.n_sums = 2 * (q.ring + 2) * row_pitch(q.block)
        q.n_work = (q.ring + q.own_rows) * row_pitch(q.block)
        tiles = 3       # x, dy, dx
    else:
        q.n_sums = (q.ring + 2) * row_pitch(q.block)
        q.n_work = 0
        tiles = 2       # x, y
    if q.direct:   # no window storage; rows: their squares' scratch, channels-first: none
        q.n_sums = 0
        q.n_work = row_pitch(fn_lrn_rows_scratch(C)) if q.rows else 0
    elif q.rows:
        q.n_work = row_pitch(q.n_work + tiles * C * q.block)   # threads' scratch stays aligned
    q.stream = (not q.rows and N * C * S * item_bytes >= STREAM_BYTES
                and q.width * item_bytes >= STREAM_RUN_BYTES)
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


cdef inline Ahead rows_ahead(const void* x, const void* dy, Py_ssize_t stride,
                             Lrn* p) noexcept nogil:
    """Channels-first: at step c, the rows first read at the next step, x row
    c + hi + 1 and dy row c + 1 (x, dy: those rows for c = 0; stride in bytes)."""
    cdef Ahead a
    a.x = x
    a.dy = dy
    a.out = NULL
    a.stride = stride
    a.x_rows = p.C - p.hi - 1
    a.dy_rows = p.C - 1
    a.out_rows = 0
    return a


cdef inline Ahead tile_ahead(const void* x, const void* dy, void* out, Py_ssize_t itemsize,
                             LrnPlan* q, Py_ssize_t t0, Py_ssize_t w) noexcept nogil:
    """Channels-last, for the tile at position t0 of a task of w positions (x,
    dy, out: the task's memory; dy may be NULL): the memory of the task's next
    tile, when whole, in C rows of `block` values, one per channel step."""
    cdef Ahead a
    cdef Py_ssize_t at = (t0 + q.block) * q.C * itemsize
    cdef bint whole = t0 + 2 * q.block <= w
    a.x = <const char*>x + at if whole else NULL
    a.dy = <const char*>dy + at if whole and dy != NULL else NULL
    a.out = <char*>out + at if whole else NULL
    a.stride = q.block * itemsize
    a.x_rows = a.dy_rows = a.out_rows = q.C
    return a


# (The task functions are inline because Cython also generates their never-called
# float64-data, float32-sums specializations, which gcc reports unless inline.)
cdef inline void forward_task(const floating* x, floating* y, LrnPlan* q, Lrn* p,
                              Py_ssize_t task, acc_t* sums, floating* work) noexcept nogil:
    cdef Py_ssize_t offset, stride, w, i, t0, tw
    cdef Ahead ahead
    cdef floating* x_tile = work
    cdef floating* y_tile = work + q.C * q.block
    task_span(q, task, &offset, &stride, &w)
    if floating is float:
        if q.direct:
            if q.rows:
                fn_lrn_rows_forward075_f32(x + offset, y + offset, w, q.C, p.lo, p.hi, p.k,
                                           p.a, work)
            else:
                fn_lrn_planes_forward075_f32(x + offset, y + offset, stride, w, q.C, p.lo,
                                             p.hi, p.k, p.a)
            return
    if not q.rows:
        ahead = rows_ahead(x + offset + (p.hi + 1) * stride, NULL, stride * sizeof(floating), p)
        forward_block(x + offset, y + offset, stride, w, p, sums, &ahead, q.stream)
        if q.stream:
            fn_stream_fence()
        return
    x += offset
    y += offset
    for i in range((w + q.block - 1) // q.block):
        t0 = i * q.block
        tw = min(q.block, w - t0)
        ahead = tile_ahead(x, NULL, y, sizeof(floating), q, t0, w)
        tile_gather(x + t0 * q.C, x_tile, q.C, tw)
        forward_block(x_tile, y_tile, tw, tw, p, sums, &ahead, False)
        tile_scatter(y_tile, y + t0 * q.C, q.C, tw)


cdef inline void backward_task(const floating* x, const floating* dy, floating* dx, LrnPlan* q,
                               Lrn* p, Py_ssize_t task, acc_t* sums,
                               floating* work) noexcept nogil:
    cdef Py_ssize_t offset, stride, w, i, t0, tw
    cdef Ahead ahead
    cdef floating* own = work + q.ring * row_pitch(q.block)
    cdef floating* x_tile = own + q.own_rows * row_pitch(q.block)
    cdef floating* dy_tile = x_tile + q.C * q.block
    cdef floating* dx_tile = dy_tile + q.C * q.block
    task_span(q, task, &offset, &stride, &w)
    if floating is float:
        if q.direct:
            if q.rows:
                fn_lrn_rows_backward075_f32(x + offset, dy + offset, dx + offset, w, q.C,
                                            p.lo, p.hi, p.k, p.a, <float>p.coef, work)
            else:
                fn_lrn_planes_backward075_f32(x + offset, dy + offset, dx + offset, stride, w,
                                              q.C, p.lo, p.hi, p.k, p.a, <float>p.coef)
            return
    if not q.rows:
        ahead = rows_ahead(x + offset + (p.hi + 1) * stride, dy + offset + stride,
                           stride * sizeof(floating), p)
        lrn_backward_block(x + offset, dy + offset, dx + offset, stride, w, p, q, sums, work,
                           own, &ahead, q.stream)
        if q.stream:
            fn_stream_fence()
        return
    x += offset
    dy += offset
    dx += offset
    for i in range((w + q.block - 1) // q.block):
        t0 = i * q.block
        tw = min(q.block, w - t0)
        ahead = tile_ahead(x, dy, dx, sizeof(floating), q, t0, w)
        tile_gather(x + t0 * q.C, x_tile, q.C, tw)
        tile_gather(dy + t0 * q.C, dy_tile, q.C, tw)
        lrn_backward_block(x_tile, dy_tile, dx_tile, tw, tw, p, q, sums, work, own, &ahead,
                           False)
        tile_scatter(dx_tile, dx + t0 * q.C, q.C, tw)


cdef void run_lrn(const floating* x, const floating* dy, floating* out, LrnPlan* q, Lrn* p,
                  acc_t* sums, floating* work, int n_threads) noexcept nogil:
    """Every task of the forward (dy NULL: out = y) or of the backward (out = dx);
    thread i uses row i of the (n_threads, n_sums/n_work) scratch. Tasks are handed
    out dynamically: an element's arithmetic never depends on which thread runs its
    task, and a core busy with other work then delays only its current task, not a
    fixed share of them."""
    cdef Py_ssize_t task, tid
    for task in prange(q.n_tasks, num_threads=n_threads, schedule="dynamic"):
        tid = threadid()
        if dy == NULL:
            forward_task(x, out, q, p, task, sums + tid * q.n_sums, work + tid * q.n_work)
        else:
            backward_task(x, dy, out, q, p, task, sums + tid * q.n_sums,
                          work + tid * q.n_work)


# -------------------------------------------------------------- public API

cdef inline Py_ssize_t whole_lines(Py_ssize_t n_bytes) noexcept nogil:
    return (n_bytes + 63) // 64 * 64


cdef lrn_call(cnp.ndarray x, cnp.ndarray dy, cnp.ndarray out, Py_ssize_t size, double alpha,
              double beta, double k, int n_threads):
    """lrn_forward (dy None) or lrn_backward. Dispatches on the dtype here rather than
    through fused memoryview arguments, and takes the threads' scratch from malloc: a
    tiny call spent 13 us in those two (fused signature matching, NumPy scratch
    arrays), several times its arithmetic."""
    cdef bint is_float = cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT
    cdef bint float_sums = is_float and size <= FLOAT_SUMS_MAX_SIZE
    cdef Py_ssize_t item_bytes = 4 if is_float else 8
    cdef Py_ssize_t acc_bytes = 4 if float_sums else 8
    cdef Lrn p = lrn_params(x.shape[1], size, alpha, beta, k)
    cdef LrnPlan q = lrn_plan(x.shape[0], x.shape[1], x.shape[2], size, item_bytes, acc_bytes,
                              dy is not None, is_float and p.beta_075)
    cdef void* x_data = cnp.PyArray_DATA(x)
    cdef void* dy_data = NULL if dy is None else cnp.PyArray_DATA(dy)
    cdef void* out_data = cnp.PyArray_DATA(out)
    cdef Py_ssize_t sums_bytes, scratch_bytes
    cdef void* block
    cdef char* sums
    cdef char* work
    if q.N * q.C * q.S == 0:
        return
    n_threads = max(1, min(n_threads, q.n_tasks))
    # thread i's scratch: row i of (n_threads, n_sums) accumulators, then of (n_threads,
    # n_work) working-precision values; lrn_plan makes both rows whole lines, and the
    # block starts on a line, so that every row does (the kernels load them aligned)
    sums_bytes = whole_lines(n_threads * q.n_sums * acc_bytes)
    scratch_bytes = sums_bytes + n_threads * q.n_work * item_bytes
    block = malloc(scratch_bytes + 64)
    if block == NULL:
        raise MemoryError(f"LocalResponseNorm scratch of {scratch_bytes} bytes")
    sums = <char*>block + (-<size_t>block % 64)
    work = sums + sums_bytes
    with nogil:
        if not is_float:
            run_lrn(<double*>x_data, <double*>dy_data, <double*>out_data, &q, &p,
                    <double*>sums, <double*>work, n_threads)
        elif float_sums:
            run_lrn(<float*>x_data, <float*>dy_data, <float*>out_data, &q, &p,
                    <float*>sums, <float*>work, n_threads)
        else:
            run_lrn(<float*>x_data, <float*>dy_data, <float*>out_data, &q, &p,
                    <double*>sums, <float*>work, n_threads)
    free(block)


def lrn_forward(cnp.ndarray x, cnp.ndarray y, Py_ssize_t size, double alpha, double beta,
                double k, int n_threads):
    """Local response norm forward.

    IN  x: (N, C, S) channels-first, or (R, C, 1) channels-last rows, C-contiguous
        and aligned float32/float64 (validated by the caller); size >= 1.
    OUT y: like x.
    """
    lrn_call(x, None, y, size, alpha, beta, k, n_threads)


def lrn_backward(cnp.ndarray x, cnp.ndarray dy, cnp.ndarray dx, Py_ssize_t size, double alpha,
                 double beta, double k, int n_threads):
    """Local response norm backward (the scale is recomputed from x).

    IN  x, dy: (N, C, S) channels-first, or (R, C, 1) channels-last rows, as in
        lrn_forward; size >= 1.
    OUT dx: like x.
    """
    lrn_call(x, dy, dx, size, alpha, beta, k, n_threads)
