"""A/B timing of one layer call in two builds of fastnorm, on a noisy machine.

    python tools/ab_builds.py DIR_A DIR_B ROUNDS CALLS THREADS SETUP STATEMENT

DIR_A, DIR_B: checkouts with their extensions built in place (`python setup.py
build_ext --inplace`), e.g. a `git worktree` of the commit to compare against.
Each round runs one fresh process per build, in alternating order, that executes
SETUP once and times STATEMENT over CALLS calls (after 3 warm-up calls) under a
threadpoolctl limit of THREADS; a process reports its median. Printed: the
medians of the rounds, their ratio A/B (> 1: B faster), the ratio of the lower
quartiles (robust to rounds hit by a slow phase) and every round's value.

Each build's fastnorm/ is copied into COPIES fresh directories (names of one
length) and the rounds rotate through the copies. Both precautions come from
A/A runs of byte-identical code on this machine:
  * the size of the environment (PYTHONPATH's length) shifts the stack: one build
    read 8% slower than its own copy in a directory with a longer name
    (channels-last BatchNorm2d + silu eval);
  * where a .so file's pages land in memory matters more: a byte-identical copy
    of a build ran InstanceNorm1d (32,64,1024) backward in 0.56 ms where the
    original file took 0.79 ms, every round. Two builds in one directory each can
    therefore differ by +-40% for no reason in the code; several copies average
    it out, and a verdict that flips between copies is no verdict.
The per-copy medians are printed too. COPIES: environment variable AB_COPIES
(default 3).

Example:
    python tools/ab_builds.py /tmp/base . 10 20 1 \\
        'x = np.random.rand(8, 512, 768).astype(np.float32); m = fastnorm.LayerNorm(768)' 'm(x)'
"""
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

CHILD = r'''
import sys, time
import numpy as np
import fastnorm
from threadpoolctl import threadpool_limits
assert fastnorm.__file__.startswith(sys.argv[1]), fastnorm.__file__
with threadpool_limits(int(sys.argv[3])):
    exec(sys.argv[4])
    call = lambda: (%s)
    for _ in range(3):
        call()
    times = []
    for _ in range(int(sys.argv[2])):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
print(np.median(times) * 1e3)
'''


def main(argv):
    if len(argv) != 7:
        sys.exit(__doc__)
    dir_a, dir_b, rounds, calls, threads, setup, statement = argv
    copies = int(os.environ.get("AB_COPIES", "3"))
    scratch = tempfile.mkdtemp(prefix="fastnorm_ab_")
    paths = {}   # tag -> copy directories, all names of one length
    for tag, directory in (("A", dir_a), ("B", dir_b)):
        paths[tag] = []
        for k in range(copies):
            target = os.path.join(scratch, f"{tag}{k}")
            shutil.copytree(os.path.join(directory, "fastnorm"), os.path.join(target, "fastnorm"),
                            ignore=shutil.ignore_patterns("__pycache__", "*.c"))
            paths[tag].append(target)
    results = {"A": [], "B": []}
    try:
        for r in range(int(rounds)):
            for tag in ("A", "B") if r % 2 == 0 else ("B", "A"):
                path = paths[tag][r % copies]
                env = dict(os.environ, PYTHONPATH=path)
                run = subprocess.run(
                    [sys.executable, "-c", CHILD % statement, path, calls, threads, setup],
                    cwd=scratch, env=env, capture_output=True, text=True)
                if run.returncode:
                    sys.exit(run.stderr)
                results[tag].append(float(run.stdout))
    finally:
        shutil.rmtree(scratch)
    a, b = np.median(results["A"]), np.median(results["B"])
    q_a, q_b = np.percentile(results["A"], 25), np.percentile(results["B"], 25)
    print(f"A {a:.3f} ms  B {b:.3f} ms  A/B {a / b:.3f}  lower quartiles A/B {q_a / q_b:.3f}")
    for tag in ("A", "B"):
        per_copy = [np.median(results[tag][k::copies]) for k in range(copies)]
        print(f"  {tag} per copy {np.round(per_copy, 3).tolist()}  "
              f"rounds {np.round(results[tag], 3).tolist()}")


if __name__ == "__main__":
    main(sys.argv[1:])
