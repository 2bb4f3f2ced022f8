# Fused activations for every kernel family (math in _activations.h).
#
# The activation is an int code (ACT_NONE = 0, see fastnorm/_activation.py for
# the names), validated in Python. A kernel writes z (normalized, scaled and
# shifted) for a short run, then applies the activation to the same run while
# it is in L1:
#   forward   y = act(z)            run_affine_act (streamed too), or run_activate after
#                                   its own loop
#   backward  g = dy * act'(z)      run_affine_act_grad (z formed in the same sweep), or
#                                   run_act_grad on a computed z;
#             g then takes dy's place in the usual sums and dx formula. BatchNorm forms
#             it inside those passes as they read x and dy: run_act_grad_sums,
#             cols_act_grad_sums (channels-last rows) and run_act_affine_backward.
# With ACT_NONE the forward helpers are exactly run_affine_out (no extra pass).

from cython cimport floating

from fastnorm._common cimport row_grad_sums, run_affine_backward, run_affine_out

cdef extern from "_activations.h" nogil:
    enum:
        ACT_NONE "FN_ACT_NONE"
        ACT_RELU "FN_ACT_RELU"
        ACT_SILU "FN_ACT_SILU"
        ACT_GELU "FN_ACT_GELU"
        ACT_GELU_TANH "FN_ACT_GELU_TANH"
        # bytes of a streamed activated output formed at a time in an L1 scratch
        STREAM_ACT_CHUNK_BYTES "FN_STREAM_ACT_CHUNK_BYTES"
    void fn_activate_f32(float* y, Py_ssize_t n, int act)
    void fn_activate_f64(double* y, Py_ssize_t n, int act)
    void fn_act_grad_f32(const float* z, const float* dy, float* g, Py_ssize_t n, int act)
    void fn_act_grad_f64(const double* z, const double* dy, double* g, Py_ssize_t n, int act)
    void fn_affine_relu_f32(const float* x, float* y, const float* w, const float* b,
                            Py_ssize_t n, float mean_hi, float mean_lo, float scale, float shift)
    void fn_affine_relu_f64(const double* x, double* y, const double* w, const double* b,
                            Py_ssize_t n, double mean_hi, double mean_lo, double scale,
                            double shift)
    void fn_channels_relu_f32(const float* x, float* y, Py_ssize_t n, const float* mean_hi,
                              const float* scale, const float* shift)
    void fn_channels_relu_f64(const double* x, double* y, Py_ssize_t n, const double* mean_hi,
                              const double* scale, const double* shift)
    void fn_affine_act_grad_f32(const float* x, const float* dy, float* g, const float* w,
                                const float* b, Py_ssize_t n, float mean_hi, float mean_lo,
                                float scale, float shift, int act)
    void fn_affine_act_grad_f64(const double* x, const double* dy, double* g, const double* w,
                                const double* b, Py_ssize_t n, double mean_hi, double mean_lo,
                                double scale, double shift, int act)
    void fn_channels_act_grad_f32(const float* x, const float* dy, float* g, Py_ssize_t n,
                                  const float* mean_hi, const float* scale, const float* shift,
                                  int act)
    void fn_channels_act_grad_f64(const double* x, const double* dy, double* g, Py_ssize_t n,
                                  const double* mean_hi, const double* scale,
                                  const double* shift, int act)
    void fn_act_grad_sums_f32(const float* x, const float* dy, float* g_out, Py_ssize_t n,
                              float mean_hi, float mean_lo, float scale, float shift, int act,
                              double* sum_g, double* sum_gd)
    void fn_act_grad_sums_f64(const double* x, const double* dy, double* g_out, Py_ssize_t n,
                              double mean_hi, double mean_lo, double scale, double shift,
                              int act, double* sum_g, double* sum_gd)
    void fn_act_affine_backward_f32(const float* x, const float* dy, float* dx, Py_ssize_t n,
                                    float mean_hi, float mean_lo, float k_dy, float k_x,
                                    float k_0, float scale, float shift, int act)
    void fn_act_affine_backward_f64(const double* x, const double* dy, double* dx,
                                    Py_ssize_t n, double mean_hi, double mean_lo, double k_dy,
                                    double k_x, double k_0, double scale, double shift,
                                    int act)
    void fn_cols_act_grad_sums_f32(const float* x, const float* dy, float* g, Py_ssize_t nrows,
                                   Py_ssize_t stride, Py_ssize_t nc, const float* mean_hi,
                                   const float* mean_lo, const float* z_hi,
                                   const float* z_scale, const float* z_shift, int act,
                                   double* sum_g, double* sum_gd)
    void fn_cols_act_grad_sums_f64(const double* x, const double* dy, double* g,
                                   Py_ssize_t nrows, Py_ssize_t stride, Py_ssize_t nc,
                                   const double* mean_hi, const double* mean_lo,
                                   const double* z_hi, const double* z_scale,
                                   const double* z_shift, int act, double* sum_g,
                                   double* sum_gd)
    void fn_affine_act_streamed_f32(const float* x, float* y, const float* w, const float* b,
                                    Py_ssize_t n, float mean_hi, float mean_lo, float scale,
                                    float shift, int act, Py_ssize_t ahead)
    void fn_affine_act_streamed_f64(const double* x, double* y, const double* w,
                                    const double* b, Py_ssize_t n, double mean_hi,
                                    double mean_lo, double scale, double shift, int act,
                                    Py_ssize_t ahead)


