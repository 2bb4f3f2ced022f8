"""How many OpenMP threads a kernel call uses, resolved at call time.

The count is the calling thread's OpenMP limit (omp_get_max_threads, which
follows OMP_NUM_THREADS and threadpoolctl's limits), capped by
set_num_threads(). set_num_threads(n) also sets the calling thread's OpenMP
limit to n (so n may exceed the core count), and a later threadpoolctl limit
lowers it again: the smaller of the two wins. In a child created by os.fork() kernels run serially:
libgomp cannot start a new team in a forked child of a process whose team
already ran, and would hang.
"""
import os

from ._kernels import kernels
from ._validation import check_count

_user_limit = None
_in_forked_child = False


def set_num_threads(n):
    """Use at most n OpenMP threads in fastnorm's kernels (n >= 1)."""
    global _user_limit
    n = check_count("n", n)
    _user_limit = n
    kernels.openmp_set_num_threads(n)


def get_num_threads():
    """The number of threads the next kernel call from this thread will use."""
    if _in_forked_child:
        return 1
    limit = kernels.openmp_max_threads()
    if _user_limit is not None and _user_limit < limit:
        return _user_limit
    return limit


# Below this many values per thread, waking threads costs more than they save.
MIN_VALUES_PER_THREAD = 1 << 15


def threads_for(n_values):
    """Threads for a kernel call over n_values values: get_num_threads(), fewer for
    small inputs. Results never depend on it (kernels are thread-count invariant)."""
    return max(1, min(get_num_threads(), n_values // MIN_VALUES_PER_THREAD))


_initial_openmp_limit = kernels.openmp_max_threads()


def _reset_num_threads():
    """Forget set_num_threads() (as at import); used by the tests."""
    global _user_limit
    _user_limit = None
    kernels.openmp_set_num_threads(_initial_openmp_limit)


def _after_fork_in_child():
    global _in_forked_child
    _in_forked_child = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
