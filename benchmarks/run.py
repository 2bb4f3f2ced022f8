#!/usr/bin/env python
"""Benchmark fastnorm against torch CPU (and a NumPy floor, and ONNX Runtime when installed).

    python benchmarks/run.py --quick     # a handful of cases per layer, about a minute
    python benchmarks/run.py             # the full matrix (layers x modes x layouts x shapes
                                         # x float32/float64 x 1 and all threads)
    python benchmarks/run.py --help      # selecting layers, threads, dtypes, peers, output

Writes benchmarks/results/latest.{json,md,png} (and a time-stamped JSON) and
prints a table. The memory bandwidth ceiling is measured in the same run.
"""
import argparse
import ctypes
import dataclasses
import datetime
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: make the checkout's packages importable
    sys.path.insert(0, ROOT)

from benchmarks import accuracy, bandwidth, cases, peers, report, targets, timing  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results")
ENV_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "OMP_PROC_BIND", "OMP_PLACES", "GOMP_SPINCOUNT",
            "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "FASTNORM_ISA")


def available_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _csv(kind, allowed=None):
    def parse(text):
        items = [item.strip() for item in text.split(",") if item.strip()]
        if kind is int:
            values = [int(item) for item in items]
            if any(v < 1 for v in values):
                raise argparse.ArgumentTypeError("thread counts must be >= 1")
            return list(dict.fromkeys(values))
        bad = [item for item in items if allowed and item not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
        return items
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a handful of float32 cases per layer (~1 min)")
    size.add_argument("--full", action="store_true", help="the whole matrix (the default)")
    size.add_argument("--smoke", action="store_true",
                      help="tiny shapes, 2 rounds, small bandwidth arrays: checks the runner, measures nothing")
    p.add_argument("--threads", type=_csv(int), help="thread counts, e.g. 1,2 (default: 1 and all CPUs)")
    p.add_argument("--layers", type=_csv(str, cases.LAYER_NAMES), help="e.g. BatchNorm2d,LayerNorm")
    p.add_argument("--dtype", type=_csv(str, cases.DTYPES), help="float32,float64")
    p.add_argument("--modes", type=_csv(str, cases.MODES), help=",".join(cases.MODES))
    p.add_argument("--layouts", type=_csv(str, cases.LAYOUTS), help=",".join(cases.LAYOUTS))
    p.add_argument("--peers", type=_csv(str, ("numpy", "onnxruntime")), default=["numpy", "onnxruntime"],
                   help="peers besides torch (default numpy,onnxruntime; onnxruntime is skipped "
                        "with a note when not installed)")
    p.add_argument("--fastnorm-out", action="store_true",
                   help="fastnorm forwards write into a preallocated out= array (excludes the page "
                        "faults of fresh output memory; torch still allocates)")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc thresholds dynamic (see steady_malloc)")
    p.add_argument("--budget", type=float, help="seconds of timing rounds per measurement")
    p.add_argument("--bandwidth-mib", type=int, help="STREAM array size in MiB (default 256)")
    p.add_argument("--no-accuracy", action="store_true", help="skip the accuracy table")
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory (default benchmarks/results)")
    p.add_argument("--markdown", action="store_true", help="print the Markdown report, not the text one")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    return p.parse_args(argv)


# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 << 20   # glibc's largest allowed mmap threshold on 64-bit


def steady_malloc():
    """Fix glibc's malloc thresholds for the run: arrays below 32 MiB come from a heap
    that is never trimmed. By default glibc moves both thresholds with the sizes freed,
    so whether one library's 8-32 MiB output is fresh memory (page faults and zeroing,
    up to 2x its time) depended on what the previous candidate of the round had
    allocated and freed: torch's LayerNorm+add (4096,768) forward took 2.3 ms or 7.6 ms
    depending on whether fastnorm's outputs came from malloc or its own pool. Arrays of
    32 MiB and more are still mapped fresh on every call (torch's and NumPy's; fastnorm
    pools its outputs). Returns whether glibc accepted the settings."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
                and mallopt(M_TRIM_THRESHOLD, 1 << 30))


def import_fastnorm():
    try:
        import fastnorm
    except ImportError as error:
        sys.exit(f"cannot import fastnorm ({error}). Build it first: "
                 "`python setup.py build_ext --inplace` or `pip install -e .`")
    return fastnorm


# ------------------------------------------------------------------ metadata

def machine_info():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpus": available_cpus(), "cpu_count": os.cpu_count(),
            "llc_bytes": bandwidth.last_level_cache_bytes(), "platform": platform.platform(),
            "memory_bytes": _total_memory()}


def _total_memory():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return None


def versions(fastnorm, torch):
    import numpy
    found = {"python": platform.python_version(), "numpy": numpy.__version__,
             "torch": torch.__version__, "fastnorm": fastnorm.__version__,
             "fastnorm_path": os.path.dirname(fastnorm.__file__),
             "fastnorm_kernels": f"{fastnorm._kernels.ISA}, OpenMP "
                                 f"{'on' if fastnorm._kernels.OPENMP_ENABLED else 'off'}"}
    for name in ("onnxruntime", "onnx", "matplotlib"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = None
    return found


def environment():
    env = {name: os.environ.get(name) for name in ENV_VARS}
    env["loadavg_start"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return env


# ------------------------------------------------------------------ running

class Runner:
    def __init__(self, fastnorm, peer_list, settings, ceiling):
        self.fastnorm, self.peers = fastnorm, peer_list
        self.torch = peers.find(peer_list, "torch").torch
        self.settings, self.ceiling = settings, ceiling
        self.llc = bandwidth.last_level_cache_bytes()
        self.notes = []
        self._data_key, self._data = None, None
        self._unthreaded = {}  # (case, peer name) -> Timing of peers that use one thread

    def set_threads(self, n):
        self.fastnorm.set_num_threads(n)
        self.torch.set_num_threads(n)
        return {"fastnorm": self.fastnorm.get_num_threads(), "torch": self.torch.get_num_threads()}

    def data(self, case):
        """x and dy for the case, shared by consecutive cases with the same shape/layout/dtype."""
        if case.data_key != self._data_key:
            self._data = None  # free the previous arrays first
            import numpy as np
            rng = np.random.default_rng(0)
            self._data = (cases.make_array(case.dims, case.layout, case.dtype, rng),
                          cases.make_array(case.dims, case.layout, case.dtype, rng))
            self._data_key = case.data_key
        return self._data

    def measure(self, case, n_threads):
        """One record: every peer timed on the case at n_threads. A peer that does not
        use threads (NumPy) is timed at the first thread count only and reused."""
        effective = self.set_threads(n_threads)
        x, dy = self.data(case)
        callables, skipped, reused = {}, {}, {}
        for peer in self.peers:
            if (case, peer.name) in self._unthreaded:
                reused[peer.name] = self._unthreaded[case, peer.name]
                continue
            reason = peer.skip_reason(case) or self._build(peer, case, x, dy, n_threads, callables)
            if reason is not None:
                skipped[peer.name] = reason
        if "fastnorm" not in callables or "torch" not in callables:
            self.notes.append(f"{case.label} {n_threads} thr not measured: {skipped}")
            return None
        timings = timing.measure(callables, self.settings)
        for peer in self.peers:
            if not peer.threaded and peer.name in timings:
                # no samples: reused beside other rounds, it is compared by medians
                self._unthreaded[case, peer.name] = dataclasses.replace(timings[peer.name],
                                                                        samples=())
        return self.record(case, n_threads, effective, {**timings, **reused}, skipped)

    @staticmethod
    def _build(peer, case, x, dy, n_threads, callables):
        """Add the peer's callable for the case; return why not if it cannot run it."""
        try:
            callables[peer.name] = peer.build(case, x, dy, n_threads)
        except peers.PeerUnavailable as error:
            return str(error)
        except Exception as error:  # a peer that cannot run this case must not stop the run
            return f"{peer.name} failed: {type(error).__name__}: {error}"
        return None

    def record(self, case, n_threads, effective, timings, skipped):
        ours = timings["fastnorm"].median
        gbps = case.min_bytes / ours / 1e9
        return {**case.as_dict(), "label": case.label, "threads": n_threads,
                "threads_effective": effective, "large": case.input_bytes >= 2 * self.llc,
                "timings": {name: t.as_dict() for name, t in timings.items()},
                "skipped": skipped,
                "speedup": {name: timing.paired_ratio(t, timings["fastnorm"])
                            for name, t in timings.items() if name != "fastnorm"},
                "gbps": gbps, "bandwidth_fraction": gbps / self.ceiling[n_threads]}

    def run(self, case_list, thread_counts):
        """Records of every case at every thread count; thread settings restored afterwards."""
        total = len(case_list) * len(thread_counts)
        records, done, start = [], 0, time.perf_counter()
        initial = (self.fastnorm.get_num_threads(), self.torch.get_num_threads())
        try:
            for case in case_list:
                for n in thread_counts:
                    record = self.measure(case, n)
                    done += 1
                    if record is not None:
                        records.append(record)
                        progress(done, total, record, time.perf_counter() - start)
        finally:
            self.fastnorm.set_num_threads(initial[0])
            self.torch.set_num_threads(initial[1])
            self._data_key = self._data = None
        return records


def progress(done, total, record, elapsed):
    t = record["timings"]
    line = (f"[{done:>{len(str(total))}}/{total}] {record['label']} {record['threads']} thr: "
            f"fastnorm {report.fmt_time(t['fastnorm']['median'])}, "
            f"torch {report.fmt_time(t['torch']['median'])} "
            f"({report.fmt_ratio(record['speedup']['torch'])}), "
            f"{report.fmt_percent(record['bandwidth_fraction'])} BW  [{elapsed:.0f} s]")
    print(line, file=sys.stderr, flush=True)


def measure_ceiling(thread_counts, mib, repeats):
    return {n: bandwidth.measure_bandwidth(n, mib, repeats) for n in thread_counts}


def main(argv=None):
    args = parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    case_list = cases.select_cases(quick=mode != "full", layers=args.layers, dtypes=args.dtype,
                                   modes=args.modes, layouts=args.layouts, tiny_only=mode == "smoke")
    if mode == "full" and not args.list:
        log("full mode measures the whole matrix and takes a long while; --quick takes about a minute")
    if args.list:
        for case in case_list:
            print(case.label)
        return None

    steady = False if args.default_malloc else steady_malloc()
    fastnorm = import_fastnorm()
    peer_list = peers.make_peers(fastnorm, ["torch", *args.peers], args.fastnorm_out)
    thread_counts = args.threads or list(dict.fromkeys([1, available_cpus()]))
    settings = {"smoke": timing.SMOKE, "quick": timing.QUICK, "full": timing.FULL}[mode]
    if args.budget is not None:
        settings = timing.Settings(**{**settings.__dict__, "budget": args.budget})
    mib = args.bandwidth_mib or (16 if mode == "smoke" else 256)
    repeats = 2 if mode == "smoke" else 5

    fastnorm_peer, torch_peer = peers.find(peer_list, "fastnorm"), peers.find(peer_list, "torch")
    notes = _skip_notes(case_list, peer_list, fastnorm_peer)
    runnable = [c for c in case_list if fastnorm_peer.skip_reason(c) is None]
    log(f"fastnorm {fastnorm.__version__} from {os.path.dirname(fastnorm.__file__)}; "
        f"{len(runnable)} cases x {len(thread_counts)} thread counts ({mode} mode)")
    for note in notes:
        log(f"  note: {note}")

    started = datetime.datetime.now().isoformat(timespec="seconds")
    env = environment()
    busy = _busy_note(env["loadavg_start"])
    if busy:
        notes.append(busy)
        log(f"  note: {busy}")
    log(f"measuring memory bandwidth ({mib} MiB arrays) ...")
    first = measure_ceiling(thread_counts, mib, repeats)
    ceiling = {n: first[n]["copy"] for n in thread_counts}

    runner = Runner(fastnorm, peer_list, settings, ceiling)
    t0 = time.perf_counter()
    records = runner.run(runnable, thread_counts)
    seconds = time.perf_counter() - t0

    # the ceiling again after the cases: the best of both, so drift cannot flatter the % BW
    second = measure_ceiling(thread_counts, mib, repeats)
    best = {n: max((first[n], second[n]), key=lambda b: b["copy"]) for n in thread_counts}
    for r in records:
        r["bandwidth_fraction"] = r["gbps"] / best[r["threads"]]["copy"]

    accuracy_rows = []
    if not args.no_accuracy:
        log("accuracy on hard data ...")
        names = {c.layer.name for c in case_list}
        accuracy_rows, accuracy_notes = accuracy.accuracy_table(fastnorm_peer, torch_peer, names)
        notes += accuracy_notes
    env["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    run = {
        "meta": {"mode": mode, "started": started, "seconds": seconds, "command": sys.argv,
                 "threads": thread_counts, "peers": [p.name for p in peer_list],
                 "fastnorm_preallocated_out": args.fastnorm_out, "steady_malloc": steady,
                 "timing": settings.__dict__, "machine": machine_info(),
                 "versions": versions(fastnorm, torch_peer.torch), "environment": env,
                 "bandwidth": {str(n): b for n, b in best.items()},
                 "bandwidth_runs": {"start": first, "end": second}, "bandwidth_array_mib": mib},
        "results": records, "accuracy": accuracy_rows, "notes": notes + runner.notes,
    }
    run["targets"] = targets.evaluate(records)
    write_outputs(run, args.out)
    print(report.markdown_report(run) if args.markdown else report.terminal_report(run))
    return run


def _skip_notes(case_list, peer_list, fastnorm_peer):
    """One note per layer fastnorm lacks and per peer that is not installed."""
    notes = []
    for name in dict.fromkeys(c.layer.name for c in case_list):
        case = next(c for c in case_list if c.layer.name == name)
        reason = fastnorm_peer.skip_reason(case)
        if reason:
            notes.append(f"{name} skipped: {reason}")
    for peer in peer_list:
        if peer.available():
            notes.append(f"{peer.name} skipped: {peer.available()}")
    return notes


def _busy_note(loadavg):
    cpus = available_cpus()
    if loadavg and loadavg[0] > 0.5 * cpus:
        return (f"the machine was busy at the start (load average {loadavg[0]:.2f} on {cpus} CPUs): "
                "timings are noisy, those with several threads most")
    return None


def write_outputs(run, out_dir):
    """latest.{png,md,json} and a time-stamped copy of the JSON in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    chart = os.path.join(out_dir, "latest.png")
    if report.write_chart(run, chart):
        paths.append(chart)
    else:
        run["notes"].append("no chart: matplotlib is not installed (pip install matplotlib)")
    markdown = os.path.join(out_dir, "latest.md")
    with open(markdown, "w") as f:
        f.write(report.markdown_report(run))
    paths.append(markdown)
    stamp = run["meta"]["started"].replace(":", "").replace("-", "")
    for name in (f"bench-{run['meta']['mode']}-{stamp}.json", "latest.json"):
        paths.append(os.path.join(out_dir, name))
        report.write_json(run, paths[-1])
    log("wrote " + ", ".join(os.path.relpath(p) for p in paths))


def log(message):
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
