"""Output arrays (y, h, grad_input): `empty`, with large ones taken from a small pool.

Why a pool: glibc serves every allocation of 32 MiB and more (its largest mmap
threshold) with freshly mapped pages, and the kernel zero-fills each page when it is
first written. For a 37 MB LocalResponseNorm output that was 2.5 ms of an 8.7 ms
forward at 1 thread, paid again on every call. Smaller arrays come from malloc's heap,
but whether that memory is still mapped depends on what else the program allocates:
glibc raises its mmap threshold to the size of the last mapped block freed and trims
the heap's top beyond twice that. A BatchNorm1d (64,128,512) train call (a 16 MiB
output) between NumPy operations on the same data paid ~500 page faults each, 4.0 ms
instead of 2.1 ms, and LayerNorm (8192,512) 3.8 ms instead of 1.6 ms; in the benchmark
runner the same happened behind its NumPy peer. So every output of POOL_MIN_BYTES and
more is pooled. The pool keeps such blocks mapped and hands one out again once
every array made from it is gone: numpy collapses a view's base to the array owning
the memory, so a block is free exactly when the pool holds the only reference to it.

The pool never holds more than POOL_MAX_BYTES, in use or free (512 MiB, or
FASTNORM_OUTPUT_POOL_MB from the environment at import; 0 turns the pool off); above
that, an array is allocated on its own; below ALIGNED_MIN_BYTES, `empty` is plain
np.empty. `release()` drops the free blocks.

Arrays of ALIGNED_MIN_BYTES and more, pooled or not, start PAGE_OFFSET bytes into a
4 KiB page: outputs that large may be written with non-temporal stores, which need whole
64-byte lines (a LayerNorm (4,16,1024,64) backward streamed into a dx 16 bytes off a line
ran 3.9-4.5 ms, on a line 2.3-2.9 ms, plainly 2.9-3.3 ms). numpy's large arrays start 16
bytes into one, and an output a few lines ahead of its input modulo 4 KiB makes the
CPU take loads of x for reloads of just-stored y (4K aliasing): LocalResponseNorm
(32,96,55,55) into an output 48-64 bytes ahead ran 6.1-6.3 ms, 0 or 2 KiB apart
5.3-5.4 ms (1 thread). Half a page apart from numpy's arrays, and 0 apart from each
other, is the good case for both.
"""
import math
import os
import sys
import threading

import numpy as np

ALIGNED_MIN_BYTES = 8 << 20  # below the smallest streamed output (STREAM_DX_BYTES, _common.pxd)
# Outputs of 2-8 MiB took no page faults in the same tests (NumPy's temporaries of
# their size keep that heap memory mapped), and a pool lookup costs ~3 us, np.empty 0.7
POOL_MIN_BYTES = ALIGNED_MIN_BYTES


def _limit_from_env(default_mb=512):
    """POOL_MAX_BYTES from FASTNORM_OUTPUT_POOL_MB (whole MiB >= 0), else the default."""
    value = os.environ.get("FASTNORM_OUTPUT_POOL_MB", "").strip()
    if not value:
        return default_mb << 20
    if not value.isdigit():
        raise ValueError(f"FASTNORM_OUTPUT_POOL_MB must be a whole number of MiB >= 0, "
                         f"got {value!r}")
    return int(value) << 20


POOL_MAX_BYTES = _limit_from_env()
PAGE_OFFSET = 2048
_PAGE = 4096

_blocks = []                # raw uint8 blocks, least recently handed out first
_lock = threading.Lock()    # two threads must never be handed the same free block


def _new_lock_after_fork():
    """A child forked while another thread held the lock would wait on it forever."""
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_after_fork)


def empty(shape, dtype):
    """An uninitialized C-contiguous array, like np.empty(shape, dtype)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    block = None
    if nbytes >= POOL_MIN_BYTES:
        with _lock:
            block = _take(nbytes)
    if block is None:
        if nbytes < ALIGNED_MIN_BYTES:
            return np.empty(shape, dtype)
        block = np.empty(nbytes + _PAGE, np.uint8)
    start = (PAGE_OFFSET - block.ctypes.data) % _PAGE
    return block[start:start + nbytes].view(dtype).reshape(shape)


def release():
    """Drop the pool's free blocks (their memory goes back to the system)."""
    with _lock:
        for i in reversed(range(len(_blocks))):
            if _is_free(i):
                del _blocks[i]


def pooled_bytes():
    """Bytes the pool holds, free or in use."""
    with _lock:
        return sum(block.nbytes for block in _blocks)


def _is_free(i):
    """No array uses block i: its only references are the pool's list and
    getrefcount's argument (blocks are only ever named through _blocks[i] here,
    so that no loop variable or temporary list adds one)."""
    return sys.getrefcount(_blocks[i]) <= 2


def _take(nbytes):
    """A free block for nbytes (at most twice that: a much larger one would sit
    idle under a small array), moved to the end of the list; else a new one if the
    pool can hold it, after dropping the least recently used free blocks; else None."""
    need = nbytes + _PAGE
    fits = [i for i in range(len(_blocks))
            if need <= _blocks[i].nbytes <= 2 * need and _is_free(i)]
    if fits:
        best = min(fits, key=lambda i: _blocks[i].nbytes)
        _blocks.append(_blocks.pop(best))
        return _blocks[-1]
    held = sum(block.nbytes for block in _blocks)
    i = 0
    while held + need > POOL_MAX_BYTES and i < len(_blocks):
        if _is_free(i):
            held -= _blocks[i].nbytes
            del _blocks[i]
        else:
            i += 1
    if held + need > POOL_MAX_BYTES:
        return None
    _blocks.append(np.empty(need, np.uint8))
    return _blocks[-1]
