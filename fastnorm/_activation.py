"""Names of the fused activations and their kernel codes (see fastnorm/_activations.h)."""

# name -> code passed to the kernels (0: none); the order of _activations.h's enum
ACTIVATIONS = {None: 0, "relu": 1, "silu": 2, "gelu": 3, "gelu_tanh": 4}


def check_activation(activation):
    """The activation's name, validated (None, "relu", "silu", "gelu" or "gelu_tanh")."""
    if isinstance(activation, str) or activation is None:
        if activation in ACTIVATIONS:
            return activation
    allowed = ", ".join(repr(name) for name in ACTIVATIONS)
    raise ValueError(f"activation must be one of {allowed}, got {activation!r}")


def activation_code(activation):
    """The kernels' int code for a validated activation name."""
    return ACTIVATIONS[activation]


def activation_repr(activation):
    """The ", activation=..." part of a layer's repr (empty without one)."""
    return f", activation={activation!r}" if activation else ""
