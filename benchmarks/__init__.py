"""Benchmarks of taps-cl, run from the repository root (a package of the source tree, not
installed): `python benchmarks/benchmark.py`, `python benchmarks/scale.py`,
`python benchmarks/team.py` (or `python -m benchmarks.benchmark` and so on)."""
