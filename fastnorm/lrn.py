"""LocalResponseNorm: PyTorch's local response normalization layer for NumPy arrays."""
from ._layout import kernel_ready
from ._module import NormLayer
from ._validation import check_count
from .functional.local_response_norm import (
    check_coefficient, check_input, lrn_backward, lrn_forward,
)

__all__ = ["LocalResponseNorm"]


class LocalResponseNorm(NormLayer):
    """Local response normalization over channels of (N, C, *) input (>= 3 dims):

        y_c = x_c / (k + alpha / size * sum_{c'} x_{c'}**2)**beta,

    c' from c - size//2 to c + (size-1)//2 (zero-padded at the ends).

    No parameters: parameters() is empty, grads is {} after backward, and the
    state dict is {}. The input's layout (e.g. channels-last) is kept.
    """

    _parameter_names = ()

    def __init__(self, size, alpha=1e-4, beta=0.75, k=1.0):
        super().__init__()
        del self.dtype  # no parameters, so no dtype: the input's dtype is used
        self.size = check_count("size", size)
        self.alpha = check_coefficient("alpha", alpha)
        self.beta = check_coefficient("beta", beta)
        self.k = check_coefficient("k", k)

    def forward(self, input, out=None):
        """y = LRN(input), a new array in input's layout (or out)."""
        check_input(input)
        x = kernel_ready(input)  # strided input: copied once, for forward and backward
        y = lrn_forward(x, self.size, self.alpha, self.beta, self.k, out)
        self._saved = x
        return y

    def _backward(self, grad_output, saved):
        grad_input = lrn_backward(grad_output, saved, self.size, self.alpha, self.beta, self.k)
        return grad_input, {}

    def extra_repr(self):
        return f"{self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"
