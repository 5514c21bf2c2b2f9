"""Benchmarks of fanout against baselines on the same machine, in the same run: see README."""
