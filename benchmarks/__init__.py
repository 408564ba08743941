"""Benchmark scripts for detr-viz (not tests: they print Markdown tables and assert nothing timed).

Run them from the repository root as modules, e.g. ``python -m benchmarks.inference --quick``.
"""
