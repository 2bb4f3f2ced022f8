"""Communicators for SyncBatchNorm.

Whatever the user passes as `comm` becomes one internal interface,
`allreduce(buffer) -> sums`: it takes a 1-D float64 ndarray and returns a new
float64 ndarray of the same shape holding the elementwise sum of every
process's buffer. `as_allreduce(comm)` accepts:

  * None: this process alone (the sum is the buffer itself);
  * an mpi4py communicator (MPI.COMM_WORLD or a sub-communicator): reduced with
    the buffer API, comm.Allreduce(send, recv, op=MPI.SUM), never the pickling
    lower-case allreduce;
  * any object with an mpi4py-style Allreduce(sendbuf, recvbuf, op=None) that
    sums sendbuf across processes into recvbuf (NumPy arrays);
  * a plain callable allreduce(array) -> array returning the elementwise sum;
  * a torch.distributed process group, or TorchDistributedComm(group).

mpi4py and torch stay optional: neither is imported unless such an object is
passed (mpi4py communicators and torch process groups are recognised by the
module their type comes from).

Every process must get bitwise the same sums (MPI implementations, gloo and
ring/tree all-reduces do): SyncBatchNorm relies on it to keep the running
statistics identical everywhere.
"""
import numpy as np

__all__ = ["Allreduce", "TorchDistributedComm", "as_allreduce"]


class Allreduce:
    """The internal interface: a callable summing a float64 buffer across processes.

    `allreduce(buffer)` returns a new float64 array of buffer's shape; `size`
    is not known in advance (the sum of a 1 sent by every process gives it).
    """

    def __init__(self, reduce, source):
        self._reduce = reduce
        self.source = source  # what the user passed, for repr and error messages

    def __call__(self, buffer):
        buffer = np.ascontiguousarray(buffer, dtype=np.float64)
        result = self._reduce(buffer)
        if not isinstance(result, np.ndarray) or result.dtype != np.float64 or result.shape != buffer.shape:
            raise TypeError(
                f"the communicator {self.source!r} must return a float64 array of shape "
                f"{buffer.shape}, got {_describe(result)}"
            )
        return result

    def __repr__(self):
        return f"Allreduce({self.source!r})"


def as_allreduce(comm):
    """The Allreduce for what a user passed as `comm` (see the module docstring).

    An Allreduce is returned as it is. Anything else is a TypeError that says
    what is accepted; an mpi4py COMM_NULL or inter-communicator is a ValueError.
    """
    if isinstance(comm, Allreduce):
        return comm
    if comm is None:
        return Allreduce(np.copy, None)
    if _is_torch_process_group(comm):
        comm = TorchDistributedComm(comm)
    if hasattr(comm, "Allreduce"):
        return _buffer_allreduce(comm)
    if callable(comm):
        return Allreduce(lambda buffer: np.asarray(comm(buffer)), comm)
    raise TypeError(
        "comm must be None, an mpi4py communicator, an object with an mpi4py-style "
        "Allreduce(sendbuf, recvbuf, op=None), a callable allreduce(array) -> array, or a "
        f"torch.distributed process group; got {type(comm).__name__}"
    )


def _buffer_allreduce(comm):
    """Allreduce(sendbuf, recvbuf[, op]) objects: mpi4py gets op=MPI.SUM explicitly,
    duck-typed objects their default op (a sum, by contract)."""
    if _is_mpi4py(comm):
        from mpi4py import MPI  # already imported by whoever made comm

        if comm == MPI.COMM_NULL:
            raise ValueError("comm is MPI.COMM_NULL: this process is not part of the communicator")
        if comm.Is_inter():
            raise ValueError("comm is an MPI inter-communicator; SyncBatchNorm needs an intra-communicator")

        def reduce(send):
            recv = np.empty_like(send)
            comm.Allreduce(send, recv, op=MPI.SUM)
            return recv
    else:
        def reduce(send):
            recv = np.zeros_like(send)
            comm.Allreduce(send, recv)
            return recv
    return Allreduce(reduce, comm)


class TorchDistributedComm:
    """An mpi4py-style communicator over a torch.distributed process group.

    group=None is the default (world) group. The buffer travels as a CPU float64
    tensor, so the group's backend must handle CPU tensors (gloo, mpi).
    torch is imported when the adapter is made, not when fastnorm is.

        dist.init_process_group("gloo", ...)
        bn = fastnorm.SyncBatchNorm(64, comm=fastnorm.comm.TorchDistributedComm())
    """

    def __init__(self, group=None):
        import torch
        import torch.distributed as dist

        if not dist.is_available():
            raise RuntimeError("this torch build has no torch.distributed")
        self._torch = torch
        self._dist = dist
        self.group = group

    def Allreduce(self, sendbuf, recvbuf, op=None):
        """Sum sendbuf over the group into recvbuf (op must be None: only sums)."""
        if op is not None:
            raise ValueError(f"TorchDistributedComm only sums (op=None), got op={op!r}")
        if not self._dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call init_process_group first")
        tensor = self._torch.from_numpy(np.array(sendbuf, dtype=np.float64))  # our own copy
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM, group=self.group)
        recvbuf[...] = tensor.numpy()

    def __repr__(self):
        return f"TorchDistributedComm(group={self.group!r})"


def _is_mpi4py(comm):
    return type(comm).__module__.split(".")[0] == "mpi4py"


def _is_torch_process_group(comm):
    cls = type(comm)
    return cls.__module__.split(".")[0] == "torch" and "ProcessGroup" in cls.__name__


def _describe(value):
    if isinstance(value, np.ndarray):
        return f"an array of dtype {value.dtype} and shape {value.shape}"
    return type(value).__name__
