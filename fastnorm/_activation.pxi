# Fused activations on their own: elementwise act(z) and dy * act'(z) over a
# flat array, for tests of the math in _activations.h and for layers that
# apply an activation outside a normalization kernel.
#
#   activation_forward   IN z, act        OUT y = act(z)
#   activation_backward  IN z, dy, act    OUT g = dy * act'(z)

from fastnorm._activations cimport run_act_grad, run_activate

cdef enum:
    ACTIVATION_CHUNK = 4096  # values per task: fixed, so threads never change a result


def activation_forward(const floating[::1] z, int act, floating[::1] y, int n_threads):
    """y = act(z) elementwise (y may be z). IN z: (n,); OUT y: (n,)."""
    cdef Py_ssize_t n = z.shape[0], task, start, stop
    if n == 0:
        return
    with nogil:
        for task in prange((n + ACTIVATION_CHUNK - 1) // ACTIVATION_CHUNK,
                           num_threads=n_threads, schedule="static"):
            start = task * ACTIVATION_CHUNK
            stop = min(n, start + ACTIVATION_CHUNK)
            if &y[0] != &z[0]:
                memcpy(&y[start], &z[start], (stop - start) * sizeof(floating))
            run_activate(&y[start], stop - start, act)


def activation_backward(const floating[::1] z, const floating[::1] dy, int act, floating[::1] g,
                        int n_threads):
    """g = dy * act'(z) elementwise. IN z, dy: (n,); OUT g: (n,)."""
    cdef Py_ssize_t n = z.shape[0], task, start, stop
    if n == 0:
        return
    with nogil:
        for task in prange((n + ACTIVATION_CHUNK - 1) // ACTIVATION_CHUNK,
                           num_threads=n_threads, schedule="static"):
            start = task * ACTIVATION_CHUNK
            stop = min(n, start + ACTIVATION_CHUNK)
            run_act_grad(&z[start], &dy[start], &g[start], stop - start, act)


cdef extern from "<string.h>" nogil:
    void* memcpy(void* dest, const void* src, size_t n)
