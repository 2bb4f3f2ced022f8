"""Interleaved median timing of several candidates doing the same work.

Each round runs every candidate once, in an order rotated from round to round,
so slow drifts of the machine (other processes, turbo, thermal) hit all of
them alike. A candidate's sample is `loops` back-to-back calls, with loops
chosen so that a sample lasts at least `min_sample` seconds (this keeps
timer overhead and the previous candidate's leftover thread spinning out of
microsecond-scale calls). Rounds continue until the time budget is spent and
at least `min_rounds` were run. The result is the median per-call time, and the
per-round times, from which `paired_ratio` compares two candidates round by round.
"""
import gc
import math
import statistics
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Settings:
    budget: float = 1.0        # seconds of rounds per measurement (after warm-up)
    min_rounds: int = 5
    max_rounds: int = 2000
    min_sample: float = 0.002  # seconds a sample lasts at least
    warmup: float = 0.05       # seconds of warm-up calls per candidate (at least one call)


QUICK = Settings(budget=0.15, min_rounds=5, max_rounds=400, warmup=0.02)
FULL = Settings()
SMOKE = Settings(budget=0.0, min_rounds=2, max_rounds=2, min_sample=0.0, warmup=0.0)


@dataclass(frozen=True)
class Timing:
    median: float   # seconds per call
    minimum: float
    q1: float
    q3: float
    rounds: int
    loops: int      # calls per sample
    samples: tuple = ()     # per-call time of each round, in round order

    def as_dict(self):
        """The summary (the samples stay out of the reports)."""
        return {k: v for k, v in asdict(self).items() if k != "samples"}


def paired_ratio(other, ours):
    """Median over rounds of other's time / ours in the same round (> 1: ours faster).
    Each round runs both back to back, so a slow phase of the machine that spans a few
    rounds moves both times of those rounds and leaves their ratio; the ratio of the
    two medians moves whenever the phase hits one candidate's median sample."""
    ratios = [a / b for a, b in zip(other.samples, ours.samples) if b > 0]
    if not ratios:
        return other.median / ours.median
    return statistics.median(ratios)


def _warm_up(fn, seconds):
    """Call fn for about `seconds` (at least once); return the time of the fastest call."""
    best = math.inf
    start = time.perf_counter()
    calls = 0
    while True:
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        best = min(best, t1 - t0)
        calls += 1
        if t1 - start >= seconds or calls >= 1000:
            return best


def _sample(fn, loops):
    t0 = time.perf_counter()
    for _ in range(loops):
        fn()
    return (time.perf_counter() - t0) / loops


def measure(candidates, settings=FULL):
    """Time each zero-argument callable of the dict {name: fn}; returns {name: Timing}."""
    names = list(candidates)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        loops = {}
        for name in names:
            per_call = _warm_up(candidates[name], settings.warmup)
            loops[name] = max(1, math.ceil(settings.min_sample / max(per_call, 1e-9)))
        samples = {name: [] for name in names}
        start = time.perf_counter()
        rounds = 0
        while True:
            for i in range(len(names)):
                name = names[(i + rounds) % len(names)]
                samples[name].append(_sample(candidates[name], loops[name]))
            rounds += 1
            elapsed = time.perf_counter() - start
            if rounds >= settings.max_rounds or (rounds >= settings.min_rounds
                                                 and elapsed >= settings.budget):
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: _summarize(samples[name], loops[name]) for name in names}


def _summarize(values, loops):
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return Timing(statistics.median(values), min(values), q1, q3, len(values), loops,
                  tuple(values))
