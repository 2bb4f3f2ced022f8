"""SyncBatchNorm scenarios shared by the in-process tests (ranks as threads) and the
MPI / torch.distributed workers (ranks as processes).

A case splits one global batch between P ranks (sizes may be uneven or 0, the
memory layout may differ per rank). Every rank runs `run_rank` with its own
layer; `reference` runs a BatchNorm on the whole batch; `compare` checks one
rank's results against it. Imports fastnorm and tests/reference.py only.
"""
import os
import sys

import numpy as np

import fastnorm as fn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reference as ref  # noqa: E402  (tests/reference.py)

BATCHNORM = {2: fn.BatchNorm1d, 3: fn.BatchNorm1d, 4: fn.BatchNorm2d, 5: fn.BatchNorm3d}


def case(sizes, tail=(3,), dtype=np.float64, mean=0.0, std=1.0, layouts=None, steps=2,
         affine=True, track_running_stats=True, momentum=0.1, seed=0):
    """sizes: local batch size per rank; tail: (C, *spatial); layouts: per rank,
    "contiguous" or "channels_last" (default all contiguous)."""
    return dict(sizes=list(sizes), tail=tuple(tail), dtype=np.dtype(dtype), mean=mean, std=std,
                layouts=list(layouts or ["contiguous"] * len(sizes)), steps=steps, affine=affine,
                track_running_stats=track_running_stats, momentum=momentum, seed=seed)


# The scenarios every world size runs (sizes cut to the world size).
def standard_cases(world):
    def cut(sizes):
        return sizes[:world]
    cases = {
        "uneven_2d_f64": case(cut([5, 1, 3, 7]), (3,)),
        "uneven_3d_f32": case(cut([2, 4, 1, 3]), (4, 5), np.float32),
        "empty_rank": case(cut([4, 0, 5, 2]) if world > 1 else [4], (3, 2)),
        "all_on_last": case([0] * (world - 1) + [9], (2, 3)),
        "channels_last_some": case(cut([2, 3, 1, 2]), (3, 4, 5), np.float32,
                                   layouts=cut(["contiguous", "channels_last"] * 2)),
        "channels_last_3d": case(cut([1, 2, 2, 1]), (2, 3, 2, 2), np.float64,
                                 layouts=cut(["channels_last", "contiguous"] * 2)),
        "mean_1e4_f32": case(cut([3, 2, 4, 1]), (3, 6, 5), np.float32, mean=1e4, std=1.0, steps=3),
        "no_affine_no_stats": case(cut([3, 3, 1, 2]), (2, 4), affine=False, track_running_stats=False),
        "cumulative_momentum": case(cut([2, 5, 3, 1]), (3,), np.float32, momentum=None, steps=3),
    }
    return cases


# ------------------------------------------------------------------ data

def global_batch(c, step):
    """The global input, output gradient and eval input of one step (same on every rank)."""
    rng = np.random.default_rng([c["seed"], step])
    shape = (sum(c["sizes"]),) + c["tail"]
    x = rng.standard_normal(shape) * c["std"] + c["mean"]
    # per-channel offsets so channels differ
    x += 0.1 * np.arange(shape[1]).reshape((1, -1) + (1,) * (len(shape) - 2))
    dy = rng.standard_normal(shape)
    return x.astype(c["dtype"]), dy.astype(c["dtype"])


def local_part(c, rank, a):
    start = sum(c["sizes"][:rank])
    part = a[start:start + c["sizes"][rank]]
    if c["layouts"][rank] == "channels_last":
        last = np.ascontiguousarray(np.moveaxis(part, 1, -1))
        part = np.moveaxis(last, -1, 1)
    else:
        part = np.ascontiguousarray(part)
    return part


def make_layer(c, comm):
    return fn.SyncBatchNorm(c["tail"][0], momentum=c["momentum"], affine=c["affine"],
                            track_running_stats=c["track_running_stats"], comm=comm,
                            dtype=c["dtype"])


def _layer_arguments(c):
    return dict(momentum=c["momentum"], affine=c["affine"],
                track_running_stats=c["track_running_stats"], dtype=c["dtype"])


# ------------------------------------------------------------------- runs

