"""InstanceNorm1d/2d/3d and functional.instance_norm against the reference and torch."""
import numpy as np
import pytest

import fastnorm as fn
from fastnorm import functional as F
from helpers import is_channels_last, make_input, torch_or_skip
from rows_testing import (
    assert_bitwise_equal, assert_close, assert_rejected_unchanged, assert_state_unchanged,
    layer_state, randomize_parameters, results_for_thread_counts, run_torch, torch_twin,
)
import reference as ref

DTYPES = (np.float32, np.float64)

CASES = [
    (fn.InstanceNorm1d, (2, 3, 5)),
    (fn.InstanceNorm1d, (3, 1, 7)),
    (fn.InstanceNorm1d, (1, 2, 4099)),           # a row longer than one unit
    (fn.InstanceNorm2d, (2, 5, 3, 7)),
    (fn.InstanceNorm2d, (1, 13, 2, 1)),
    (fn.InstanceNorm3d, (2, 3, 2, 3, 5)),
]
CASE_IDS = [f"{cls.__name__}-{'x'.join(map(str, shape))}" for cls, shape in CASES]


def case_params():
    for (cls, shape), case_id in zip(CASES, CASE_IDS):
        for layout in ("contiguous", "strided", "channels_last"):
            for dtype in DTYPES:
                yield pytest.param(cls, shape, layout, dtype,
                                   id=f"{case_id}-{layout}-{np.dtype(dtype).name}")


def torch_class(cls, torch):
    return getattr(torch.nn, cls.__name__)


@pytest.mark.smoke
@pytest.mark.parametrize("cls, shape, layout, dtype", list(case_params()))
def test_training_steps_then_eval_match_reference(cls, shape, layout, dtype):
    """Two training steps updating running stats, then eval with them."""
    C = shape[1]
    layer = cls(C, momentum=0.3, affine=True, track_running_stats=True, dtype=dtype)
    randomize_parameters(layer)
    running_mean, running_var = np.zeros(C), np.ones(C)
    for step in range(2):
        x = make_input(shape, dtype, layout, seed=10 + step, mean=step, std=2.0)
        dy = make_input(shape, dtype, layout, seed=20 + step)
        y = layer(x)
        expected = ref.instance_norm_forward(x, layer.weight, layer.bias, layer.eps, running_mean,
                                             running_var, True, 0.3)
        running_mean, running_var = expected.running_mean, expected.running_var
        assert_close(y, expected.y, dtype, "y")
        assert_close(layer.running_mean, running_mean, dtype, "running_mean")
        assert_close(layer.running_var, running_var, dtype, "running_var")
        if layout == "channels_last":
            assert is_channels_last(y)
        dx = layer.backward(dy)
        gx, gw, gb = ref.instance_norm_backward(x, dy, layer.weight, layer.eps)
        assert_close(dx, gx, dtype, "grad_input")
        assert_close(layer.grads["weight"], gw, dtype, "grad_weight", scale=10)
        assert_close(layer.grads["bias"], gb, dtype, "grad_bias", scale=10)
    assert layer.num_batches_tracked == 0      # as torch (counted only for momentum=None)
    layer.eval()
    x = make_input(shape, dtype, layout, seed=30)
    dy = make_input(shape, dtype, layout, seed=31)
    y = layer(x)
    rm, rv = layer.running_mean.astype(np.float64), layer.running_var.astype(np.float64)
    expected = ref.instance_norm_forward(x, layer.weight, layer.bias, layer.eps, rm, rv,
                                         use_input_stats=False)
    assert_close(y, expected.y, dtype, "eval y")
    gx, gw, gb = ref.instance_norm_backward(x, dy, layer.weight, layer.eps, rm, rv,
                                            use_input_stats=False)
    assert_close(layer.backward(dy), gx, dtype, "eval grad_input")
    assert_close(layer.grads["weight"], gw, dtype, "eval grad_weight", scale=10)
    assert layer.num_batches_tracked == 0


