"""SyncBatchNorm: batch normalization with the statistics of every process's batch."""
import types

import numpy as np

from . import functional as F
from ._layout import kernel_ready
from ._module import NormLayer
from .batchnorm import _BatchNorm
from .comm import as_allreduce

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(_BatchNorm):
    """Batch normalization over (N, C, *) input whose batch statistics are those of
    the union of every process's batch (torch.nn.SyncBatchNorm for NumPy).

    comm: None (this process alone: then exactly BatchNorm), an mpi4py
    communicator, an object with an mpi4py-style Allreduce(sendbuf, recvbuf,
    op=None), a callable allreduce(array) -> array, or a torch.distributed process
    group (see fastnorm.comm). Every process builds its own layer with the same
    arguments and calls it on its local batch; local batches may differ in size
    and may be empty.

    * Training forward: one collective call (global count, shifted sums and
      second moments, float64); backward: one (sum(dy), sum(dy*(x-mean))).
      Eval mode: none (running statistics; without them, this process's batch
      statistics, as torch does). Every process must make the same training
      calls in the same order, an empty one included.
    * Running statistics are updated from the global statistics, bitwise
      identically on every process.
    * backward() returns the input gradient exact for the global batch; grads
      holds this process's share of the weight and bias gradients: sum them over
      the processes, as DistributedDataParallel does.
    * A global batch with one value per channel raises ValueError on every
      process; a global batch with none returns an empty output and leaves the
      running statistics alone, on every process.
    * Arguments are validated before the collective call. A process whose input
      is rejected still joins it and raises; the others raise a ValueError
      saying how many processes rejected theirs. Processes that disagree on the
      dtype, eps, momentum or the layer's state raise on every process; on the
      channel count, the communicator fails (see fastnorm.functional.sync_batch_norm).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, comm=None, *, activation=None, dtype=np.float32):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         activation=activation, dtype=dtype)
        self.comm = comm
        # The sums are centered on the previous step's global batch mean: the same
        # on every process and close to the data (see functional.sync_batch_norm).
        self._shift = np.zeros(self.num_features)

    @property
    def comm(self):
        return self._comm

    @comm.setter
    def comm(self, comm):
        self._allreduce = None if comm is None else as_allreduce(comm)
        self._comm = comm

    def forward(self, input, out=None):
        if self._allreduce is None or not self.training:
            return super().forward(input, out)
        x = kernel_ready(input) if isinstance(input, np.ndarray) else input
        tracking = self.running_mean is not None
        y, mean, invstd, count = F.native_sync_batch_norm(
            x, self.weight, self.bias, self.running_mean, self.running_var, True,
            self._momentum_now() if tracking else 0.0, self.eps, self._allreduce,
            shift=self._shift, num_features=self.num_features, activation=self.activation,
            out=out,
        )
        if count > 0:
            if tracking:
                self._count_batch()
            self._shift = np.where(np.isfinite(mean), mean, 0.0)  # a NaN must not stick
        self._saved = _Synced(x, mean, invstd, count)
        return y

    def _backward(self, grad_output, saved):
        if not isinstance(saved, _Synced):
            return super()._backward(grad_output, saved)
        grad_input, grad_weight, grad_bias = F.sync_batch_norm_backward(
            grad_output, saved.x, saved.mean, saved.invstd, saved.count, self.weight,
            self._allreduce, bias=self.bias, activation=self.activation,
            num_features=self.num_features,
        )
        grads = {"weight": grad_weight, "bias": grad_bias} if self.affine else {}
        return grad_input, grads

    def extra_repr(self):
        return f"{super().extra_repr()}, comm={self._comm!r}"

    @classmethod
    def convert_sync_batchnorm(cls, module, comm=None):
        """Like torch.nn.SyncBatchNorm.convert_sync_batchnorm.

        A fastnorm BatchNorm1d/2d/3d (or SyncBatchNorm) becomes a SyncBatchNorm on
        comm that shares its parameter and running-statistic arrays (as torch
        shares the tensors) and its train/eval mode. Any other object has its
        BatchNorm layers replaced in place, wherever they sit in its plain
        attributes, lists, dicts and tuples (recursively; a tuple is rebuilt), and
        is returned. A layer reachable twice becomes one SyncBatchNorm.
        """
        return _Converter(cls, comm).convert(module)


class _Synced:
    """What a synchronized training forward keeps for backward."""

    __slots__ = ("x", "mean", "invstd", "count")

    def __init__(self, x, mean, invstd, count):
        self.x, self.mean, self.invstd, self.count = x, mean, invstd, count


class _Converter:
    """One conversion: remembers what it has seen (cycles, shared layers)."""

    def __init__(self, cls, comm):
        self.cls = cls
        self.comm = comm
        self.converted = {}  # id(BatchNorm) -> its SyncBatchNorm
        self.visited = set()  # ids of containers and objects already walked

    def convert(self, obj):
        if isinstance(obj, _BatchNorm):
            if id(obj) not in self.converted:
                self.converted[id(obj)] = self._sync_layer(obj)
            return self.converted[id(obj)]
        if not _walkable(obj) or id(obj) in self.visited:
            return obj
        self.visited.add(id(obj))
        if isinstance(obj, tuple):
            items = [self.convert(item) for item in obj]
            if all(new is old for new, old in zip(items, obj)):
                return obj
            return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
        if isinstance(obj, list):
            for i, item in enumerate(obj):
                obj[i] = self.convert(item)
        elif isinstance(obj, dict):
            for key, value in list(obj.items()):
                obj[key] = self.convert(value)
        else:
            for name, value in list(vars(obj).items()):
                new = self.convert(value)
                if new is not value:
                    setattr(obj, name, new)
        return obj

    def _sync_layer(self, bn):
        sync = self.cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                        comm=self.comm, activation=bn.activation, dtype=bn.dtype)
        for name in sync._parameter_names + sync._buffer_names:
            setattr(sync, name, getattr(bn, name))
        if isinstance(bn, SyncBatchNorm):
            sync._shift = bn._shift.copy()
        sync.training = bn.training
        return sync


_OPAQUE = (np.ndarray, NormLayer, type, types.ModuleType, types.FunctionType, types.MethodType,
           types.BuiltinFunctionType)


def _walkable(obj):
    """Containers and plain objects the converter looks inside: not arrays, other
    layers, classes, modules or functions."""
    if isinstance(obj, (list, tuple, dict)):
        return True
    return hasattr(obj, "__dict__") and not isinstance(obj, _OPAQUE)
