"""Benchmarks and the learning study; scripts run from the repository root (benchmarks/README.md)."""
