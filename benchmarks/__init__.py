"""Side-by-side speed benchmarks of tfbn.

`python -m benchmarks.run_all` regenerates BENCHMARKS.md.
"""
