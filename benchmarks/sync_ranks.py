"""SyncBatchNorm over MPI: time per training step at 1, 2 and 4 ranks, against local
BatchNorm on the same per-rank batch, and the two allreduce latencies a step needs.

    python benchmarks/sync_ranks.py                 # 1, 2, 4 ranks; (16, 64, 28, 28) per rank
    python benchmarks/sync_ranks.py --ranks 1,2 --shape 8,32,14,14 --steps 50

Each rank runs forward+backward in training mode (one allreduce in each) on its own
fixed batch, one thread per rank (ranks may outnumber cores: then they share them, and
the numbers say so). Reported per rank count, medians over the steps of the slowest
rank: the SyncBatchNorm step, the local BatchNorm step, the allreduce of a buffer of
the same size alone (x2: one per pass), and the overhead left over,
sync - local - 2 * allreduce. Needs mpi4py and an MPI (`pip install mpi4py mpich`).
"""
import argparse
import os
import shutil
import subprocess
import sys
import time


def worker(shape, steps):
    """One rank's measurements (run under mpiexec); rank 0 prints one result line."""
    import numpy as np
    from mpi4py import MPI

    import fastnorm

    comm = MPI.COMM_WORLD
    fastnorm.set_num_threads(1)
    rng = np.random.default_rng(comm.rank)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    channels = shape[1]
    sync = fastnorm.SyncBatchNorm(channels, comm=comm)
    local = fastnorm.BatchNorm2d(channels)
    # the buffers SyncBatchNorm reduces: count + 2 sums per channel (forward),
    # 2 sums per channel (backward), float64
    send, recv = np.ones(3 * channels + 4), np.empty(3 * channels + 4)

    def step(layer):
        layer(x)
        layer.backward(dy)

    def allreduce():
        comm.Allreduce(send, recv)

    timings = {}
    for name, fn in (("sync", lambda: step(sync)), ("local", lambda: step(local)),
                     ("allreduce", allreduce)):
        times = []
        for i in range(steps + 5):
            comm.Barrier()
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if i >= 5:   # warm-up
                times.append(elapsed)
        # the step takes as long as its slowest rank
        timings[name] = comm.allreduce(float(np.median(times)), op=MPI.MAX)
    if comm.rank == 0:
        print("RESULT", comm.size, timings["sync"], timings["local"], timings["allreduce"],
              flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--shape", default="16,64,28,28", help="per-rank batch (N,C,H,W)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    if args.worker:
        worker(shape, args.steps)
        return
    mpiexec = shutil.which("mpiexec") or shutil.which(
        "mpiexec", path=os.path.dirname(sys.executable))
    if mpiexec is None:
        sys.exit("mpiexec not found: pip install mpi4py mpich")
    print(f"SyncBatchNorm training step (forward+backward), per-rank batch {shape} float32, "
          f"1 thread per rank, {os.cpu_count()} CPUs, medians of {args.steps} steps")
    print(f"{'ranks':>5}  {'sync step':>10}  {'local BN':>10}  {'2 x allreduce':>13}  "
          f"{'overhead':>10}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for ranks in (int(r) for r in args.ranks.split(",")):
        command = [mpiexec, "-n", str(ranks), sys.executable, "-m", "mpi4py",
                   os.path.abspath(__file__), "--worker", "--shape", args.shape,
                   "--steps", str(args.steps)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
        if done.returncode != 0 or not lines:
            sys.exit(f"{ranks} ranks failed:\n{done.stdout}\n{done.stderr}")
        _, _, sync, local, allreduce = lines[0].split()
        sync, local, allreduce = float(sync), float(local), float(allreduce)
        overhead = sync - local - 2 * allreduce
        print(f"{ranks:>5}  {sync * 1e3:>7.3f} ms  {local * 1e3:>7.3f} ms  "
              f"{2 * allreduce * 1e3:>10.3f} ms  {overhead * 1e3:>7.3f} ms", flush=True)


if __name__ == "__main__":
    main()
