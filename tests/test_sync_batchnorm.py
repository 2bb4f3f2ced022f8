"""SyncBatchNorm: statistics over the union of every process's batch.

* in one process: comm=None is exactly BatchNorm; P "processes" simulated as P
  threads sharing a barrier-based allreduce (duck-typed Allreduce objects and
  plain callables); collective counting; errors raised alike on every rank;
  the converter; the communicator adapters;
* for real (marked mpi): `mpiexec -n P python -m mpi4py tests/mpi_workers/sync_worker.py`
  for P = 1..4, and torch.distributed (gloo) with two processes on 127.0.0.1.
Each scenario compares the output, running statistics, input gradient and
rank-sum of weight/bias gradients with BatchNorm on the concatenated batch.
"""
import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections import namedtuple

import numpy as np
import pytest

import fastnorm as fn
from fastnorm import functional as F
from fastnorm.comm import Allreduce, TorchDistributedComm, as_allreduce

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKERS = os.path.join(HERE, "mpi_workers")
sys.path.insert(0, WORKERS)
import sync_cases as cases  # noqa: E402


# ------------------------------------------------------- a world of threads

class ThreadWorld:
    """P ranks as threads of this process. allreduce waits for every rank's
    buffer and returns their sum, added in rank order (the same bits on every
    rank), and counts the calls per rank. A rank that never arrives breaks the
    barrier after `timeout` seconds instead of hanging the test."""

    def __init__(self, size, timeout=20.0):
        self.size = size
        self.calls = [0] * size
        self._slots = [None] * size
        self._barrier = threading.Barrier(size, timeout=timeout)

    def allreduce(self, rank, buffer):
        self._slots[rank] = np.array(buffer, dtype=np.float64)
        self.calls[rank] += 1
        self._barrier.wait()
        total = self._slots[0].copy()
        for other in self._slots[1:]:
            total += other
        self._barrier.wait()  # nobody refills a slot before everyone has summed
        return total

    def comm(self, rank, kind="duck"):
        if kind == "callable":
            return functools.partial(self.allreduce, rank)
        return DuckComm(self, rank)

    def run(self, target):
        """target(rank) in one thread per rank; returns each rank's result or exception."""
        results = [None] * self.size

        def body(rank):
            try:
                results[rank] = target(rank)
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                results[rank] = exc

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results


class DuckComm:
    """An object with an mpi4py-style Allreduce, nothing else."""

    def __init__(self, world, rank):
        self.world, self.rank = world, rank

    def Allreduce(self, sendbuf, recvbuf, op=None):
        assert op is None
        recvbuf[...] = self.world.allreduce(self.rank, sendbuf)


class CountingComm:
    """A one-process communicator that counts its calls."""

    def __init__(self):
        self.calls = 0

    def Allreduce(self, sendbuf, recvbuf, op=None):
        self.calls += 1
        recvbuf[...] = sendbuf


def raise_first_error(results):
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def run_case_in_threads(c, kind="duck"):
    world = ThreadWorld(len(c["sizes"]))
    results = raise_first_error(world.run(lambda r: cases.run_rank(c, r, world.comm(r, kind))))
    expected = cases.reference(c)
    grad_sums = [
        {name: sum(res["steps"][s]["grads"][name].astype(np.float64) for res in results)
         for name in expected["steps"][s]["grads"]}
        for s in range(c["steps"])
    ]
    for rank, res in enumerate(results):
        cases.compare(c, rank, res, expected, grad_sums)
    assert len({cases.state_bytes(res) for res in results}) == 1, "running stats differ between ranks"
    return world


