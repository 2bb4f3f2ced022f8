"""The tracker issues' performance targets, checked against a run's measurements.

Each target selects measurements and states a threshold; it passes when the
worst selected value meets it, and is "not measured" when nothing is selected
(e.g. --quick has no large cases, or a layer is missing).
"""
import math
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Target:
    text: str
    select: Callable[[dict], bool]
    threshold: float
    # "speedup" (vs torch), "bandwidth" (fraction of copy), "geomean", or a peer's name
    # (its time / fastnorm's)
    metric: str = "speedup"


def _is(layer=None, dims=None, layout=None, mode=None, dtype="float32", family=None, tiny=False):
    """Selects records matching every given field; tiny=None also takes the latency-bound shapes."""
    def select(r):
        return ((tiny is None or r["tiny"] == tiny)
                and (layer is None or r["layer"] == layer)
                and (family is None or r["family"] == family)
                and (dims is None or tuple(r["shape"]) == dims)
                and (layout is None or r["layout"] == layout)
                and (mode is None or r["mode"] == mode)
                and (dtype is None or r["dtype"] == dtype))
    return select


TARGETS = (
    Target("BatchNorm2d (32,64,56,56) NCHW train fwd f32", _is("BatchNorm2d", (32, 64, 56, 56), "contiguous", "train"), 4.0),
    Target("BatchNorm1d (64,128,512) train fwd f32", _is("BatchNorm1d", (64, 128, 512), mode="train"), 4.0),
    Target("BatchNorm2d channels-last train fwd f32", _is("BatchNorm2d", layout="channels_last", mode="train"), 1.3),
    Target("BatchNorm1d (4096,1024) train fwd f32", _is("BatchNorm1d", (4096, 1024), mode="train"), 1.3),
    Target("BatchNorm eval fwd, every layout", _is(family="batch", mode="eval", dtype=None), 1.0),
    Target("BatchNorm backward", _is(family="batch", mode="backward", dtype=None), 1.5),
    # issue 3: row-family layers
    Target("InstanceNorm2d forward f32", _is("InstanceNorm2d", layout="contiguous", mode="train"), 4.0),
    Target("RMSNorm forward f32", _is("RMSNorm", mode="train"), 2.0),
    Target("RMSNorm forward+backward f32", _is("RMSNorm", mode="fwd+bwd"), 4.0),
    Target("LayerNorm and GroupNorm backward f32",
           lambda r: r["layer"] in ("LayerNorm", "GroupNorm") and r["mode"] == "backward"
           and r["dtype"] == "float32" and not r["tiny"], 1.5),
    Target("LayerNorm (8,512,768) and GroupNorm(32) (8,256,56,56) forward f32",
           lambda r: r["mode"] == "train" and r["dtype"] == "float32" and (
               (r["layer"] == "LayerNorm" and tuple(r["shape"]) == (8, 512, 768))
               or (r["layer"] == "GroupNorm" and tuple(r["shape"]) == (8, 256, 56, 56))), 1.1),
    # issue 4: LocalResponseNorm
    Target("LocalResponseNorm (32,96,55,55) forward f32", _is("LocalResponseNorm", (32, 96, 55, 55), mode="train"), 20.0),
    Target("LocalResponseNorm (32,96,55,55) forward+backward f32", _is("LocalResponseNorm", (32, 96, 55, 55), mode="fwd+bwd"), 20.0),
    Target("LocalResponseNorm (32,96,55,55): GB/s / copy bandwidth",
           _is("LocalResponseNorm", (32, 96, 55, 55)), 0.60, metric="bandwidth"),
    Target("never slower than torch (every case)", _is(dtype=None, tiny=None), 1.0),
    Target("geometric-mean speedup, per thread count", _is(dtype=None, tiny=None), 2.0, metric="geomean"),
    Target("large cases: fastnorm GB/s / copy bandwidth", lambda r: r["large"], 0.80, metric="bandwidth"),
    Target("fusions (add+norm, norm+act) vs torch's composition",
           lambda r: bool(r.get("fusion")) and not r["tiny"], 1.5),
    Target("fused forward within 10% of the normalization alone (norm time / fused time)",
           lambda r: bool(r.get("fusion")) and not r["tiny"] and r["mode"] == "train", 1 / 1.1,
           metric="norm-only"),
)


def _value(record, metric):
    if metric == "bandwidth":
        return record.get("bandwidth_fraction")
    peer = "torch" if metric in ("speedup", "geomean") else metric
    return record.get("speedup", {}).get(peer)


def evaluate(records):
    """Rows {target, threshold, metric, worst, where, status}."""
    rows = []
    for target in TARGETS:
        chosen = [r for r in records if target.select(r) and _value(r, target.metric) is not None]
        if target.metric == "geomean":
            rows.extend(_geomean_rows(target, chosen))
            continue
        row = {"target": target.text, "threshold": target.threshold, "metric": target.metric}
        if not chosen:
            rows.append({**row, "worst": None, "where": "", "status": "not measured"})
            continue
        worst = min(chosen, key=lambda r: _value(r, target.metric))
        value = _value(worst, target.metric)
        rows.append({**row, "worst": value, "where": f"{worst['label']} {worst['threads']} thr",
                     "status": "pass" if value >= target.threshold else "FAIL"})
    return rows


def _geomean_rows(target, chosen):
    rows = []
    for threads in sorted({r["threads"] for r in chosen}):
        ratios = [r["speedup"]["torch"] for r in chosen if r["threads"] == threads]
        value = geomean(ratios)
        rows.append({"target": f"{target.text}: {threads} thr", "threshold": target.threshold,
                     "metric": "speedup", "worst": value, "where": f"{len(ratios)} cases",
                     "status": "pass" if value >= target.threshold else "FAIL"})
    if not rows:
        rows.append({"target": target.text, "threshold": target.threshold, "metric": "speedup",
                     "worst": None, "where": "", "status": "not measured"})
    return rows


def geomean(values):
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")
