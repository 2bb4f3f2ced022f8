"""Batch normalization with statistics over the union of every process's batch.

    y = (x - mean[c]) / sqrt(var[c] + eps) * weight[c] + bias[c]

where mean and var are taken over the global batch: every process's (N_r, C, *)
input, as if concatenated along N (local batches may differ in size, and may be
empty). Each process normalizes its own batch. A training forward makes exactly
one collective call, a training backward one, eval mode none. With comm=None
these are exactly batch_norm, native_batch_norm and batch_norm_backward.

The collective
--------------
Each call sums one float64 buffer over the processes (fastnorm.comm):

    [ header | payload: 2 * C values ]

header:
    processes   1 from each process: the sum is the number of processes P.
    rejected    1 from a process whose arguments failed validation. It still joins
                the call (payload zeros), then raises its own error while every
                other process raises a ValueError: nobody waits forever.
    count       values per channel in this process's batch: the sum is the global
                count, on which every decision (empty batch, one value) is taken.
    then (v, v*v) for small integers v that every process must agree on: the
    operation (forward or backward), the channel count, the dtype's size and a
    fingerprint of the state the sums depend on. They agree iff
    P * sum(v*v) == sum(v)**2, evaluated exactly on the same sums everywhere, so
    every process takes the same decision.

forward payload, per channel, with K a shift identical on every process:
    sum(x - K)        = n_r * (mean_r - K)
    sum((x - K)**2)   = M2_r + n_r * (mean_r - K)**2
from the kernels' local mean_r and M2_r (squared deviations from mean_r). Then
    d = sum(x - K) / N,   mean = K + d,   M2 = sum((x - K)**2) - d * sum(x - K).

backward payload, per channel, with the global mean:
    sum(dy),  sum(dy * (x - mean))

Numerics of the shift
---------------------
Each process's spread about its own mean (M2_r) is exact whatever K is; only the
spread of the local means about K cancels in M2 = S2 - d*S1, which loses about
log10((mean - K)**2 / var) digits: with K = 0 and data of mean 1e4 and std 1,
eight of sixteen, i.e. a relative error near 1e-8 in var (well inside float32
accuracy). The layer shifts by the previous step's global batch mean (0 at its
first training step), so from then on |mean - K| is of the order of the sampling
error and nothing is lost. This functional form has no state: it shifts by
running_mean when given, else by 0, unless shift= says otherwise.

Processes that disagree
-----------------------
* Channels: the buffers differ in length, which no all-reduce supports. MPI
  reports an error on some processes (MPICH: "Message truncated", an
  mpi4py.MPI.Exception; under `python -m mpi4py` the job aborts); a process that
  does get sums sees the channel fields disagree and raises ValueError. With a
  plain callable, whatever it does with unequal arrays.
* dtype (float32 on some, float64 on others): TypeError on every process.
* eps, momentum, the shift, or (backward) the forward statistics -- a layer built,
  loaded or stepped differently somewhere: ValueError on every process.
* Forward on some processes while others run backward: RuntimeError on every
  process. Training on some processes while others are in eval mode cannot be
  detected (eval makes no collective call): the training ones wait.
"""
import contextlib
import zlib

import numpy as np

from .._activation import activation_code, check_activation
from .._kernels import kernels
from .._layout import deliver, input_view, kernel_view, output_for
from .._threads import threads_for
from .._validation import check_channels, check_count, check_float_array, check_vector
from ..comm import as_allreduce
from .batch_norm import (
    _check_backward, _check_forward, _per_channel, batch_norm_backward,
    native_batch_norm,
)

__all__ = ["sync_batch_norm", "native_sync_batch_norm", "sync_batch_norm_backward"]

FORWARD, BACKWARD = 1, 2

# header layout
_PROCESSES, _REJECTED, _COUNT = 0, 1, 2
_AGREED = ("operation", "channels", "dtype", "state")  # (v, v*v) pairs from index 3
_HEADER = 3 + 2 * len(_AGREED)
_FIELD_MASK = 0xFFFF  # agreed values stay below 2**16: their sums of squares are exact


def sync_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
                    momentum=0.1, eps=1e-5, comm=None, *, activation=None, out=None):
    """batch_norm (same arguments and semantics, activation= included) with the
    batch statistics of the global batch in training: see the module docstring.
    comm: anything fastnorm.comm.as_allreduce accepts; None is batch_norm itself."""
    return native_sync_batch_norm(input, weight, bias, running_mean, running_var, training,
                                  momentum, eps, comm, activation=activation, out=out)[0]