@pytest.mark.parametrize("cls, shape", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("affine, track", [(False, False), (True, False), (False, True),
                                           (True, True)])
def test_matches_torch_module_train_then_eval(cls, shape, affine, track):
    torch = torch_or_skip()
    C = shape[1]
    layer = cls(C, eps=1e-4, momentum=0.25, affine=affine, track_running_stats=track,
                dtype=np.float64)
    if affine:
        randomize_parameters(layer)
    module = torch_twin(torch, layer, torch_class(cls, torch), C, eps=1e-4, momentum=0.25,
                        affine=affine, track_running_stats=track)
    for step, training in enumerate([True, True, False]):
        layer.train(training)
        module.train(training)
        x = make_input(shape, np.float64, "channels_last", seed=40 + step, mean=step, std=1.5)
        dy = make_input(shape, np.float64, seed=50 + step)
        y, gx, grads = run_torch(torch, module, x, dy)
        np.testing.assert_allclose(layer(x), y, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(layer.backward(dy), gx, rtol=1e-10, atol=1e-10)
        for name, grad in grads.items():
            np.testing.assert_allclose(layer.grads[name], grad, rtol=1e-10, atol=1e-10)
        if track:
            np.testing.assert_allclose(layer.running_mean, module.running_mean.numpy(), atol=1e-12)
            np.testing.assert_allclose(layer.running_var, module.running_var.numpy(), atol=1e-12)


@pytest.mark.parametrize("cls, shape", [(fn.InstanceNorm1d, (3, 7)), (fn.InstanceNorm2d, (4, 3, 5)),
                                        (fn.InstanceNorm3d, (2, 3, 2, 4))])
def test_unbatched_input(cls, shape):
    torch = torch_or_skip()
    C = shape[0]
    layer = cls(C, affine=True, track_running_stats=True, dtype=np.float64)
    randomize_parameters(layer)
    module = torch_twin(torch, layer, torch_class(cls, torch), C, affine=True,
                        track_running_stats=True)
    x = make_input(shape, np.float64, seed=60, mean=1.0)
    dy = make_input(shape, np.float64, seed=61)
    y, gx, grads = run_torch(torch, module, x, dy)
    got = layer(x)
    assert got.shape == shape
    np.testing.assert_allclose(got, y, atol=1e-10)
    np.testing.assert_allclose(layer.backward(dy), gx, atol=1e-10)
    np.testing.assert_allclose(layer.grads["weight"], grads["weight"], atol=1e-10)
    np.testing.assert_allclose(layer.running_var, module.running_var.numpy(), atol=1e-12)
    out = np.empty(shape)
    assert layer(x, out=out) is out


def test_momentum_none_keeps_a_cumulative_average():
    """Unlike torch (which never updates there), momentum=None averages all batches."""
    layer = fn.InstanceNorm1d(2, momentum=None, track_running_stats=True, dtype=np.float64)
    xs = [make_input((3, 2, 5), np.float64, seed=70 + i, mean=i) for i in range(3)]
    rm, rv, nbt = np.zeros(2), np.ones(2), 0
    for x in xs:
        layer(x)
        res = ref.instance_norm_forward(x, None, None, 1e-5, rm, rv, True, None, nbt)
        rm, rv, nbt = res.running_mean, res.running_var, res.num_batches_tracked
    np.testing.assert_allclose(layer.running_mean, rm, atol=1e-12)
    np.testing.assert_allclose(layer.running_var, rv, atol=1e-12)
    assert layer.num_batches_tracked == 3


def test_functional_forms_and_backward_entry_point():
    x = make_input((3, 4, 5, 2), np.float64, seed=80)
    dy = make_input((3, 4, 5, 2), np.float64, seed=81)
    w, b = make_input((4,), np.float64, seed=82), make_input((4,), np.float64, seed=83)
    rm, rv = np.zeros(4), np.ones(4)
    y, mean, rstd = F.native_instance_norm(x, rm, rv, w, b, True, 0.5, 1e-3)
    expected = ref.instance_norm_forward(x, w, b, 1e-3, np.zeros(4), np.ones(4), True, 0.5)
    np.testing.assert_allclose(y, expected.y, atol=1e-12)
    np.testing.assert_allclose(rm, expected.running_mean, atol=1e-12)
    np.testing.assert_allclose(rv, expected.running_var, atol=1e-12)
    assert mean.shape == rstd.shape == (3, 4)
    for a, e in zip(F.instance_norm_backward(dy, x, mean, rstd, w),
                    ref.instance_norm_backward(x, dy, w, 1e-3)):
        np.testing.assert_allclose(a, e, atol=1e-12)
    y, mean, rstd = F.native_instance_norm(x, rm, rv, w, b, use_input_stats=False, eps=1e-3)
    np.testing.assert_allclose(F.instance_norm(x, rm, rv, w, b, False, eps=1e-3), y)
    for a, e in zip(F.instance_norm_backward(dy, x, mean, rstd, w, use_input_stats=False),
                    ref.instance_norm_backward(x, dy, w, 1e-3, rm, rv, use_input_stats=False)):
        np.testing.assert_allclose(a, e, atol=1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_hard_data_far_from_zero(layout):
    x = make_input((2, 4, 9, 10), np.float32, layout, seed=90, mean=1e4, std=1.0)
    dy = make_input((2, 4, 9, 10), np.float32, layout, seed=91)
    layer = fn.InstanceNorm2d(4, affine=True)
    randomize_parameters(layer)
    y = layer(x)
    dx = layer.backward(dy)
    assert np.abs(y - ref.instance_norm_forward(x, layer.weight, layer.bias).y).max() <= 1e-5
    gx, gw, gb = ref.instance_norm_backward(x, dy, layer.weight)
    assert np.abs(dx - gx).max() <= 1e-5
    assert np.abs(layer.grads["weight"] - gw).max() <= 1e-5 * np.abs(gw).max() + 1e-5
    assert np.abs(layer.grads["bias"] - gb).max() <= 1e-5 * np.abs(gb).max() + 1e-5


@pytest.mark.parametrize("shape, layout", [
    ((8, 16, 28, 28), "contiguous"),            # >= 3 * 32768 values: 3 threads used
    ((1, 2, 50003), "contiguous"),              # few long rows: split by unit
    ((3, 24, 41, 37), "channels_last"),
])
def test_bitwise_identical_for_any_thread_count(shape, layout):
    x = make_input(shape, np.float32, layout, seed=92, mean=2.0)
    dy = make_input(shape, np.float32, layout, seed=93)
    cls = fn.InstanceNorm1d if len(shape) == 3 else fn.InstanceNorm2d
    layer = cls(shape[1], affine=True, track_running_stats=True)
    randomize_parameters(layer)

    def run():
        layer.reset_running_stats()
        y = layer(x)
        return (y, layer.backward(dy), layer.grads["weight"], layer.grads["bias"],
                layer.running_mean.copy(), layer.running_var.copy())

    assert_bitwise_equal(results_for_thread_counts(run))


def test_one_spatial_element_in_training_raises_before_any_state_change():
    layer = fn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    layer(make_input((2, 3, 4, 4), np.float32))
    before = layer_state(layer)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        layer(np.zeros((2, 3, 1, 1), np.float32))
    assert_state_unchanged(layer, before)
    layer.eval()
    assert layer(np.zeros((2, 3, 1, 1), np.float32)).shape == (2, 3, 1, 1)   # running stats: fine
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        fn.InstanceNorm1d(3).eval()(np.zeros((2, 3, 1), np.float32))         # input stats in eval


@pytest.mark.parametrize("bad, error, match", [
    (np.zeros((2, 4, 3, 3), np.float32), ValueError, "expected 3 channels"),
    (np.zeros((2, 3, 3), np.float32) [None, None], ValueError, "3D \\(unbatched\\) or 4D"),
    (np.zeros((3, 3), np.float32), ValueError, "3D \\(unbatched\\) or 4D"),
    (np.zeros((2, 3, 3, 3), np.int32), TypeError, "float32 or float64"),
    (np.zeros((2, 3, 3, 3), np.float64), TypeError, "dtype"),
])
def test_bad_input_raises_before_any_state_change(bad, error, match):
    assert_rejected_unchanged(fn.InstanceNorm2d(3, affine=True, track_running_stats=True),
                              make_input((2, 3, 3, 3), np.float32, seed=1), bad, error, match)


def test_bad_out_leaves_running_stats_alone():
    layer = fn.InstanceNorm1d(2, track_running_stats=True)
    before = layer_state(layer)
    x = make_input((2, 2, 5), np.float32)
    with pytest.raises(ValueError, match="out must have"):
        layer(x, out=np.empty((2, 2, 4), np.float32))
    assert_state_unchanged(layer, before)


def test_empty_batch_leaves_running_stats_alone():
    layer = fn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    before = layer_state(layer)
    y = layer(np.empty((0, 3, 4, 4), np.float32))
    assert y.shape == (0, 3, 4, 4)
    assert_state_unchanged(layer, before)
    assert layer.backward(np.empty((0, 3, 4, 4), np.float32)).shape == (0, 3, 4, 4)
    assert np.array_equal(layer.grads["weight"], np.zeros(3, np.float32))


def test_constructor_checks_and_state_dict():
    torch = torch_or_skip()
    with pytest.raises(ValueError, match="num_features"):
        fn.InstanceNorm1d(0)
    with pytest.raises(ValueError, match="momentum"):
        fn.InstanceNorm2d(3, momentum=1.5)
    layer = fn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    module = torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    assert layer.state_dict().keys() == module.state_dict().keys()
    layer.load_state_dict({k: v.numpy() for k, v in module.state_dict().items()})
    plain = fn.InstanceNorm2d(3)
    assert plain.state_dict() == {} and plain.weight is None and plain.running_mean is None
