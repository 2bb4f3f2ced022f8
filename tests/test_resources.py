"""Resource safety: no memory growth over many calls, no file descriptors or threads
left behind, separate layers in concurrent Python threads, a forked child."""
import os
import threading

import numpy as np
import pytest

import fastnorm as fn
from helpers import num_threads
from test_threads import run_python


def every_layer(dtype=np.float32):
    """(layer, input) for each layer class, small inputs in mixed layouts."""
    rng = np.random.default_rng(0)

    def data(*shape):
        return rng.standard_normal(shape).astype(dtype)

    nhwc = np.moveaxis(data(4, 5, 6, 8), -1, 1)   # channels-last memory
    return [
        (fn.BatchNorm1d(8, dtype=dtype), data(16, 8)),
        (fn.BatchNorm2d(8, dtype=dtype), nhwc),
        (fn.BatchNorm3d(3, dtype=dtype), data(2, 3, 4, 5, 6)),
        (fn.SyncBatchNorm(8, comm=lambda a: a.copy(), dtype=dtype), data(4, 8, 9)),
        (fn.LayerNorm((5, 6), dtype=dtype), data(7, 5, 6)),
        (fn.RMSNorm(33, dtype=dtype), data(9, 33)),
        (fn.GroupNorm(2, 8, dtype=dtype), nhwc),
        (fn.InstanceNorm1d(3, affine=True, track_running_stats=True, dtype=dtype),
         data(4, 3, 10)),
        (fn.InstanceNorm2d(8, dtype=dtype), nhwc),
        (fn.InstanceNorm3d(3, dtype=dtype), data(3, 4, 5, 6)),
        (fn.LocalResponseNorm(3), data(4, 8, 5)),
    ]


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def native_threads():
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="AddressSanitizer's quarantine holds freed memory (tools/sanitize.sh)")
def test_no_memory_growth_over_thousands_of_calls():
    cases = every_layer() + [(layer.train(False), x) for layer, x in every_layer(np.float64)]

    def run(rounds):
        for _ in range(rounds):
            for layer, x in cases:
                layer(x)
                layer.backward(x)

    run(200)                      # warm up caches, allocator pools and OpenMP teams
    before = rss_bytes()
    run(1000)                     # 1000 forward+backward calls of each of 22 layers
    growth = rss_bytes() - before
    # a leak of one input-sized array (~4 KiB) per call would be over 80 MiB
    assert growth < 16 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB"


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="needs Linux /proc")
def test_no_file_descriptors_or_threads_left_behind():
    for layer, x in every_layer():      # the OpenMP team exists from here on
        layer(x)
        layer.backward(x)
    fds, py_threads, tasks = os.listdir("/proc/self/fd"), threading.active_count(), native_threads()
    with num_threads(2):
        for _ in range(50):
            for layer, x in every_layer():
                layer(x)
                layer.backward(x)
    assert len(os.listdir("/proc/self/fd")) == len(fds)
    assert threading.active_count() == py_threads
    assert native_threads() <= tasks + 1   # OpenMP keeps its one team, it does not grow


def test_separate_layers_in_concurrent_python_threads_match_serial_results():
    cases = every_layer()
    expected = []
    for layer, x in cases:
        expected.append((layer(x), layer.backward(x)))
    results = {}
    errors = []

    def work(worker):
        try:
            for i, (_, x) in enumerate(every_layer()):   # this thread's own layer objects
                layer = every_layer()[i][0]
                for _ in range(3):
                    y = layer(x)
                    results[worker, i] = (y, layer.backward(x))
        except Exception as exc:   # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (worker, i), (y, dx) in results.items():
        assert np.array_equal(y, expected[i][0]), (worker, type(cases[i][0]).__name__)
        assert np.array_equal(dx, expected[i][1]), (worker, type(cases[i][0]).__name__)
    assert len(results) == 4 * len(cases)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_runs_every_layer():
    out = run_python(
        """
        import os, sys
        sys.path.insert(0, "tests")
        from test_resources import every_layer
        def run_all():
            return [(layer(x), layer.backward(x)) for layer, x in every_layer()]
        parents = run_all()
        pid = os.fork()
        if pid == 0:
            ok = all((y == py).all() and (dx == pdx).all()
                     for (y, dx), (py, pdx) in zip(run_all(), parents))
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
        """,
        env={"OMP_NUM_THREADS": "2"},
        timeout=120,
    )
    assert out.strip() == "0"