def native_sync_batch_norm(input, weight, bias, running_mean, running_var, training, momentum,
                           eps, comm, *, shift=None, num_features=None, activation=None,
                           out=None):
    """Returns (output, save_mean, save_invstd, count) for sync_batch_norm_backward.

    In training: the global batch mean and 1/sqrt(biased var + eps) (float64, (C,)),
    and the global number of values per channel; running_mean/running_var, when
    given, are updated in place with the global statistics, identically on every
    process. Otherwise (or with comm=None) exactly native_batch_norm, no collective,
    and count is the local one.

    shift: (C,) values identical on every process to center the sums on (default
    running_mean, or 0). num_features: the channel count every process agrees on;
    the input must have it, and it lets a process whose input is not even an array
    still join the collective call (else the count comes from the parameters or
    the input).

    Every process raises the same error when the global batch has one value per
    channel (as BatchNorm does locally), or when any process's arguments are
    rejected or the processes disagree; nothing changes then on any process. A
    global batch of zero values returns an empty output and leaves the running
    statistics alone.
    """
    if comm is None or not training:
        y, mean, invstd = native_batch_norm(input, weight, bias, running_mean, running_var,
                                            training, momentum, eps, activation=activation,
                                            out=out)
        return y, mean, invstd, input.size // input.shape[1]
    allreduce = as_allreduce(comm)
    guess = _known_channels(num_features, input, weight, bias, running_mean, running_var)
    with _joined_when_rejected(allreduce, guess):
        _check_layer_channels(input, num_features)
        _check_forward(input, weight, bias, running_mean, running_var, True, momentum, eps, out,
                       check_batch_size=False)
        shift = _shift_for(shift, running_mean, input.shape[1])
        act = activation_code(check_activation(activation))
    x = input
    channels = x.shape[1]
    view, channels_last = input_view(x)
    target, y_view = output_for(x, channels_last, out)
    local_count = x.size // channels
    state = _fingerprint(shift, eps, momentum if running_mean is not None else 0.0)
    count, sums = _exchange(allreduce, FORWARD, x, local_count, state,
                            _shifted_sums(view, local_count, shift))
    if count == 1:
        raise ValueError("Expected more than 1 value per channel when training, got 1 value "
                         "per channel in the batch of all processes together")
    if count == 0:
        return deliver(target, out), np.zeros(channels), np.full(channels, 1.0 / np.sqrt(1.0 + eps)), 0
    mean, var = _global_moments(sums, count, shift)
    invstd = 1.0 / np.sqrt(var + eps)
    if local_count > 0:
        scale = _per_channel(weight, channels, 1.0) * invstd
        kernels.channel_normalize(view, mean, scale, _per_channel(bias, channels, 0.0), y_view,
                                  threads_for(x.size), act)
    if running_mean is not None:
        kernels.channel_update_running(running_mean, running_var, mean, var, count, momentum)
    return deliver(target, out), mean, invstd, count


def sync_batch_norm_backward(grad_output, input, save_mean, save_invstd, count, weight=None,
                             comm=None, *, bias=None, activation=None, num_features=None):
    """Gradients of a training native_sync_batch_norm: (grad_input, grad_weight, grad_bias).

    count, save_mean, save_invstd: what the forward returned. grad_input is exact
    for the global batch (one collective call). grad_weight and grad_bias are this
    process's share, from its own batch: sum them over the processes (as
    DistributedDataParallel does) for the gradient of the global loss. With
    comm=None this is batch_norm_backward(..., training=True). With the forward's
    activation, pass its bias too (see batch_norm_backward).
    """
    if comm is None:
        return batch_norm_backward(grad_output, input, save_mean, save_invstd, weight,
                                   training=True, bias=bias, activation=activation)
    allreduce = as_allreduce(comm)
    guess = num_features if num_features is not None else getattr(save_mean, "size", None)
    with _joined_when_rejected(allreduce, guess):
        _check_layer_channels(input, num_features)
        _check_backward(grad_output, input, save_mean, save_invstd, weight)
        count = check_count("count", count, minimum=0)
        check_vector(input, bias, "bias", input.shape[1])
        act = activation_code(check_activation(activation))
    x = input
    channels = x.shape[1]
    mean = np.require(save_mean, np.float64, "CA")
    invstd = np.require(save_invstd, np.float64, "CA")
    view, channels_last = input_view(x)
    grad_view = kernel_view(grad_output, channels_last)
    grad_input, grad_input_view = output_for(x, channels_last)
    local = np.zeros(2 * channels)  # [sum(dy) | sum(dy * (x - mean))] of this process
    if x.size > 0:
        # with an activation, the sums are of g = dy * act'(z), which the kernel also
        # stores where grad_input goes: g then takes dy's place
        scale = _per_channel(weight, channels, 1.0) * invstd if act else None
        shift = _per_channel(bias, channels, 0.0) if act else None
        kernels.channel_grad_sums(view, grad_view, mean, local[:channels], local[channels:],
                                  threads_for(x.size), act, scale, shift,
                                  grad_input_view if act else None)
        if act:
            grad_view = grad_input_view
    _, sums = _exchange(allreduce, BACKWARD, x, x.size // channels,
                        _fingerprint(mean, invstd, count), local)
    k_dy, k_x, k_0 = np.empty(channels), np.empty(channels), np.empty(channels)
    kernels.channel_backward_coefficients(sums[:channels], sums[channels:], float(count), invstd,
                                          _per_channel(weight, channels, 1.0), True, k_dy, k_x, k_0)
    if x.size > 0:
        kernels.channel_backward_apply(view, grad_view, mean, k_dy, k_x, k_0, grad_input_view,
                                       threads_for(x.size))
    grad_weight = (local[channels:] * invstd).astype(x.dtype)
    grad_bias = local[:channels].astype(x.dtype)
    return grad_input, grad_weight, grad_bias


