"""Presenting a run: terminal table, Markdown (for the README), JSON, PNG chart.

Everything here reads the run dictionary built by run.py:
  {"meta": {...machine, versions, environment, threads, bandwidth...},
   "results": [record, ...], "accuracy": [row, ...], "targets": [row, ...], "notes": [...]}
"""
import json
import math

from .cases import DTYPE_SHORT, LAYOUT_SHORT, shape_text
from .targets import geomean

PEER_COLUMNS = (("norm-only", "norm only"), ("numpy", "numpy"), ("onnxruntime", "ORT"))


# ------------------------------------------------------------------ formatting

def fmt_time(seconds):
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_ratio(value):
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.2f}×" if value < 10 else f"{value:.1f}×"


def fmt_gbps(value):
    return f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def fmt_percent(fraction):
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def fmt_error(value):
    return "-" if value is None else f"{value:.1e}"


def render(headers, rows, markdown=False, align=None):
    """A table as aligned text, or as a Markdown pipe table. align: 'l'/'r' per column."""
    align = align or ["l"] * len(headers)
    if markdown:
        rule = ["---:" if a == "r" else "---" for a in align]
        lines = [headers, rule, *rows]
        return "\n".join("| " + " | ".join(str(c) for c in line) + " |" for line in lines)
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]

    def line(cells):
        return "  ".join(str(c).rjust(w) if a == "r" else str(c).ljust(w)
                         for c, w, a in zip(cells, widths, align)).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


# ---------------------------------------------------------------- the tables

def results_table(run, markdown=False):
    peers = [(name, title) for name, title in PEER_COLUMNS if name in run["meta"]["peers"]]
    headers = ["layer", "shape", "layout", "mode", "dtype", "thr", "fastnorm", "torch", "vs torch"]
    for _, title in peers:
        headers += [title, f"vs {title}"]
    headers += ["GB/s", "% BW"]
    rows = []
    for r in run["results"]:
        t = r["timings"]
        row = [r["layer"], shape_text(r["shape"]), LAYOUT_SHORT[r["layout"]], r["mode"],
               DTYPE_SHORT[r["dtype"]], r["threads"], fmt_time(t["fastnorm"]["median"]),
               fmt_time(t["torch"]["median"]), fmt_ratio(r["speedup"].get("torch"))]
        for name, _ in peers:
            row += [fmt_time(t[name]["median"]) if name in t else "-",
                    fmt_ratio(r["speedup"].get(name))]
        row += [fmt_gbps(r["gbps"]), fmt_percent(r["bandwidth_fraction"])]
        rows.append(row)
    align = ["l"] * 5 + ["r"] * (len(headers) - 5)
    return render(headers, rows, markdown, align)


def summary_table(run, markdown=False):
    headers = ["threads", "cases", "geomean vs torch", "worst vs torch", "slower than torch",
               "copy GB/s", "large cases % BW (min)"]
    rows = []
    for threads in run["meta"]["threads"]:
        records = [r for r in run["results"] if r["threads"] == threads]
        if not records:
            continue
        ratios = [r["speedup"]["torch"] for r in records]
        worst = min(records, key=lambda r: r["speedup"]["torch"])
        large = [r["bandwidth_fraction"] for r in records if r["large"]]
        bandwidth = run["meta"]["bandwidth"].get(str(threads), {})
        rows.append([threads, len(records), fmt_ratio(geomean(ratios)),
                     f"{fmt_ratio(worst['speedup']['torch'])} ({worst['label']})",
                     sum(v < 1.0 for v in ratios),
                     f"{bandwidth.get('copy', float('nan')):.1f}",
                     fmt_percent(min(large)) if large else "-"])
    return render(headers, rows, markdown, ["r", "r", "r", "l", "r", "r", "r"])


def targets_table(run, markdown=False):
    headers = ["target", "needs", "worst measured", "where", "status"]
    rows = []
    for t in run["targets"]:
        if t["metric"] == "bandwidth":
            needs, worst = f"≥ {fmt_percent(t['threshold'])}", fmt_percent(t["worst"])
        else:
            needs, worst = f"≥ {t['threshold']:g}×", fmt_ratio(t["worst"])
        rows.append([t["target"], needs, worst, t["where"], t["status"]])
    return render(headers, rows, markdown, ["l", "r", "r", "l", "l"])


def accuracy_table(run, markdown=False):
    headers = ["layer", "layout", "shape", "fastnorm fwd", "torch fwd", "fastnorm bwd", "torch bwd"]
    rows = [[a["layer"], LAYOUT_SHORT[a["layout"]], shape_text(a["shape"]),
             fmt_error(a["fastnorm_forward"]), fmt_error(a["torch_forward"]),
             fmt_error(a["fastnorm_backward"]), fmt_error(a["torch_backward"])]
            for a in run["accuracy"]]
    return render(headers, rows, markdown, ["l", "l", "l", "r", "r", "r", "r"])


