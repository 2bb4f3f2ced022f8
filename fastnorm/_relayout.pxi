# Layout changes: channels-first (N, C, S) memory <-> channels-last (N, S, C), a
# batch of matrix transposes. NumPy copies such a strided view value by value:
# a (8,128,64,64) float32 array to NHWC took 12.4 ms, back 7.4 ms, where a
# plain copy takes 1.3 ms. Layers need it when two arrays of one call disagree
# (a channels-first gradient for a channels-last input, an out= in the other
# layout).
#
# A tile is RELAYOUT_NARROW values of the shorter axis (channels, usually) by
# RELAYOUT_WIDE_BYTES of the longer one, transposed with the 8x8 register
# transposes of the LRN tiles (fn_transpose_* in _simd.h). Tiles are numbered
# with the narrow axis fastest: a thread reads a few rows of the channels-first
# side at a time, 4 KiB each (few streams for the prefetchers and DRAM pages),
# and the half lines it writes on the channels-last side are completed by the
# next tiles while still in L2. Measured at 1 thread, float32 (32,64,56,56),
# to channels-last: 64x64 tiles 4.9-5.4 ms, these 3.3 ms, a plain copy 2.0 ms,
# NumPy 5.4 ms; prefetching the next tile's rows did not help.
# Pure data movement: the same bits on every path.
#
# Public entry point (arrays validated in Python; no GIL):
#   relayout  IN src (N, R, K)   OUT dst (N, K, R), dst[n, k, r] = src[n, r, k]

from cython cimport floating
from cython.parallel cimport prange

from fastnorm._common cimport fn_transpose_f32, fn_transpose_f64

cdef enum:
    RELAYOUT_NARROW = 8
    RELAYOUT_WIDE_BYTES = 4096


cdef inline void transpose_tile(const floating* s, Py_ssize_t ss, floating* d, Py_ssize_t ds,
                                Py_ssize_t nr, Py_ssize_t nc) noexcept nogil:
    if floating is float:
        fn_transpose_f32(s, ss, d, ds, nr, nc, False)
    else:
        fn_transpose_f64(s, ss, d, ds, nr, nc, False)


def relayout(const floating[:, :, ::1] src, floating[:, :, ::1] dst, int n_threads):
    """dst[n, k, r] = src[n, r, k].

    IN  src: (N, R, K).
    OUT dst: (N, K, R), not overlapping src.
    """
    cdef Py_ssize_t N = src.shape[0], R = src.shape[1], K = src.shape[2]
    cdef Py_ssize_t wide = RELAYOUT_WIDE_BYTES // sizeof(floating)
    cdef bint narrow_rows = R <= K
    cdef Py_ssize_t tile_r = RELAYOUT_NARROW if narrow_rows else wide
    cdef Py_ssize_t tile_k = wide if narrow_rows else RELAYOUT_NARROW
    cdef Py_ssize_t row_tiles = (R + tile_r - 1) // tile_r
    cdef Py_ssize_t col_tiles = (K + tile_k - 1) // tile_k
    cdef Py_ssize_t task, n, rest, r0, k0
    cdef const floating* s
    cdef floating* d
    if N * R * K == 0:
        return
    s = &src[0, 0, 0]
    d = &dst[0, 0, 0]
    with nogil:
        for task in prange(N * row_tiles * col_tiles, num_threads=n_threads, schedule="static"):
            n = task // (row_tiles * col_tiles)
            rest = task % (row_tiles * col_tiles)
            if narrow_rows:     # the narrow axis's tile index is the fastest
                r0 = rest % row_tiles * tile_r
                k0 = rest // row_tiles * tile_k
            else:
                r0 = rest // col_tiles * tile_r
                k0 = rest % col_tiles * tile_k
            transpose_tile(s + (n * R + r0) * K + k0, K, d + (n * K + k0) * R + r0, R,
                           min(tile_r, R - r0), min(tile_k, K - k0))
