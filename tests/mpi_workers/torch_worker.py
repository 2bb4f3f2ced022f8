"""SyncBatchNorm over torch.distributed (gloo, CPU), one process per rank.

Started twice by tests/test_sync_batchnorm.py with RANK, WORLD_SIZE, MASTER_ADDR
and MASTER_PORT set. Runs sync_cases scenarios through TorchDistributedComm and
through the bare default process group, compares with BatchNorm on the whole
batch, and prints "ok: ..." at the end.
"""
import os
import sys
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from fastnorm.comm import TorchDistributedComm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sync_cases as cases  # noqa: E402


def rank_sum(a):
    tensor = torch.from_numpy(np.array(a, dtype=np.float64))
    dist.all_reduce(tensor)
    return tensor.numpy()


def main():
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    all_cases = cases.standard_cases(world)
    runs = [("uneven_3d_f32", TorchDistributedComm()), ("empty_rank", dist.group.WORLD),
            ("mean_1e4_f32", TorchDistributedComm(dist.group.WORLD))]
    for name, comm in runs:
        c = all_cases[name]
        mine = cases.run_rank(c, rank, comm)
        expected = cases.reference(c)
        grad_sums = [{k: rank_sum(v) for k, v in step["grads"].items()} for step in mine["steps"]]
        cases.compare(c, rank, mine, expected, grad_sums)
        states = [None] * world
        dist.all_gather_object(states, cases.state_bytes(mine))
        assert len(set(states)) == 1, f"{name}: running statistics differ between ranks"
    print(f"ok: rank {rank} of {world}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