def header_lines(run):
    m = run["meta"]
    v = m["versions"]
    bandwidth = ", ".join(f"{t} thr: copy {b['copy']:.1f} GB/s, triad {b['triad']:.1f} GB/s"
                          for t, b in m["bandwidth"].items())
    load = m["environment"].get("loadavg_start")
    return [
        f"Machine: {m['machine']['cpu']} ({m['machine']['cpus']} CPUs, "
        f"L3 {m['machine']['llc_bytes'] // 2**20} MiB), {m['machine']['platform']}",
        f"Versions: fastnorm {v['fastnorm']} ({v['fastnorm_kernels']}), torch {v['torch']}, "
        f"numpy {v['numpy']}, onnxruntime {v.get('onnxruntime') or 'not installed'}, "
        f"Python {v['python']}",
        f"Mode: {m['mode']}{', fastnorm forwards into preallocated out=' if m.get('fastnorm_preallocated_out') else ''}, threads {', '.join(map(str, m['threads']))} (fastnorm and torch set "
        f"alike; NumPy is single-threaded), "
        f"{'steady' if m.get('steady_malloc') else 'default'} malloc thresholds, {m['started']}",
        f"Memory bandwidth (same run, torch STREAM-like on {m['bandwidth_array_mib']} MiB arrays): "
        f"{bandwidth}",
        f"Load average at start: {load[0]:.2f}" if load else "",
    ]


# ---------------------------------------------------------------- outputs

def terminal_report(run):
    parts = [*filter(None, header_lines(run)), "", results_table(run), "",
             summary_table(run), "", targets_table(run)]
    if run["accuracy"]:
        parts += ["", "Accuracy: max abs error vs float64 reference, float32 data with mean 1e4, std 1",
                  accuracy_table(run)]
    if run["notes"]:
        parts += ["", "Notes:", *(f"  - {n}" for n in run["notes"])]
    return "\n".join(parts)


METHOD = (
    "Each case times fastnorm and its peers interleaved (every round runs each once, in rotated "
    "order) and reports medians; a ratio is the median over rounds of peer time / fastnorm time "
    "in the same round (> 1: fastnorm faster; a slow phase of the machine hits both sides of a "
    "round), medians' ratio for NumPy's reused timings. "
    "fastnorm and torch run at the same thread count; NumPy, single-threaded, is timed at the "
    "first thread count and reused for the others. GB/s counts the one-pass minimum traffic "
    "(forward: read x + write y; backward: read x, dy + write dx; fwd+bwd: both), and % BW "
    "divides it by the copy bandwidth measured in the same run (forwards allocate their output, "
    "as a user's call does; the runner fixes glibc's malloc thresholds so that arrays below "
    "32 MiB reuse heap memory for every library, unless `--default-malloc`; from 32 MiB torch's "
    "output is fresh, page-faulted memory each call; fastnorm's outputs from 8 MiB come from its "
    "output pool; `--fastnorm-out` writes into one preallocated array instead). "
    "torch forward runs under "
    "no_grad/inference_mode; torch backward is autograd (`torch.autograd.grad` of input and "
    "parameters with a retained graph). For layers without running statistics `train` is the "
    "forward.")


def markdown_report(run):
    parts = ["<!-- bench:start -->", *(f"{line}  " for line in header_lines(run) if line), "",
             METHOD, "", results_table(run, markdown=True), "", summary_table(run, markdown=True),
             "", "Targets from the tracker issues:", "", targets_table(run, markdown=True)]
    if run["accuracy"]:
        parts += ["", "Accuracy: max abs error against a float64 reference, float32 input with "
                  "mean 1e4 and std 1 (training forward output, input gradient):", "",
                  accuracy_table(run, markdown=True)]
    if run["notes"]:
        parts += ["", *(f"- {n}" for n in run["notes"])]
    parts.append("<!-- bench:end -->")
    return "\n".join(parts) + "\n"


def write_json(run, path):
    with open(path, "w") as f:
        json.dump(run, f, indent=1, default=str)


def write_chart(run, path):
    """Speedup against torch per case (log scale); returns False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    threads = run["meta"]["threads"]
    labels = list(dict.fromkeys(r["label"] for r in run["results"]))
    if not labels:
        return False
    speedups = {(r["label"], r["threads"]): r["speedup"]["torch"] for r in run["results"]}
    height = 0.8 / len(threads)
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.22 * len(labels) * max(1, len(threads) / 2)))
    for k, n in enumerate(threads):
        positions = [i + (k - (len(threads) - 1) / 2) * height for i in range(len(labels))]
        values = [speedups.get((label, n), float("nan")) for label in labels]
        ax.barh(positions, values, height=height, label=f"{n} thread{'s' if n > 1 else ''}")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ticks = [2.0 ** k for k in range(-4, 8)]
    finite = [v for v in speedups.values() if v and v > 0]
    low, high = min(finite + [1.0]) / 1.3, max(finite + [1.0]) * 1.3
    ax.set_xlim(low, high)
    ax.set_xticks([t for t in ticks if low <= t <= high])
    ax.set_xticklabels([f"{t:g}×" for t in ticks if low <= t <= high])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over torch CPU (torch time / fastnorm time, log scale)")
    ax.set_title(f"fastnorm vs torch {run['meta']['versions']['torch']} ({run['meta']['mode']})")
    ax.legend(loc="lower right")
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