# ----------------------------------------------------------- in-process tests

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_without_comm_is_exactly_batchnorm(dtype, layout):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, 5, 6)).astype(dtype)
    if layout == "channels_last":
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    elif layout == "strided":
        x = x[:, :, :, ::2]
    dy = rng.standard_normal(x.shape).astype(dtype)
    sync, bn = fn.SyncBatchNorm(3, dtype=dtype), fn.BatchNorm2d(3, dtype=dtype)
    for _ in range(2):
        assert np.array_equal(sync(x), bn(x))
        assert np.array_equal(sync.backward(dy), bn.backward(dy))
        for name in ("weight", "bias"):
            assert np.array_equal(sync.grads[name], bn.grads[name])
    for name, value in bn.state_dict().items():
        assert np.array_equal(sync.state_dict()[name], value)
    sync.eval(), bn.eval()
    assert np.array_equal(sync(x), bn(x))
    assert np.array_equal(sync.backward(dy), bn.backward(dy))


@pytest.mark.parametrize("name", sorted(cases.standard_cases(3)))
def test_three_ranks_in_threads_match_batchnorm_on_whole_batch(name):
    run_case_in_threads(cases.standard_cases(3)[name])


@pytest.mark.parametrize("world", [1, 2, 4])
def test_other_world_sizes_with_callable_comm(world):
    for name in ("uneven_3d_f32", "empty_rank", "channels_last_some"):
        run_case_in_threads(cases.standard_cases(world)[name], kind="callable")


def test_one_rank_through_a_comm_matches_batchnorm_closely():
    c = cases.case([6], (3, 4), np.float32)
    run_case_in_threads(c)


def test_collective_calls_one_forward_one_backward_none_in_eval():
    comm = CountingComm()
    layer = fn.SyncBatchNorm(3, comm=comm)
    x = np.random.default_rng(0).standard_normal((4, 3, 2)).astype(np.float32)
    layer(x)
    assert comm.calls == 1
    layer.backward(x)
    assert comm.calls == 2
    layer(np.empty((0, 3, 2), np.float32))  # an empty batch still joins
    assert comm.calls == 3
    layer.backward(np.empty((0, 3, 2), np.float32))
    assert comm.calls == 4
    layer.eval()
    layer(x)
    layer.backward(x)
    assert comm.calls == 4
    plain = fn.SyncBatchNorm(3, track_running_stats=False, comm=comm).eval()
    plain(x)  # eval without running stats: this process's own batch statistics
    plain.backward(x)
    assert comm.calls == 4


def test_threads_are_counted_per_rank():
    world = run_case_in_threads(cases.standard_cases(2)["uneven_2d_f64"])
    steps = cases.standard_cases(2)["uneven_2d_f64"]["steps"]
    assert world.calls == [2 * steps, 2 * steps]


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_results_do_not_depend_on_thread_count(n_threads):
    x = np.random.default_rng(3).standard_normal((5, 3, 40, 7)).astype(np.float32) + 100
    dy = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)

    def run():
        layer = fn.SyncBatchNorm(3, comm=lambda b: b.copy())
        y = layer(x)
        return y, layer.backward(dy), layer.running_var.copy()

    before = fn.get_num_threads()
    reference = run()
    fn.set_num_threads(n_threads)
    try:
        got = run()
    finally:
        fn.set_num_threads(before)
    for a, b in zip(got, reference):
        assert np.array_equal(a, b)


