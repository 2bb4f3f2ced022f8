"""The benchmark runner keeps working: registry, NumPy floor, timer, targets, a smoke run.

Nothing here asserts how fast anything is; the runner's smoke mode times
tiny shapes for two rounds only.
"""
import json
import os
import sys
import types

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import cases, numpy_floor, peers, targets, timing  # noqa: E402

import reference  # noqa: E402  (tests/ is on sys.path under pytest)


def _tiny(spec):
    return next(shape for shape in spec.shapes if shape.tiny)


def test_every_layer_has_its_family_parts_and_a_tiny_shape():
    for spec in cases.LAYERS:
        assert spec.family in numpy_floor.FLOORS
        assert spec.family in peers.ONNX_OPS
        assert _tiny(spec).dims
    labels = [c.label for c in cases.select_cases(quick=False)]
    assert len(labels) == len(set(labels))


def test_quick_selection_is_float32_and_smaller_than_full():
    quick = cases.select_cases(quick=True)
    assert quick and {c.dtype for c in quick} == {"float32"}
    assert len(quick) < len(cases.select_cases(quick=False))
    assert {c.layer.name for c in quick} == set(cases.LAYER_NAMES)


def test_minimum_traffic_counts_arrays_of_the_input():
    spec = cases.LAYERS[0]
    shape = cases.Shape((4, 8, 16), "t")
    for mode, arrays in (("train", 2), ("backward", 3), ("fwd+bwd", 5)):
        case = cases.Case(spec, shape, "contiguous", mode, "float32")
        assert case.min_bytes == arrays * 4 * 8 * 16 * 4


def test_channels_last_array_has_channels_last_memory():
    x = cases.make_array((2, 3, 4, 5), "channels_last", "float32", np.random.default_rng(0))
    assert x.shape == (2, 3, 4, 5) and np.moveaxis(x, 1, -1).flags.c_contiguous


def _reference(spec, x, dy, params):
    from benchmarks.accuracy import _references
    return _references(reference)[spec.family](x, dy, spec.args(x.shape), params,
                                               np.dtype(np.float64))


@pytest.mark.parametrize("spec", cases.LAYERS, ids=lambda s: s.name)
def test_numpy_floor_matches_reference(spec):
    rng = np.random.default_rng(0)
    dims = spec.accuracy_shape
    x = rng.standard_normal(dims) * 2 + 3
    dy = rng.standard_normal(dims)
    layer = numpy_floor.FLOORS[spec.family](*spec.args(dims), dtype=np.float64)
    params = {}
    for name, value in layer.named_parameters():
        value[...] = rng.standard_normal(value.shape)
        params[name] = value.copy()
    want_y, want_dx = _reference(spec, x, dy, params)
    np.testing.assert_allclose(layer(x), want_y, atol=1e-10)
    np.testing.assert_allclose(layer.backward(dy), want_dx, atol=1e-10)


