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
#             g then takes dy's place in the usual sums and dx formula.
# With ACT_NONE the forward helpers are exactly run_affine_out (no extra pass).

from cython cimport floating

from fastnorm._common cimport run_affine_out

cdef extern from "_activations.h" nogil:
    enum:
        ACT_NONE "FN_ACT_NONE"
        ACT_RELU "FN_ACT_RELU"
        ACT_SILU "FN_ACT_SILU"
        ACT_GELU "FN_ACT_GELU"
        ACT_GELU_TANH "FN_ACT_GELU_TANH"
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
    void fn_affine_act_streamed_f32(const float* x, float* y, const float* w, const float* b,
                                    Py_ssize_t n, float mean_hi, float mean_lo, float scale,
                                    float shift, int act)
    void fn_affine_act_streamed_f64(const double* x, double* y, const double* w,
                                    const double* b, Py_ssize_t n, double mean_hi,
                                    double mean_lo, double scale, double shift, int act)


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
                                bint stream) noexcept nogil:
    """y = act(z) over n contiguous values, z = ((x - mean_hi) - mean_lo) * scale * w + b
    (w, b per element) or ((x - mean_hi) - mean_lo) * scale + shift (w NULL). stream:
    non-temporal stores (same values; with an activation through an L1 scratch, see
    fn_affine_act_streamed in _activations.h)."""
    if act != ACT_NONE and stream:
        if floating is float:
            fn_affine_act_streamed_f32(x, y, w, b, n, mean_hi, mean_lo, scale, shift, act)
        else:
            fn_affine_act_streamed_f64(x, y, w, b, n, mean_hi, mean_lo, scale, shift, act)
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
