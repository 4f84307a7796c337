"""Benchmarks that `python -m benchmarks.run_all` regenerates into docs/results/, and the cost and scale
measurements beside them (each runs alone: `python -m benchmarks.NAME --help`)."""
