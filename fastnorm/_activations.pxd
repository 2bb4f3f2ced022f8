# Fused activations for every kernel family (math in _activations.h).
#
# The activation is an int code (ACT_NONE = 0, see fastnorm/_activation.py for
# the names), validated in Python. A kernel writes z (normalized, scaled and
# shifted) for a short run, then applies the activation to the same run while
# it is in L1:
#   forward   y = act(z)            run_affine_act, or run_activate after its own loop
#   backward  g = dy * act'(z)      run_affine_act_grad, or run_act_grad on a computed z;
#             g then takes dy's place in the usual sums and dx formula.
# With ACT_NONE the forward helpers are exactly run_affine (no extra pass).

from cython cimport floating

from fastnorm._common cimport run_affine

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


cdef inline void run_affine_act(const floating* x, floating* y, Py_ssize_t n,
                                floating mean_hi, floating mean_lo, floating scale,
                                floating shift, int act) noexcept nogil:
    """y = act(((x - mean_hi) - mean_lo) * scale + shift) over n contiguous values."""
    cdef Py_ssize_t i
    cdef floating z
    if act == ACT_RELU:
        # the most common fusion in one sweep (others: a second sweep while y is in L1)
        for i in range(n):
            z = ((x[i] - mean_hi) - mean_lo) * scale + shift
            y[i] = 0 if z < 0 else z
        return
    run_affine(x, y, n, mean_hi, mean_lo, scale, shift)
    run_activate(y, n, act)


cdef inline void run_affine_act_grad(const floating* x, const floating* dy, floating* g,
                                     Py_ssize_t n, floating mean_hi, floating mean_lo,
                                     floating scale, floating shift, int act) noexcept nogil:
    """g = dy * act'(z), z = ((x - mean_hi) - mean_lo) * scale + shift recomputed from x."""
    run_affine(x, g, n, mean_hi, mean_lo, scale, shift)
    run_act_grad(g, dy, g, n, act)
