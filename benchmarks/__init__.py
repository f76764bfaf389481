"""Benchmarks against timm, run from the repository root: ``python -m benchmarks NAME``; not installed."""
