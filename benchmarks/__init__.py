"""Kernel and end-to-end benchmarks. Run from the repository root, e.g. `python -m benchmarks.rtd_loss`."""
