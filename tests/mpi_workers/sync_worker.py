"""SyncBatchNorm over real MPI processes.

Run by tests/test_sync_batchnorm.py as
    mpiexec -n P python -m mpi4py tests/mpi_workers/sync_worker.py [channels]
(with -m mpi4py, a rank that raises aborts the whole job instead of hanging it).
Without argument: every scenario of sync_cases against BatchNorm on the whole
batch, collective counting, and the errors every rank must raise alike; each
rank prints "ok: ..." at the end. With "channels": the ranks disagree on the
channel count, which must end the job (not hang it).
"""
import os
import sys

import numpy as np
from mpi4py import MPI

import fastnorm as fn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sync_cases as cases  # noqa: E402

COMM = MPI.COMM_WORLD
RANK, WORLD = COMM.Get_rank(), COMM.Get_size()


class CountingComm:
    """COMM_WORLD behind a duck-typed Allreduce that counts its calls."""

    def __init__(self):
        self.calls = 0

    def Allreduce(self, sendbuf, recvbuf, op=None):
        self.calls += 1
        COMM.Allreduce(sendbuf, recvbuf, op=MPI.SUM)


def rank_sum(a):
    """Test-side sum over ranks (float64)."""
    a = np.ascontiguousarray(a, np.float64)
    total = np.empty_like(a)
    COMM.Allreduce(a, total, op=MPI.SUM)
    return total


def check_scenarios():
    for name, c in cases.standard_cases(WORLD).items():
        mine = cases.run_rank(c, RANK, COMM)
        expected = cases.reference(c)
        grad_sums = [{k: rank_sum(v) for k, v in step["grads"].items()} for step in mine["steps"]]
        try:
            cases.compare(c, RANK, mine, expected, grad_sums)
        except AssertionError as exc:
            raise AssertionError(f"scenario {name}: {exc}") from None
        states = COMM.allgather(cases.state_bytes(mine))
        assert len(set(states)) == 1, f"scenario {name}: running statistics differ between ranks"


def check_collective_count():
    comm = CountingComm()
    layer = fn.SyncBatchNorm(3, comm=comm)
    x = np.random.default_rng(RANK).standard_normal((RANK % 3, 3, 4)).astype(np.float32)
    layer(x)
    assert comm.calls == 1, comm.calls
    layer.backward(x)
    assert comm.calls == 2, comm.calls
    layer.eval()
    layer(x)
    layer.backward(x)
    assert comm.calls == 2, comm.calls


def expect(exc_type, call, contains=""):
    try:
        call()
    except exc_type as exc:
        assert contains in str(exc), f"{exc_type.__name__} without {contains!r}: {exc}"
        return str(exc)
    raise AssertionError(f"rank {RANK}: expected {exc_type.__name__}")


def check_errors():
    layer = fn.SyncBatchNorm(2, comm=COMM)
    empty = np.empty((0, 2), np.float32)
    # one value per channel in the global batch: the same error everywhere
    msg = expect(ValueError, lambda: layer(np.ones((1, 2), np.float32) if RANK == 0 else empty),
                 "more than 1 value")
    assert len(set(COMM.allgather(msg))) == 1
    assert layer.num_batches_tracked == 0
    # nothing anywhere: empty output, statistics untouched
    assert layer(empty).shape == (0, 2) and layer.num_batches_tracked == 0
    layer.backward(empty)
    # one rank's input rejected: it raises its reason, the others say so
    bad = np.ones((3, 5), np.float32) if RANK == WORLD - 1 else np.ones((3, 2), np.float32)
    if RANK == WORLD - 1:
        expect(ValueError, lambda: layer(bad), "channels")
    else:
        expect(ValueError, lambda: layer(bad), f"1 of {WORLD} processes rejected")
    assert layer.num_batches_tracked == 0 and np.all(layer.running_var == 1)
    if WORLD > 1:
        other = fn.SyncBatchNorm(2, comm=COMM, dtype=np.float64 if RANK == 0 else np.float32)
        expect(TypeError, lambda: other(np.ones((2, 2), other.dtype)), f"1 of {WORLD} are float64")
        x = np.random.default_rng(RANK).standard_normal((3, 2)).astype(np.float32)
        layer(x)
        expect(RuntimeError, lambda: layer(x) if RANK == 0 else layer.backward(x), "out of step")
    # still in step after all that: a real step matches BatchNorm
    mine = cases.run_rank(cases.standard_cases(WORLD)["uneven_2d_f64"], RANK, COMM)
    assert all(np.isfinite(s["y"]).all() for s in mine["steps"])


def disagree_on_channels():
    layer = fn.SyncBatchNorm(3 + RANK, comm=COMM)
    layer(np.ones((2, 3 + RANK), np.float32))


def one_rank_raises():
    """Rank 1 fails between collective calls while rank 0 waits in the next one:
    under `python -m mpi4py` the uncaught exception aborts the whole job."""
    layer = fn.SyncBatchNorm(3, comm=COMM)
    x = np.random.default_rng(RANK).standard_normal((4, 3)).astype(np.float32)
    layer(x)
    if RANK == 1:
        raise RuntimeError("rank 1 fails on purpose")
    layer.backward(x)
    print(f"rank {RANK}: no error", flush=True)


def wrong_communicator_results():
    """A duck-typed communicator that writes nothing or the wrong values: a clear error."""

    class Silent:           # leaves recvbuf as it came (zeros)
        def Allreduce(self, sendbuf, recvbuf, op=None):
            pass

    x = np.ones((4, 3), np.float32)
    expect(RuntimeError, lambda: fn.SyncBatchNorm(3, comm=Silent())(x), "did not sum")
    expect(TypeError, lambda: fn.SyncBatchNorm(3, comm=lambda a: a[:-1])(x), "shape")
    expect(TypeError, lambda: fn.SyncBatchNorm(3, comm=lambda a: a.astype(np.float32))(x),
           "float64")
    print(f"ok: rank {RANK} of {WORLD}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["channels"]:
        disagree_on_channels()
        print(f"rank {RANK}: no error", flush=True)
    elif sys.argv[1:] == ["raise"]:
        one_rank_raises()
    elif sys.argv[1:] == ["wrong-results"]:
        wrong_communicator_results()
    else:
        check_scenarios()
        check_collective_count()
        check_errors()
        print(f"ok: rank {RANK} of {WORLD}", flush=True)