def test_timer_runs_every_candidate_interleaved():
    calls = []
    settings = timing.Settings(budget=0.0, min_rounds=3, max_rounds=3, min_sample=0.0, warmup=0.0)
    result = timing.measure({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                            settings)
    assert set(result) == {"a", "b"}
    assert all(t.rounds == 3 and t.minimum <= t.median for t in result.values())
    rounds = calls[2:]  # after one warm-up call each
    assert rounds == ["a", "b", "b", "a", "a", "b"]


def test_ratio_is_paired_round_by_round():
    """A slow phase that hits the peer's sample in some rounds and ours in others moves the
    medians' ratio (6 / 1 here), not the median of the per-round ratios (2)."""
    def timed(samples):
        return timing.Timing(sorted(samples)[len(samples) // 2], min(samples), 0.0, 0.0,
                             len(samples), 1, tuple(samples))
    ours = timed([1, 1, 1, 3, 3])
    peer = timed([2, 2, 6, 6, 6])
    assert peer.median / ours.median == 6
    assert timing.paired_ratio(peer, ours) == 2
    reused = timing.Timing(peer.median, peer.minimum, 0.0, 0.0, 5, 1)   # no samples
    assert timing.paired_ratio(reused, ours) == 6
    assert "samples" not in ours.as_dict()


def test_targets_pass_fail_and_not_measured():
    def record(speedup, threads=1, **fields):
        base = {"layer": "BatchNorm2d", "family": "batch", "shape": [32, 64, 56, 56],
                "layout": "contiguous", "mode": "train", "dtype": "float32", "tiny": False,
                "large": False, "label": "x", "threads": threads,
                "speedup": {"torch": speedup}, "bandwidth_fraction": 0.5}
        return {**base, **fields}
    rows = {r["target"]: r for r in targets.evaluate([record(5.0), record(3.0, threads=2)])}
    first = rows["BatchNorm2d (32,64,56,56) NCHW train fwd f32"]
    assert first["status"] == "FAIL" and first["worst"] == 3.0
    assert rows["geometric-mean speedup, per thread count: 1 thr"]["status"] == "pass"
    assert rows["large cases: fastnorm GB/s / copy bandwidth"]["status"] == "not measured"


def _stub_fastnorm(missing=()):
    """A stand-in fastnorm whose layers are the NumPy floor (for layers not written yet)."""
    layers = {s.name: numpy_floor.FLOORS[s.family] for s in cases.LAYERS if s.name not in missing}
    return types.SimpleNamespace(**layers, set_num_threads=lambda n: None,
                                 get_num_threads=lambda: 1)


def test_every_layer_runs_against_torch_with_a_stub_fastnorm():
    pytest.importorskip("torch")
    from benchmarks import run
    peer_list = peers.make_peers(_stub_fastnorm())
    runner = run.Runner(_stub_fastnorm(), peer_list, timing.SMOKE, {1: 10.0})
    selected = [c for c in cases.select_cases(quick=False, tiny_only=True, dtypes=["float32"])
                if not c.layer.fusion]   # the NumPy floor has no fused forms
    records = runner.run(selected, [1])
    assert len(records) == len(selected), runner.notes
    assert all(r["speedup"]["torch"] > 0 for r in records)


def test_fused_cases_time_torch_composition_and_norm_alone():
    pytest.importorskip("torch")
    import fastnorm
    from benchmarks import run
    peer_list = peers.make_peers(fastnorm, ["torch", "numpy"])
    runner = run.Runner(fastnorm, peer_list, timing.SMOKE, {1: 10.0})
    selected = [c for c in cases.select_cases(quick=False, tiny_only=True, dtypes=["float32"])
                if c.layer.fusion]
    assert {c.layer.fusion for c in selected} == {"add", "relu", "silu"}
    records = runner.run(selected, [1])
    assert len(records) == len(selected), runner.notes
    for r in records:
        assert r["fusion"] and r["speedup"]["torch"] > 0 and r["speedup"]["norm-only"] > 0
        assert "numpy" in r["skipped"]
    rows = {row["target"]: row for row in targets.evaluate(records)}
    assert rows["fusions (add+norm, norm+act) vs torch's composition"]["status"] == "not measured"


def test_missing_layer_is_skipped_with_a_note():
    stub = _stub_fastnorm(missing=("LayerNorm",))
    case = cases.select_cases(quick=True, layers=["LayerNorm"])[0]
    assert "no LayerNorm" in peers.FastnormPeer(stub).skip_reason(case)


def test_smoke_run_writes_json_markdown_and_restores_threads(tmp_path, capsys):
    pytest.importorskip("torch")
    import fastnorm
    from benchmarks import run
    before = fastnorm.get_num_threads()
    result = run.main(["--smoke", "--threads", "1", "--layers", "BatchNorm2d,LayerNorm",
                       "--bandwidth-mib", "8", "--out", str(tmp_path)])
    assert fastnorm.get_num_threads() == before
    saved = json.loads((tmp_path / "latest.json").read_text())
    assert saved["results"] and saved["meta"]["threads"] == [1]
    expected = {"BatchNorm2d", "LayerNorm"} if hasattr(fastnorm, "LayerNorm") else {"BatchNorm2d"}
    assert {r["layer"] for r in saved["results"]} == expected
    assert {"copy", "triad"} <= set(saved["meta"]["bandwidth"]["1"])
    if not hasattr(fastnorm, "LayerNorm"):
        assert any("LayerNorm skipped" in note for note in saved["notes"])
    assert saved["accuracy"] and saved["targets"]
    markdown = (tmp_path / "latest.md").read_text()
    assert markdown.startswith("<!-- bench:start -->") and "<!-- bench:end -->" in markdown
    assert "BatchNorm2d" in capsys.readouterr().out
    assert result["meta"]["mode"] == "smoke"
    if sys.platform.startswith("linux"):     # glibc's mallopt accepted the fixed thresholds
        assert saved["meta"]["steady_malloc"] is True
        assert "steady malloc thresholds" in markdown


@pytest.mark.mpi
def test_sync_ranks_benchmark_runs_one_and_two_ranks():
    """benchmarks/sync_ranks.py launches its MPI workers and prints one row per rank count."""
    import shutil
    import subprocess
    pytest.importorskip("mpi4py")
    beside_python = os.path.dirname(sys.executable)
    if not (shutil.which("mpiexec") or shutil.which("mpiexec", path=beside_python)):
        pytest.skip("mpiexec not found")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sync_ranks.py"),
                           "--ranks", "1,2", "--shape", "4,8,4,4", "--steps", "3"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["1", "2"]