# ------------------------------------------------------------- statistics

def _shifted_sums(view, count, shift):
    """[sum(x - K) | sum((x - K)**2)] per channel of this process's batch."""
    channels = shift.shape[0]
    if count == 0:
        return np.zeros(2 * channels)
    mean = np.empty(channels)
    m2 = np.empty(channels)
    kernels.channel_moments(view, mean, m2, threads_for(view.size))
    offset = mean - shift
    return np.concatenate([count * offset, m2 + count * offset * offset])


def _global_moments(sums, count, shift):
    """Global mean and biased variance from the summed shifted sums."""
    channels = shift.shape[0]
    s1, s2 = sums[:channels], sums[channels:]
    offset = s1 / count
    m2 = np.maximum(s2 - offset * s1, 0.0)  # rounding may leave a tiny negative
    return shift + offset, m2 / count


def _shift_for(shift, running_mean, channels):
    if shift is None:
        shift = running_mean if running_mean is not None else np.zeros(channels)
    shift = np.asarray(shift)
    if shift.shape != (channels,) or shift.dtype.kind != "f":
        raise ValueError(f"shift must be a float array of shape ({channels},), got "
                         f"{shift.dtype} array of shape {shift.shape}")
    return np.require(shift, np.float64, "CA")


# ------------------------------------------------------------- collective

def _exchange(allreduce, operation, x, count, state, payload):
    """The one collective call of a training forward or backward: returns the
    global count and the summed payload, or raises the same error everywhere."""
    agreed = (operation, x.shape[1] & _FIELD_MASK, x.dtype.itemsize, state)
    send = np.empty(_HEADER + payload.size)
    send[_PROCESSES], send[_REJECTED], send[_COUNT] = 1.0, 0.0, count
    send[3:_HEADER:2] = agreed
    send[4:_HEADER:2] = [v * v for v in agreed]
    send[_HEADER:] = payload
    total = allreduce(send)
    _check_agreement(total)
    return int(total[_COUNT]), total[_HEADER:]


@contextlib.contextmanager
def _joined_when_rejected(allreduce, channels):
    """Around validation: a process whose arguments are rejected still joins the
    collective call, flagged, then raises its error (the others raise with it).
    Without a known channel count it cannot build the buffer and raises alone."""
    try:
        yield
    except (TypeError, ValueError):
        if channels is not None:
            rejected = np.zeros(_HEADER + 2 * channels)
            rejected[_PROCESSES] = rejected[_REJECTED] = 1.0
            allreduce(rejected)
        raise


def _check_agreement(total):
    processes = total[_PROCESSES]
    if not (processes >= 1 and processes == int(processes)):
        raise RuntimeError(f"the communicator returned {processes!r} processes: it did not sum")
    processes = int(processes)
    if total[_REJECTED]:
        raise ValueError(
            f"SyncBatchNorm: {int(total[_REJECTED])} of {processes} processes rejected their "
            "arguments (those processes raised the reason); nothing changed on any process"
        )
    for i, what in enumerate(_AGREED):
        s1, s2 = int(total[3 + 2 * i]), int(total[4 + 2 * i])
        if processes * s2 != s1 * s1:
            raise _disagreement(what, processes, s1)


def _disagreement(what, processes, total):
    if what == "operation":
        return RuntimeError(
            "SyncBatchNorm: processes are out of step, some run forward while others run "
            "backward; every process must make the same training calls in the same order"
        )
    if what == "channels":
        return ValueError("SyncBatchNorm: the processes disagree on the number of channels")
    if what == "dtype":
        doubles = (total - 4 * processes) // 4  # itemsizes 4 and 8
        return TypeError(f"SyncBatchNorm: the processes' inputs do not share one dtype: "
                         f"{doubles} of {processes} are float64, the others float32")
    return ValueError(
        "SyncBatchNorm: the processes disagree on the layer's settings or state (eps, "
        "momentum, num_batches_tracked with momentum=None, the statistics shift, or in "
        "backward the forward's statistics): a layer built, loaded or trained differently "
        "on some process; nothing changed on any process"
    )


def _fingerprint(*values):
    """A 16-bit checksum of arrays and numbers (processes compare it, not the data)."""
    data = b"".join(np.require(v, np.float64, "CA").tobytes() for v in values)
    return zlib.crc32(data) & _FIELD_MASK


def _known_channels(num_features, input, *per_channel):
    """The channel count to size the buffer with, before validation: None when
    nothing tells it."""
    if num_features is not None:
        return num_features
    for arr in per_channel:
        if isinstance(arr, np.ndarray) and arr.ndim == 1:
            return arr.shape[0]
    if isinstance(input, np.ndarray) and input.ndim >= 2:
        return input.shape[1]
    return None


def _check_layer_channels(x, num_features):
    """The layer's channel count first: the clearest message when it is wrong."""
    if num_features is not None:
        check_float_array(x, "input")
        if x.ndim >= 2:
            check_channels(x, num_features, "SyncBatchNorm")


