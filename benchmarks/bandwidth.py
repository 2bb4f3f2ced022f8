"""The physical ceiling: STREAM-like memory bandwidth at a given thread count.

NumPy is single-threaded, so the kernels are torch's (parallel with
torch.set_num_threads(n)) on float32 arrays much larger than the last-level
cache. Bytes counted as STREAM does: read + write, no write-allocate.
  copy:  b = a          2 arrays of traffic
  triad: a = b + s * c  3 arrays of traffic
The ceiling a case is compared with is the copy bandwidth: a normalization
forward is a copy with arithmetic on the way (read x, write y).
"""
import os
import time

MIB = 2 ** 20


def last_level_cache_bytes(default=32 * MIB):
    """Size of the largest CPU cache (Linux sysfs), or `default` when unknown."""
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    units = {"K": 2 ** 10, "M": MIB, "G": 2 ** 30}
    try:
        entries = [entry for entry in os.listdir(base) if entry.startswith("index")]
    except OSError:
        entries = []
    for entry in entries:  # index0, index1, ...; the folder also holds a 'uevent' file
        try:
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
            sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
        except (OSError, ValueError):
            continue
    return max(sizes) if sizes else default


def measure_bandwidth(n_threads, array_mib=256, repeats=5):
    """{'copy': GB/s, 'triad': GB/s, ...}: the best of `repeats` runs of each, at n_threads."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        n = array_mib * MIB // 4
        a = torch.full((n,), 1.0)
        b = torch.full((n,), 2.0)
        c = torch.full((n,), 0.5)
        nbytes = a.element_size() * n
        kernels = {
            "copy": (lambda: b.copy_(a), 2 * nbytes),
            "triad": (lambda: torch.add(b, c, alpha=3.0, out=a), 3 * nbytes),
        }
        best = {name: float("inf") for name in kernels}
        for _ in range(repeats):
            for name, (kernel, _) in kernels.items():
                t0 = time.perf_counter()
                kernel()
                best[name] = min(best[name], time.perf_counter() - t0)
        result = {name: kernels[name][1] / best[name] / 1e9 for name in kernels}
    finally:
        torch.set_num_threads(previous)
    result.update(threads=n_threads, array_mib=array_mib, repeats=repeats)
    return result
