"""A/B timing of one layer call in two builds of fastnorm, on a noisy machine.

    python tools/ab_builds.py DIR_A DIR_B ROUNDS CALLS THREADS SETUP STATEMENT

DIR_A, DIR_B: checkouts with their extensions built in place (`python setup.py
build_ext --inplace`), e.g. a `git worktree` of the commit to compare against.
Each round runs one fresh process per build, in alternating order, that executes
SETUP once and times STATEMENT over CALLS calls (after 3 warm-up calls) under a
threadpoolctl limit of THREADS; a process reports its median. Printed: the
medians of the rounds, their ratio A/B (> 1: B faster), the ratio of the lower
quartiles (robust to rounds hit by a slow phase) and every round's value.

Both builds are imported through symlinks of the same length: the size of the
environment (PYTHONPATH) shifts the stack, and alone made one build 8% slower
than its own copy in another directory (channels-last BatchNorm2d + silu eval).

Example:
    python tools/ab_builds.py /tmp/base . 10 20 1 \\
        'x = np.random.rand(8, 512, 768).astype(np.float32); m = fastnorm.LayerNorm(768)' 'm(x)'
"""
import os
import subprocess
import sys

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
    links = {}
    for tag, directory in (("A", dir_a), ("B", dir_b)):
        link = f"/tmp/fastnorm_ab_{os.getpid()}_{tag}"
        os.symlink(os.path.abspath(directory), link)
        links[tag] = link
    results = {"A": [], "B": []}
    try:
        for r in range(int(rounds)):
            for tag in ("A", "B") if r % 2 == 0 else ("B", "A"):
                env = dict(os.environ, PYTHONPATH=links[tag])
                run = subprocess.run(
                    [sys.executable, "-c", CHILD % statement, links[tag], calls, threads, setup],
                    cwd="/tmp", env=env, capture_output=True, text=True)
                if run.returncode:
                    sys.exit(run.stderr)
                results[tag].append(float(run.stdout))
    finally:
        for link in links.values():
            os.unlink(link)
    a, b = np.median(results["A"]), np.median(results["B"])
    q_a, q_b = np.percentile(results["A"], 25), np.percentile(results["B"], 25)
    print(f"A {a:.3f} ms  B {b:.3f} ms  A/B {a / b:.3f}  lower quartiles A/B {q_a / q_b:.3f}")
    print(f"  A {np.round(results['A'], 3).tolist()}")
    print(f"  B {np.round(results['B'], 3).tolist()}")


if __name__ == "__main__":
    main(sys.argv[1:])
