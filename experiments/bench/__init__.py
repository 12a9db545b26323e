"""Benchmarks: ``python -m experiments.bench.<name> --out FILE`` (see BENCHMARKS.md)."""