cdef inline void run_activate(floating* y, Py_ssize_t n, int act) noexcept nogil:
    """y = act(y) over n contiguous values, in place."""
    if act == ACT_NONE:
        return
    if floating is float:
        fn_activate_f32(y, n, act)
    else:
        fn_activate_f64(y, n, act)


cdef inline void run_act_grad(const floating* z, const floating* dy, floating* g, Py_ssize_t n,
                              int act) noexcept nogil:
    """g = dy * act'(z) over n contiguous values; g may be z itself."""
    if floating is float:
        fn_act_grad_f32(z, dy, g, n, act)
    else:
        fn_act_grad_f64(z, dy, g, n, act)


cdef inline void run_affine_act(const floating* x, floating* y, const floating* w,
                                const floating* b, Py_ssize_t n, floating mean_hi,
                                floating mean_lo, floating scale, floating shift, int act,
                                bint stream, Py_ssize_t ahead=0) noexcept nogil:
    """y = act(z) over n contiguous values, z = ((x - mean_hi) - mean_lo) * scale * w + b
    (w, b per element) or ((x - mean_hi) - mean_lo) * scale + shift (w NULL). stream:
    non-temporal stores (same values; with an activation through an L1 scratch, see
    fn_affine_act_streamed in _activations.h), which then also prefetches x's lines
    `ahead` values further into L2 (0: none)."""
    if act != ACT_NONE and stream:
        if floating is float:
            fn_affine_act_streamed_f32(x, y, w, b, n, mean_hi, mean_lo, scale, shift, act, ahead)
        else:
            fn_affine_act_streamed_f64(x, y, w, b, n, mean_hi, mean_lo, scale, shift, act, ahead)
    elif act == ACT_RELU:   # in one sweep (the others: a second sweep while y is in L1)
        if floating is float:
            fn_affine_relu_f32(x, y, w, b, n, mean_hi, mean_lo, scale, shift)
        else:
            fn_affine_relu_f64(x, y, w, b, n, mean_hi, mean_lo, scale, shift)
    else:
        run_affine_out(x, y, w, b, n, mean_hi, mean_lo, scale, shift, stream)
        run_activate(y, n, act)


cdef inline void run_affine_act_grad(const floating* x, const floating* dy, floating* g,
                                     const floating* w, const floating* b, Py_ssize_t n,
                                     floating mean_hi, floating mean_lo, floating scale,
                                     floating shift, int act) noexcept nogil:
    """g = dy * act'(z), z = ((x - mean_hi) - mean_lo) * scale * w + b (w, b per element)
    or ((x - mean_hi) - mean_lo) * scale + shift (w NULL), recomputed from x in the same
    sweep (g may be dy)."""
    if floating is float:
        fn_affine_act_grad_f32(x, dy, g, w, b, n, mean_hi, mean_lo, scale, shift, act)
    else:
        fn_affine_act_grad_f64(x, dy, g, w, b, n, mean_hi, mean_lo, scale, shift, act)


cdef inline bint act_grad_is_cheap(int act) noexcept nogil:
    """Whether g = dy * act'(z) costs less to form twice (in the sums, then in the dx pass)
    than to store once and read back: ReLU's compare and select, yes (BatchNorm2d
    (32,64,56,56) + ReLU backward 1.2-1.3x faster); SiLU's and GELU's exp/erf, no (0.9x
    at one thread)."""
    return act == ACT_RELU


cdef inline void run_act_grad_sums(const floating* x, const floating* dy, Py_ssize_t n,
                                   floating mean_hi, floating mean_lo, int act, floating scale,
                                   floating shift, floating* g_out, double* sum_g,
                                   double* sum_gd) noexcept nogil:
    """Add sum(g) and sum(g * (x - mean)) over n contiguous values: g = dy without an
    activation, else g = dy * act'(z), z as in run_affine_act_grad, formed and summed
    piece by piece (fn_act_grad_sums in _activations.h): into g_out (n values) when
    given, where the dx pass can read it, else on the stack, never written to memory.
    The sums are the same either way."""
    if act == ACT_NONE:
        row_grad_sums(x, dy, NULL, n, mean_hi, mean_lo, sum_g, sum_gd)
    elif floating is float:
        fn_act_grad_sums_f32(x, dy, g_out, n, mean_hi, mean_lo, scale, shift, act, sum_g,
                             sum_gd)
    else:
        fn_act_grad_sums_f64(x, dy, g_out, n, mean_hi, mean_lo, scale, shift, act, sum_g,
                             sum_gd)


