"""The output pool (fastnorm/_memory.py): large outputs reuse blocks whose arrays are
all gone, never one still in use."""
import os
import threading
import time

import numpy as np
import pytest

import fastnorm as fn
from fastnorm import _memory
from fastnorm.functional import layer_norm, local_response_norm

MIB = 1 << 20


@pytest.fixture
def pool(monkeypatch):
    """The pool emptied, with 1 MiB arrays already pooled (small, fast tests)."""
    _memory.release()
    monkeypatch.setattr(_memory, "_blocks", [])
    monkeypatch.setattr(_memory, "POOL_MIN_BYTES", MIB)
    yield _memory
    _memory._blocks.clear()


def address(a):
    return a.__array_interface__["data"][0]


def test_small_arrays_are_not_pooled(pool):
    a = pool.empty((100, 100), np.float32)
    assert a.shape == (100, 100) and a.dtype == np.float32 and a.flags.c_contiguous
    assert pool.pooled_bytes() == 0


def test_large_unpooled_arrays_start_half_a_page_in(pool, monkeypatch):
    """Outputs that may be streamed are whole 64-byte lines, at the pool's page offset,
    whether pooled or not (the pool's cap reached here)."""
    monkeypatch.setattr(pool, "POOL_MAX_BYTES", 0)
    monkeypatch.setattr(pool, "ALIGNED_MIN_BYTES", 2 * MIB)
    a = pool.empty((2, 1024, 257), np.float32)       # 2 MiB and a bit
    assert a.shape == (2, 1024, 257) and a.flags.c_contiguous and a.flags.writeable
    assert address(a) % 4096 == pool.PAGE_OFFSET and pool.pooled_bytes() == 0


def test_block_reused_only_when_its_arrays_are_gone(pool):
    a = pool.empty((512, 1024), np.float32)          # 2 MiB
    assert a.shape == (512, 1024) and a.flags.c_contiguous and a.flags.writeable
    assert address(a) % 4096 == pool.PAGE_OFFSET
    b = pool.empty((512, 1024), np.float32)
    assert not np.may_share_memory(a, b)
    where = address(a)
    view = a[1:]
    del a
    c = pool.empty((512, 1024), np.float32)          # a's block is still seen through view
    assert not np.may_share_memory(c, view) and not np.may_share_memory(c, b)
    del view
    d = pool.empty((1024, 512), np.float32)
    assert address(d) == where
    assert len(pool._blocks) == 3


def test_a_much_larger_free_block_is_not_used(pool):
    big = pool.empty((8 * MIB,), np.uint8)
    big_at = address(big)
    del big
    small = pool.empty((2 * MIB,), np.uint8)
    assert address(small) != big_at
    assert len(pool._blocks) == 2


def test_pool_never_holds_more_than_its_limit(pool, monkeypatch):
    monkeypatch.setattr(pool, "POOL_MAX_BYTES", 6 * MIB)
    a = pool.empty((2 * MIB,), np.uint8)
    b = pool.empty((2 * MIB,), np.uint8)
    c = pool.empty((2 * MIB,), np.uint8)             # no room: a plain array
    assert len(pool._blocks) == 2 and pool.pooled_bytes() <= 6 * MIB
    assert not np.may_share_memory(c, a) and not np.may_share_memory(c, b)
    del a, c
    d = pool.empty((3 * MIB,), np.uint8)             # a's free block is dropped for it
    assert len(pool._blocks) == 2 and pool.pooled_bytes() <= 6 * MIB
    assert not np.may_share_memory(d, b)


def test_release_drops_free_blocks_only(pool):
    a = pool.empty((2 * MIB,), np.uint8)
    b = pool.empty((2 * MIB,), np.uint8)
    del b
    pool.release()
    assert len(pool._blocks) == 1
    assert pool._blocks[0].__array_interface__["data"][0] <= address(a)


def test_threads_never_share_a_block(pool):
    errors = []

    def work(tag):
        for _ in range(200):
            a = pool.empty((MIB // 4,), np.float32)
            a.fill(tag)
            a[:: 4096] = tag                          # touch again after other threads ran
            if not (a == tag).all():
                errors.append(tag)
            del a                                     # before the next request

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(pool._blocks) <= 4


def test_layer_outputs_come_from_the_pool(pool):
    x = np.random.default_rng(0).standard_normal((4, 8, 64, 64)).astype(np.float32)  # 512 KiB
    pool.POOL_MIN_BYTES = 256 * 1024
    y = local_response_norm(x, 5)
    assert pool.pooled_bytes() > 0
    where = address(y)
    expected = y.copy()
    del y
    y2 = local_response_norm(x, 5)
    assert address(y2) == where
    np.testing.assert_array_equal(y2, expected)
    rows = np.random.default_rng(1).standard_normal((256, 512)).astype(np.float32)
    z = layer_norm(rows, (512,))
    assert not np.may_share_memory(z, y2)
    assert fn.LayerNorm(512)(rows).shape == rows.shape


def test_forked_child_allocates_while_parent_thread_holds_the_lock(pool):
    with pool._lock:                    # as if another thread were inside empty() at fork
        pid = os.fork()
        if pid == 0:                    # child: must not wait for a lock nobody will release
            a = pool.empty((2 * MIB,), np.uint8)
            os._exit(0 if a.nbytes == 2 * MIB else 1)
    for _ in range(400):                # up to 20 s, then the child is deemed hung
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung on the pool's lock")
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("value, expected", [("", 512 * MIB), ("0", 0), (" 64 ", 64 * MIB)])
def test_pool_limit_from_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("FASTNORM_OUTPUT_POOL_MB", value)
    assert _memory._limit_from_env() == expected


@pytest.mark.parametrize("value", ["-1", "1.5", "lots"])
def test_bad_pool_limit_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("FASTNORM_OUTPUT_POOL_MB", value)
    with pytest.raises(ValueError, match="FASTNORM_OUTPUT_POOL_MB must be a whole number"):
        _memory._limit_from_env()


def test_pool_limit_zero_turns_the_pool_off(pool, monkeypatch):
    monkeypatch.setattr(pool, "POOL_MAX_BYTES", 0)
    a = pool.empty((2 * MIB,), np.uint8)
    assert a.flags.owndata and pool.pooled_bytes() == 0


def test_outputs_of_8_mib_are_pooled_by_default():
    """From ALIGNED_MIN_BYTES on, outputs come from the pool whatever malloc's thresholds
    (a 16 MiB output behind NumPy temporaries page-faulted on every call)."""
    assert _memory.POOL_MIN_BYTES <= 8 * MIB
    x = np.random.default_rng(2).standard_normal((8 * MIB // 4 // 1024, 1024)).astype(np.float32)
    y = layer_norm(x, (1024,))
    assert any(y.base is block for block in _memory._blocks)
    assert address(y) % 4096 == _memory.PAGE_OFFSET
