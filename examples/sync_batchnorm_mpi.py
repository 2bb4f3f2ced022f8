"""Data-parallel training with SyncBatchNorm, in NumPy, over MPI.

    mpiexec -n 4 python -m mpi4py examples/sync_batchnorm_mpi.py

(`pip install fastnorm[mpi]` brings mpi4py and mpich, whose mpiexec sits next to
the Python executable.) A global batch of 60 samples is split unevenly between
the processes; each runs a small MLP

    x -> Linear(8, 16) -> SyncBatchNorm(16) -> ReLU -> Linear(16, 1) -> squared error

on its own part. SyncBatchNorm normalizes with the statistics of the whole
batch (one collective call in forward, one in backward); as DistributedDataParallel
does, the processes then sum their parameter gradients (one more call) and take
the same SGD step. Each process prints its share of the loss; at the end rank 0
trains the same model in one process on the whole batch and shows that losses,
parameters and running statistics agree.
"""
import numpy as np
from mpi4py import MPI

import fastnorm as fn

GLOBAL_BATCH, FEATURES, HIDDEN, STEPS, LR = 60, 8, 16, 5, 0.1


def make_data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((GLOBAL_BATCH, FEATURES)).astype(np.float32) * 3 + 5
    target = np.sin(x.sum(axis=1, keepdims=True) / 4).astype(np.float32)
    return x, target


def init_params():
    rng = np.random.default_rng(1)
    return {
        "w1": (rng.standard_normal((FEATURES, HIDDEN)) / np.sqrt(FEATURES)).astype(np.float32),
        "b1": np.zeros(HIDDEN, np.float32),
        "w2": (rng.standard_normal((HIDDEN, 1)) / np.sqrt(HIDDEN)).astype(np.float32),
        "b2": np.zeros(1, np.float32),
    }


def my_rows(rank, size):
    """Uneven shares: rank r gets a part proportional to r + 1."""
    weights = np.arange(1, size + 1)
    bounds = np.concatenate([[0], np.cumsum(weights)]) * GLOBAL_BATCH // weights.sum()
    return slice(bounds[rank], bounds[rank + 1])


def train_step(params, bn, x, target, sum_over_processes):
    """One SGD step; returns this process's share of the mean squared error."""
    h = x @ params["w1"] + params["b1"]
    z = bn(h)
    a = np.maximum(z, 0)
    pred = a @ params["w2"] + params["b2"]
    err = pred - target
    loss_share = float((err ** 2).sum()) / GLOBAL_BATCH  # shares add up to the mean
    d_pred = 2 * err / GLOBAL_BATCH
    grads = {"w2": a.T @ d_pred, "b2": d_pred.sum(axis=0)}
    d_z = (d_pred @ params["w2"].T) * (z > 0)
    d_h = bn.backward(d_z)  # exact for the global batch
    grads.update(w1=x.T @ d_h, b1=d_h.sum(axis=0), gamma=bn.grads["weight"], beta=bn.grads["bias"])
    grads = sum_over_processes(grads)  # what DistributedDataParallel does
    for name in ("w1", "b1", "w2", "b2"):
        params[name] -= LR * grads[name]
    bn.weight -= LR * grads["gamma"]
    bn.bias -= LR * grads["beta"]
    return loss_share


def summed(comm):
    """Sums a dict of gradient arrays over the processes in one Allreduce."""
    def sum_over_processes(grads):
        names = sorted(grads)
        flat = np.concatenate([grads[n].ravel() for n in names]).astype(np.float64)
        total = np.empty_like(flat)
        comm.Allreduce(flat, total, op=MPI.SUM)
        out, at = {}, 0
        for n in names:
            size = grads[n].size
            out[n] = total[at:at + size].reshape(grads[n].shape).astype(np.float32)
            at += size
        return out
    return sum_over_processes


def main():
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    x, target = make_data()
    rows = my_rows(rank, size)

    params = init_params()
    bn = fn.SyncBatchNorm(HIDDEN, comm=comm)
    losses = []
    for step in range(STEPS):
        share = train_step(params, bn, x[rows], target[rows], summed(comm))
        line = f"step {step} rank {rank}: {rows.stop - rows.start:2d} samples, loss share {share:.6f}"
        lines = comm.gather((share, line))  # printed by rank 0, in rank order
        if rank == 0:
            print("\n".join(text for _, text in lines))
            losses.append(sum(value for value, _ in lines))
    if rank == 0:
        print(f"\nglobal losses ({size} processes): " + " ".join(f"{v:.6f}" for v in losses))
        compare_with_one_process(params, bn, losses)


def compare_with_one_process(params, bn, losses):
    """The same training in one process on the whole batch, with plain BatchNorm."""
    x, target = make_data()
    ref_params = init_params()
    ref_bn = fn.BatchNorm1d(HIDDEN)
    ref_losses = [train_step(ref_params, ref_bn, x, target, lambda g: g) for _ in range(STEPS)]
    print("one process, whole batch:    " + " ".join(f"{v:.6f}" for v in ref_losses))

    def diff(a, b):
        return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
    print(f"max |difference|: losses {diff(losses, ref_losses):.1e}, "
          f"running_mean {diff(bn.running_mean, ref_bn.running_mean):.1e}, "
          f"running_var {diff(bn.running_var, ref_bn.running_var):.1e}, "
          f"BN weight {diff(bn.weight, ref_bn.weight):.1e} (moved {diff(bn.weight, 1):.1e}), "
          f"w1 {diff(params['w1'], ref_params['w1']):.1e}")


if __name__ == "__main__":
    main()