def run_rank(c, rank, comm, layer=None):
    """Training steps then one eval step on this rank's part; returns a list of
    per-step dicts (y, dx, grads, running stats) and the eval output."""
    layer = layer or make_layer(c, comm)
    steps = []
    for step in range(c["steps"]):
        x, dy = global_batch(c, step)
        x, dy = local_part(c, rank, x), local_part(c, rank, dy)
        y = layer(x)
        dx = layer.backward(dy)
        steps.append(dict(x=x, y=y, dx=dx, grads={k: v.copy() for k, v in layer.grads.items()},
                          state=layer.state_dict()))
    layer.eval()
    x_eval, _ = global_batch(c, c["steps"])
    y_eval = layer(local_part(c, rank, x_eval))
    return dict(steps=steps, y_eval=y_eval)


def reference(c):
    """The same steps with BatchNorm on the whole batch (comm=None)."""
    bn = BATCHNORM[len(c["tail"]) + 1](c["tail"][0], **_layer_arguments(c))
    steps = []
    for step in range(c["steps"]):
        x, dy = global_batch(c, step)
        y = bn(x)
        dx = bn.backward(dy)
        f64 = ref.batch_norm_forward(x, bn.weight, bn.bias, bn.eps)
        steps.append(dict(y=y, dx=dx, grads=dict(bn.grads), state=bn.state_dict(), y64=f64.y,
                          dx64=ref.batch_norm_backward(x, dy, bn.weight, bn.eps)[0]))
    bn.eval()
    x_eval, _ = global_batch(c, c["steps"])
    return dict(steps=steps, y_eval=bn(x_eval))


def tolerance(c):
    """Absolute tolerance on normalized outputs and input gradients."""
    return 1e-10 if c["dtype"] == np.float64 else 2e-5


def compare(c, rank, mine, expected, grad_sums):
    """Check one rank's results; grad_sums[step] are the rank-sums of its grads.
    Raises AssertionError naming the step and quantity."""
    tol = tolerance(c)
    for step, (got, want) in enumerate(zip(mine["steps"], expected["steps"])):
        where = f"rank {rank} step {step}"
        _close(got["y"], local_part(c, rank, want["y"]), tol, f"{where}: output")
        _close(got["dx"], local_part(c, rank, want["dx"]), tol, f"{where}: grad_input")
        # the float64 oracle on the very same data (mean-1e4 float32 included)
        _close(got["y"], local_part(c, rank, want["y64"]), tol, f"{where}: output vs float64", False)
        _close(got["dx"], local_part(c, rank, want["dx64"]), tol, f"{where}: grad_input vs float64",
               False)
        assert _same_layout(got["y"], got["x"]), f"{where}: output layout differs from input"
        assert _same_layout(got["dx"], got["x"]), f"{where}: grad_input layout differs from input"
        for name, value in want["state"].items():
            rtol = 1e-12 if c["dtype"] == np.float64 else 1e-5
            np.testing.assert_allclose(got["state"][name], value, rtol=rtol, atol=rtol,
                                       err_msg=f"{where}: {name}")
        for name, value in want["grads"].items():
            rtol = 1e-9 if c["dtype"] == np.float64 else 1e-4
            np.testing.assert_allclose(grad_sums[step][name], value, rtol=rtol,
                                       atol=rtol * max(1.0, float(np.abs(value).max())),
                                       err_msg=f"{where}: rank-sum of grad {name}")
    want_eval = local_part(c, rank, expected["y_eval"])
    if not c["track_running_stats"]:  # eval then uses this rank's own batch statistics
        bn = BATCHNORM[len(c["tail"]) + 1](c["tail"][0], **_layer_arguments(c)).eval()
        want_eval = bn(local_part(c, rank, global_batch(c, c["steps"])[0]))
    # eval normalizes with running statistics stored in the working dtype: a batch mean
    # that differs in its last bits (global vs one-process reduction) may round to the
    # neighbouring float32, which shifts every output by that ulp (1e-3 at mean 1e4)
    ulp = np.finfo(want_eval.dtype).eps
    np.testing.assert_allclose(mine["y_eval"], want_eval, rtol=4 * ulp, atol=tol,
                               err_msg=f"rank {rank}: eval")


def _close(got, want, tol, what, same_dtype=True):
    assert got.shape == want.shape, f"{what}: shape {got.shape}"
    assert got.dtype == want.dtype or not same_dtype, f"{what}: dtype {got.dtype}"
    np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=what)


def _same_layout(a, x):
    if x.ndim < 3 or x.flags.c_contiguous:
        return a.flags.c_contiguous
    return np.moveaxis(a, 1, -1).flags.c_contiguous


def state_bytes(result):
    """The final running statistics as bytes (must be identical on every rank)."""
    state = result["steps"][-1]["state"]
    return b"".join(state[k].tobytes() for k in sorted(state))
