"""The runnable examples in examples/ keep running and keep their promises.

Each example runs as its own process in quick mode, the way a user would start
it, with this checkout first on PYTHONPATH. examples/sync_batchnorm_mpi.py is
exercised by tests/test_sync_batchnorm.py (it needs mpiexec).
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
TIMEOUT = 300


def run_example(name, *args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_train_digits_reaches_95_percent_and_writes_the_plot(tmp_path, model):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    plot = tmp_path / "curves.png"
    out = run_example("train_digits.py", "--model", model, "--quick", "--plot", str(plot))
    epochs = re.findall(r"^epoch +\d+ +loss ([0-9.]+) +train acc ([0-9.]+) +test acc ([0-9.]+)$",
                        out, re.MULTILINE)
    assert len(epochs) == 2 * 8, out  # both networks, every epoch reported
    final = re.search(r"final test accuracy: normalized ([0-9.]+), "
                      r"without normalization ([0-9.]+)", out)
    assert final, out
    assert float(final.group(1)) >= 0.95, out
    assert 0.0 <= float(final.group(2)) <= 1.0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_digits_is_deterministic_for_a_seed():
    pytest.importorskip("sklearn")

    def epochs(seed):
        out = run_example("train_digits.py", "--epochs", "2", "--seed", str(seed), "--no-plot")
        return [line for line in out.splitlines() if line.startswith("epoch")]

    assert epochs(3) == epochs(3)


def test_inference_cnn_matches_torch_both_ways():
    pytest.importorskip("torch")
    out = run_example("inference_cnn.py", "--quick")
    errors = re.findall(r"^max abs error vs torch, (\w+) .*: features ([0-9.e+-]+), "
                        r"logits ([0-9.e+-]+)$", out, re.MULTILINE)
    assert [path for path, *_ in errors] == ["folded", "fused"], out
    assert max(float(e) for _, *pair in errors for e in pair) < 1e-4, out
    timings = re.findall(r"torch +([0-9.]+) ms +fastnorm +([0-9.]+) ms +speedup", out)
    assert len(timings) == 3 + 1, out  # each block, and all blocks


def test_train_digits_conv2d_gradients_match_torch():
    torch = pytest.importorskip("torch")
    sys.path.insert(0, EXAMPLES)
    try:
        import train_digits
    finally:
        sys.path.remove(EXAMPLES)
    rng = np.random.default_rng(0)
    conv = train_digits.Conv2d(3, 5, 3, rng)
    x = rng.standard_normal((2, 3, 6, 4)).astype(np.float32)
    dy = rng.standard_normal((2, 5, 6, 4)).astype(np.float32)
    y, dx = conv(x), conv.backward(dy)

    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(conv.weight, requires_grad=True)
    tb = torch.tensor(conv.bias, requires_grad=True)
    ty = torch.nn.functional.conv2d(tx, tw, tb, padding=1)
    ty.backward(torch.tensor(dy))
    for ours, theirs in [(y, ty), (dx, tx.grad), (conv.grads["weight"], tw.grad),
                         (conv.grads["bias"], tb.grad)]:
        np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-4, atol=1e-5)