def test_mean_1e4_first_step_shift_zero_is_accurate():
    """The first training step centers on 0 (no previous mean): var keeps ~8 digits."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((64, 4)) + 1e4).astype(np.float32)
    layer = fn.SyncBatchNorm(4, comm=lambda b: b.copy())
    y = layer(x)
    expected = cases.ref.batch_norm_forward(x, None, None, 1e-5)
    np.testing.assert_allclose(y, expected.y, atol=1e-5, rtol=0)
    unbiased = expected.var * 64 / 63
    np.testing.assert_allclose(layer.running_var, 0.9 + 0.1 * unbiased, rtol=1e-6)


def test_nan_poisons_its_channel_for_one_step_only():
    world = ThreadWorld(2)
    x = np.random.default_rng(6).standard_normal((6, 3)).astype(np.float64)

    def body(rank):
        layer = fn.SyncBatchNorm(3, comm=world.comm(rank), dtype=np.float64, track_running_stats=False)
        local = x[3 * rank:3 * rank + 3].copy()
        if rank == 1:
            local[0, 1] = np.nan
        first = layer(local)
        second = layer(x[3 * rank:3 * rank + 3])
        return first, second

    results = raise_first_error(world.run(body))
    expected = fn.BatchNorm1d(3, dtype=np.float64, track_running_stats=False)(x)
    for rank, (first, second) in enumerate(results):
        assert np.isnan(first[:, 1]).all() and np.isfinite(first[:, [0, 2]]).all()
        np.testing.assert_allclose(second, expected[3 * rank:3 * rank + 3], atol=1e-12)


def test_out_argument_in_the_synchronized_path():
    world = ThreadWorld(2)
    x = np.random.default_rng(14).standard_normal((6, 3, 4)).astype(np.float32)
    parts = [x[:2], x[2:]]
    layers = [fn.SyncBatchNorm(3, comm=world.comm(r)) for r in range(2)]
    outs = [np.empty_like(p) for p in parts]
    results = raise_first_error(world.run(lambda r: layers[r](parts[r], out=outs[r])))
    expected = fn.BatchNorm1d(3)(x)
    for r in range(2):
        assert results[r] is outs[r]
        np.testing.assert_allclose(outs[r], expected[:2] if r == 0 else expected[2:], atol=2e-6)
    # a bad out= on one rank is rejected there and everywhere, nothing changes
    before = [snapshot(layer) for layer in layers]
    bad = [np.empty_like(parts[0]), np.empty(3, np.float32)]
    results = world.run(lambda r: layers[r](parts[r], out=bad[r]))
    assert isinstance(results[1], ValueError) and "out" in str(results[1])
    assert isinstance(results[0], ValueError) and "rejected" in str(results[0])
    for layer, state in zip(layers, before):
        assert_unchanged(layer, state)


# ---------------------------------------------- global decisions and errors

def test_global_count_one_raises_the_same_error_on_every_rank():
    world = ThreadWorld(3)
    layers = [fn.SyncBatchNorm(2, comm=world.comm(r)) for r in range(3)]
    batches = [np.ones((1, 2), np.float32), np.empty((0, 2), np.float32), np.empty((0, 2), np.float32)]
    results = world.run(lambda r: layers[r](batches[r]))
    messages = {str(r) for r in results}
    assert all(isinstance(r, ValueError) for r in results) and len(messages) == 1
    assert "more than 1 value per channel" in messages.pop()
    for layer in layers:
        assert layer.num_batches_tracked == 0 and np.all(layer.running_mean == 0)
        assert np.all(layer.running_var == 1)


def test_global_count_zero_returns_empty_and_leaves_stats():
    world = ThreadWorld(2)
    layers = [fn.SyncBatchNorm(2, comm=world.comm(r)) for r in range(2)]
    results = raise_first_error(world.run(lambda r: layers[r](np.empty((0, 2, 3), np.float32))))
    for y, layer in zip(results, layers):
        assert y.shape == (0, 2, 3) and y.dtype == np.float32
        assert layer.num_batches_tracked == 0 and np.all(layer.running_var == 1)
    grads = raise_first_error(world.run(lambda r: layers[r].backward(np.empty((0, 2, 3), np.float32))))
    assert all(g.shape == (0, 2, 3) for g in grads)


def snapshot(layer):
    return {k: v.copy() for k, v in layer.state_dict().items()}


def assert_unchanged(layer, before):
    for name, value in before.items():
        assert np.array_equal(layer.state_dict()[name], value), name


def test_rejected_input_on_one_rank_raises_on_every_rank_then_all_continue():
    world = ThreadWorld(3)
    layers = [fn.SyncBatchNorm(2, comm=world.comm(r)) for r in range(3)]
    good = np.random.default_rng(7).standard_normal((4, 2)).astype(np.float32)
    before = [snapshot(layer) for layer in layers]
    bad_inputs = {2: good[:, :1].copy()}  # rank 2: wrong channel count
    results = world.run(lambda r: layers[r](bad_inputs.get(r, good)))
    assert isinstance(results[2], ValueError) and "channels" in str(results[2])
    for r in (0, 1):
        assert isinstance(results[r], ValueError) and "1 of 3 processes rejected" in str(results[r])
    for layer, state in zip(layers, before):
        assert_unchanged(layer, state)
    # still in step: a good call works everywhere
    raise_first_error(world.run(lambda r: layers[r](good)))
    # backward with a bad gradient on rank 0 (wrong dtype)
    results = world.run(lambda r: layers[r].backward(good.astype(np.float64) if r == 0 else good))
    assert isinstance(results[0], TypeError)
    assert all(isinstance(results[r], ValueError) for r in (1, 2))


def test_non_array_input_on_one_rank_still_joins():
    world = ThreadWorld(2)
    layers = [fn.SyncBatchNorm(2, comm=world.comm(r)) for r in range(2)]
    good = np.ones((3, 2), np.float32)
    results = world.run(lambda r: layers[r]([[1.0, 2.0]] if r else good))
    assert isinstance(results[1], TypeError) and isinstance(results[0], ValueError)


def test_dtype_disagreement_raises_type_error_on_every_rank():
    world = ThreadWorld(3)
    dtypes = [np.float64, np.float32, np.float32]
    layers = [fn.SyncBatchNorm(2, comm=world.comm(r), dtype=dtypes[r]) for r in range(3)]
    results = world.run(lambda r: layers[r](np.ones((3, 2), dtypes[r])))
    assert all(isinstance(r, TypeError) for r in results)
    assert "1 of 3 are float64" in str(results[0])
    assert all(layer.num_batches_tracked == 0 for layer in layers)


def test_settings_disagreement_raises_on_every_rank():
    world = ThreadWorld(2)
    layers = [fn.SyncBatchNorm(2, eps=1e-5 * (r + 1), comm=world.comm(r)) for r in range(2)]
    results = world.run(lambda r: layers[r](np.ones((3, 2), np.float32)))
    assert all(isinstance(r, ValueError) and "disagree" in str(r) for r in results)


def test_forward_against_backward_is_out_of_step_on_every_rank():
    world = ThreadWorld(2)
    layers = [fn.SyncBatchNorm(2, comm=world.comm(r)) for r in range(2)]
    x = np.random.default_rng(8).standard_normal((3, 2)).astype(np.float32)
    raise_first_error(world.run(lambda r: layers[r](x)))
    results = world.run(lambda r: layers[r](x) if r == 0 else layers[r].backward(x))
    assert all(isinstance(r, RuntimeError) and "out of step" in str(r) for r in results)


def test_validation_errors_match_batchnorm_without_comm():
    layer = fn.SyncBatchNorm(3)
    with pytest.raises(ValueError, match="more than 1 value"):
        layer(np.ones((1, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        layer(np.ones(3, np.float32))
    with pytest.raises(TypeError, match="float64"):
        layer(np.ones((2, 3)))
    with pytest.raises(RuntimeError):
        fn.SyncBatchNorm(3, comm=CountingComm()).backward(np.ones((2, 3), np.float32))


# -------------------------------------------------------------- functional

def test_functional_without_comm_is_batch_norm():
    x = np.random.default_rng(9).standard_normal((5, 3, 4))
    rm, rv = np.zeros(3), np.ones(3)
    rm2, rv2 = np.zeros(3), np.ones(3)
    y = F.sync_batch_norm(x, rm, rv, training=True)
    assert np.array_equal(y, F.batch_norm(x, rm2, rv2, training=True))
    assert np.array_equal(rm, rm2) and np.array_equal(rv, rv2)


def test_functional_forward_and_backward_across_threads():
    world = ThreadWorld(2)
    x = np.random.default_rng(10).standard_normal((7, 3, 2)) * 3 + 50
    dy = np.random.default_rng(11).standard_normal(x.shape)
    w = np.array([0.5, 2.0, -1.0])
    parts = [slice(0, 3), slice(3, 7)]

    def body(r):
        rm, rv = np.zeros(3), np.ones(3)
        y, mean, invstd, count = F.native_sync_batch_norm(
            x[parts[r]], w, None, rm, rv, True, 0.1, 1e-5, world.comm(r, "callable"))
        grads = F.sync_batch_norm_backward(dy[parts[r]], x[parts[r]], mean, invstd, count, w,
                                           world.comm(r))
        return y, rm, grads

    results = raise_first_error(world.run(body))
    rm, rv = np.zeros(3), np.ones(3)
    y, mean, invstd = F.native_batch_norm(x, w, None, rm, rv, True, 0.1, 1e-5)
    gx, gw, gb = F.batch_norm_backward(dy, x, mean, invstd, w)
    for r, (y_r, rm_r, (gx_r, _, _)) in enumerate(results):
        np.testing.assert_allclose(y_r, y[parts[r]], atol=1e-12)
        np.testing.assert_allclose(gx_r, gx[parts[r]], atol=1e-12)
        np.testing.assert_allclose(rm_r, rm, rtol=1e-14)
    np.testing.assert_allclose(sum(res[2][1] for res in results), gw, rtol=1e-12)
    np.testing.assert_allclose(sum(res[2][2] for res in results), gb, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- converter

def test_convert_a_batchnorm_shares_its_arrays():
    bn = fn.BatchNorm2d(4, eps=1e-3, momentum=None, dtype=np.float64)
    bn(np.random.default_rng(12).standard_normal((3, 4, 2, 2)))
    bn.eval()
    comm = CountingComm()
    sync = fn.SyncBatchNorm.convert_sync_batchnorm(bn, comm)
    assert type(sync) is fn.SyncBatchNorm and sync.comm is comm
    assert (sync.num_features, sync.eps, sync.momentum, sync.dtype) == (4, 1e-3, None, np.float64)
    assert not sync.training
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert getattr(sync, name) is getattr(bn, name)


class Block:
    def __init__(self, channels):
        self.norm = fn.BatchNorm1d(channels)
        self.scale = 2.0

    def __call__(self, x):  # a callable user object is walked too
        return self.norm(x) * self.scale


def test_convert_a_model_object_recursively():
    shared = fn.BatchNorm1d(2)
    Pair = namedtuple("Pair", "a b")
    model = Block(3)
    model.layers = [fn.BatchNorm3d(2), {"inner": Block(5), "same": shared}, (shared, 7)]
    model.pair = Pair(fn.BatchNorm2d(2), "text")
    model.others = {"ln_like": fn.NormLayer(), "array": np.ones(2)}
    model.self_ref = model
    out = fn.SyncBatchNorm.convert_sync_batchnorm(model, comm=CountingComm())
    assert out is model
    assert isinstance(model.norm, fn.SyncBatchNorm)
    assert isinstance(model.layers[0], fn.SyncBatchNorm)
    assert isinstance(model.layers[1]["inner"].norm, fn.SyncBatchNorm)
    assert model.layers[1]["same"] is model.layers[2][0]  # one layer, converted once
    assert isinstance(model.layers[2], tuple) and model.layers[2][1] == 7
    assert isinstance(model.pair, Pair) and isinstance(model.pair.a, fn.SyncBatchNorm)
    assert type(model.others["ln_like"]) is fn.NormLayer
    assert model(np.ones((2, 3), np.float32)).shape == (2, 3)


# ------------------------------------------------------------- communicators

def test_as_allreduce_accepts_and_rejects():
    buffer = np.arange(4.0)
    assert np.array_equal(as_allreduce(None)(buffer), buffer)
    wrapped = as_allreduce(lambda b: 2 * b)
    assert np.array_equal(wrapped(buffer), 2 * buffer)
    assert as_allreduce(wrapped) is wrapped and isinstance(wrapped, Allreduce)
    with pytest.raises(TypeError, match="comm must be"):
        as_allreduce(42)
    with pytest.raises(TypeError, match="comm must be"):
        fn.SyncBatchNorm(3, comm="world")
    with pytest.raises(TypeError, match="float64 array of shape"):
        as_allreduce(lambda b: b[:2])(buffer)
    with pytest.raises(TypeError, match="float64"):
        as_allreduce(lambda b: b.astype(np.float32))(buffer)


def test_mpi4py_comm_is_used_through_its_buffer_api():
    MPI = pytest.importorskip("mpi4py.MPI")
    reduce = as_allreduce(MPI.COMM_SELF)
    assert np.array_equal(reduce(np.arange(3.0)), np.arange(3.0))
    with pytest.raises(ValueError, match="COMM_NULL"):
        as_allreduce(MPI.COMM_NULL)
    layer = fn.SyncBatchNorm(2, comm=MPI.COMM_SELF)
    x = np.random.default_rng(13).standard_normal((4, 2)).astype(np.float32)
    np.testing.assert_allclose(layer(x), fn.BatchNorm1d(2)(x), atol=1e-6)


def test_torch_adapter_only_sums():
    pytest.importorskip("torch")
    with pytest.raises(ValueError, match="only sums"):
        TorchDistributedComm().Allreduce(np.zeros(2), np.zeros(2), op="max")


# ------------------------------------------------------------ real processes

MPIEXEC = shutil.which("mpiexec") or shutil.which("mpiexec", path=os.path.dirname(sys.executable))
TIMEOUT = 120


def worker_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def mpirun(ranks, *args):
    pytest.importorskip("mpi4py")
    if MPIEXEC is None:
        pytest.skip("mpiexec not found")
    cmd = [MPIEXEC, "-n", str(ranks), sys.executable, "-m", "mpi4py",
           os.path.join(WORKERS, "sync_worker.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=worker_env(),
                          cwd=ROOT)


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_mpi_ranks_match_batchnorm_on_whole_batch(ranks):
    proc = mpirun(ranks)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok:") == ranks, proc.stdout


@pytest.mark.mpi
def test_mpi_channel_disagreement_fails_instead_of_hanging():
    proc = mpirun(2, "channels")
    assert proc.returncode != 0, proc.stdout + proc.stderr


@pytest.mark.mpi
def test_mpi_rank_that_raises_aborts_the_job_instead_of_hanging():
    proc = mpirun(2, "raise")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "rank 1 fails on purpose" in proc.stderr
    assert "rank 0: no error" not in proc.stdout


@pytest.mark.mpi
def test_mpi_communicator_returning_wrong_results_is_a_clear_error():
    proc = mpirun(2, "wrong-results")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok:") == 2, proc.stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.mpi
def test_torch_distributed_gloo_two_processes():
    pytest.importorskip("torch")
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(worker_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank),
                   WORLD_SIZE="2")
        procs.append(subprocess.Popen([sys.executable, os.path.join(WORKERS, "torch_worker.py")],
                                      env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out
        assert "ok:" in out, out


@pytest.mark.mpi
def test_example_agrees_with_one_process():
    pytest.importorskip("mpi4py")
    if MPIEXEC is None:
        pytest.skip("mpiexec not found")
    cmd = [MPIEXEC, "-n", "3", sys.executable, "-m", "mpi4py",
           os.path.join(ROOT, "examples", "sync_batchnorm_mpi.py")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=worker_env(),
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("max |difference|"), proc.stdout
    found = dict(re.findall(r"(losses|running_mean|running_var|w1) ([0-9.]+e[+-][0-9]+)", summary))
    assert len(found) == 4 and max(float(v) for v in found.values()) < 1e-5, summary
