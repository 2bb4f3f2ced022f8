"""fastnorm's benchmark suite: `python benchmarks/run.py --quick` (see run.py)."""