cdef inline void run_act_affine_backward(const floating* x, const floating* dy, floating* dx,
                                         Py_ssize_t n, floating mean_hi, floating mean_lo,
                                         floating k_dy, floating k_x, floating k_0, int act,
                                         floating scale, floating shift) noexcept nogil:
    """dx = k_dy * g + (k_x * (x - mean) + k_0) over n contiguous values, g as in
    run_act_grad_sums: formed in dx piece by piece and consumed there (the same values as
    g written out whole, then run_affine_backward in place)."""
    if act == ACT_NONE:
        run_affine_backward(x, dy, dx, n, mean_hi, mean_lo, k_dy, k_x, k_0)
    elif floating is float:
        fn_act_affine_backward_f32(x, dy, dx, n, mean_hi, mean_lo, k_dy, k_x, k_0, scale, shift,
                                   act)
    else:
        fn_act_affine_backward_f64(x, dy, dx, n, mean_hi, mean_lo, k_dy, k_x, k_0, scale, shift,
                                   act)


cdef enum:
    # Largest per-channel arrays (4 of a column block's width) of cols_grad_sums for which
    # cols_act_grad_sums pays: with them, a row's x, dy and g stay in L1
    ACT_ROWS_ACC_BYTES = 4096


cdef inline bint act_rows_interleave(int act, Py_ssize_t width,
                                     Py_ssize_t itemsize) noexcept nogil:
    """Whether channels-last gradient sums with an activation take cols_act_grad_sums
    (g formed row by row as it is summed) rather than g formed for a unit of rows, then
    summed: for ReLU, whose g is cheap and whose sums wait on memory, over blocks of
    width values (lanes of rows, see fn_column_rows_per_lane) with small accumulators.
    BatchNorm2d channels-last + ReLU, one thread, cold: 64 channels 1.15-1.26x; 256
    channels 0.88-1.08x; 512 0.98x; 1024 0.82-0.88x. SiLU: 0.90-1.01x."""
    return act_grad_is_cheap(act) and 4 * width * itemsize <= ACT_ROWS_ACC_BYTES


cdef inline void cols_act_grad_sums(const floating* x, const floating* dy, floating* g,
                                    Py_ssize_t nrows, Py_ssize_t stride, Py_ssize_t nc,
                                    const floating* mean_hi, const floating* mean_lo,
                                    const floating* z_hi, const floating* z_scale,
                                    const floating* z_shift, int act, double* sum_g,
                                    double* sum_gd) noexcept nogil:
    """cols_grad_sums (_common.pxd) of g = dy * act'(z), z = (x - z_hi) * z_scale + z_shift
    per channel (z_hi NULL: x * z_scale + z_shift), each row of g written to g (laid out
    like x) just before it is summed."""
    if floating is float:
        fn_cols_act_grad_sums_f32(x, dy, g, nrows, stride, nc, mean_hi, mean_lo, z_hi, z_scale,
                                  z_shift, act, sum_g, sum_gd)
    else:
        fn_cols_act_grad_sums_f64(x, dy, g, nrows, stride, nc, mean_hi, mean_lo, z_hi, z_scale,
                                  z_shift, act, sum_g, sum_gd)


cdef inline void channels_relu(const floating* x, floating* y, Py_ssize_t n,
                               const floating* mean_hi, const floating* scale,
                               const floating* shift) noexcept nogil:
    """y = relu(z) over n channels of a channels-last row, z = (x - mean_hi) * scale + shift
    per channel (mean_hi NULL: x * scale + shift), in one sweep."""
    if floating is float:
        fn_channels_relu_f32(x, y, n, mean_hi, scale, shift)
    else:
        fn_channels_relu_f64(x, y, n, mean_hi, scale, shift)


cdef inline void channels_act_grad(const floating* x, const floating* dy, floating* g,
                                   Py_ssize_t n, const floating* mean_hi, const floating* scale,
                                   const floating* shift, int act) noexcept nogil:
    """g = dy * act'(z) over n channels of a channels-last row, z = (x - mean_hi) * scale
    + shift per channel (mean_hi NULL: x * scale + shift), in one sweep."""
    if floating is float:
        fn_channels_act_grad_f32(x, dy, g, n, mean_hi, scale, shift, act)
    else:
        fn_channels_act_grad_f64(x, dy, g, n, mean_hi, scale, shift, act)
