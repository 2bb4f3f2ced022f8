"""Thread control, fork safety, concurrent use, and the build report."""
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import fastnorm as fn
from helpers import make_input, num_threads

openmp_only = pytest.mark.skipif(not fn._kernels.OPENMP_ENABLED, reason="serial build")


def run_python(code, env=None, timeout=120):
    """Run code in a fresh interpreter; return its stdout (fails on a non-zero exit)."""
    full_env = dict(os.environ, **(env or {}))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                            text=True, env=full_env, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.smoke
def test_set_and_get_num_threads():
    with num_threads(3):
        assert fn.get_num_threads() == (3 if fn._kernels.OPENMP_ENABLED else 1)
    with num_threads(1):
        assert fn.get_num_threads() == 1
    with pytest.raises(ValueError, match="n must be at least 1"):
        fn.set_num_threads(0)
    with pytest.raises(TypeError, match="int"):
        fn.set_num_threads(1.5)


@openmp_only
def test_omp_num_threads_environment_is_honoured():
    out = run_python("import fastnorm; print(fastnorm.get_num_threads())", env={"OMP_NUM_THREADS": "3"})
    assert out.strip() == "3"


@openmp_only
def test_threadpoolctl_sees_and_limits_fastnorm():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    out = run_python(
        """
        import fastnorm, threadpoolctl
        apis = {info["user_api"] for info in threadpoolctl.threadpool_info()}
        assert "openmp" in apis, apis
        with threadpoolctl.threadpool_limits(1, user_api="openmp"):
            print(fastnorm.get_num_threads())
        print(fastnorm.get_num_threads())
        """,
        env={"OMP_NUM_THREADS": "2"},
    )
    assert out.split() == ["1", "2"]
    assert threadpoolctl is not None


@pytest.mark.smoke
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_runs_without_hanging():
    """libgomp hangs a forked child that opens a team; fastnorm runs the child serially."""
    out = run_python(
        """
        import os, numpy as np, fastnorm
        x = np.random.default_rng(0).standard_normal((64, 32, 100)).astype(np.float32)
        layer = fastnorm.BatchNorm1d(32)
        parent = layer(x)              # starts the OpenMP team in the parent
        pid = os.fork()
        if pid == 0:
            child = fastnorm.BatchNorm1d(32)(x)
            ok = np.array_equal(child, parent) and fastnorm.get_num_threads() == 1
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
        """,
        env={"OMP_NUM_THREADS": "2"},
        timeout=60,
    )
    assert out.strip() == "0"


def test_two_python_threads_at_once_give_single_thread_results():
    """Kernels release the GIL; separate layers in separate threads agree with serial runs."""
    inputs = [make_input((32, 16, 200), np.float32, seed=s) for s in range(4)]
    expected = []
    for x in inputs:
        layer = fn.BatchNorm1d(16)
        y = layer(x)
        expected.append((y, layer.backward(x)))
    results = [None] * len(inputs)

    def work(i):
        layer = fn.BatchNorm1d(16)
        for _ in range(5):
            layer = fn.BatchNorm1d(16)
            y = layer(inputs[i])
            results[i] = (y, layer.backward(inputs[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


@pytest.mark.smoke
def test_show_config_reports_build(capsys):
    fn.show_config()
    text = capsys.readouterr().out
    assert f"fastnorm {fn.__version__}" in text
    assert ("OpenMP:          enabled" in text) == fn._kernels.OPENMP_ENABLED
    assert "threads:" in text and "compile flags:" in text
    assert "-ffast-math" not in text


def _runnable_builds():
    """{name: module} of every kernel build compiled here that this CPU runs."""
    return {name: module for name, module in
            (fn._kernels._pick_build(cap) for cap, _ in fn._kernels.BUILDS)}


def test_instruction_set_builds_agree_to_rounding():
    """Every instruction-set build computes the same maths."""
    builds = _runnable_builds()
    if len(builds) == 1:
        pytest.skip("only the generic build runs here")
    x = make_input((8, 5, 300), np.float32, seed=4, mean=100.0).reshape(8, 5, 300)
    outputs = []
    for module in builds.values():
        y, mean, var = np.empty_like(x), np.empty(5), np.empty(5)
        module.channel_forward_train(x, np.ones(5), np.zeros(5), 1e-5, y, mean, var, 1)
        outputs.append((y, mean, var))
    for other in outputs[1:]:
        np.testing.assert_allclose(outputs[0][0], other[0], atol=2e-6)
        np.testing.assert_allclose(outputs[0][1], other[1], rtol=1e-12)
        np.testing.assert_allclose(outputs[0][2], other[2], rtol=1e-6)


@pytest.mark.smoke
def test_isa_cap_picks_the_widest_build_at_or_below_it():
    """FASTNORM_ISA caps the build: each cap gives itself when built and runnable here,
    else the next narrower one; no cap (or an unknown name) gives the widest."""
    generic = fn._kernels.generic
    assert fn._kernels._pick_build("generic") == ("generic", generic)
    widest = fn._kernels._pick_build("")
    assert fn._kernels._pick_build("no-such-isa") == widest
    assert widest[0] == fn._kernels.ISA or os.environ.get("FASTNORM_ISA")
    runs = {"avx512": generic.cpu_has_avx512(), "avx2": generic.cpu_has_avx2_fma()}
    assert not runs["avx512"] or runs["avx2"]   # AVX-512 here implies AVX2+FMA
    for cap in ("avx512", "avx2"):
        name, module = fn._kernels._pick_build(cap)
        names = [n for n, _ in fn._kernels.BUILDS]
        assert names.index(name) >= names.index(cap)
        if name != "generic":
            assert runs[name] and module.__name__ == f"fastnorm._ext_{name}"
