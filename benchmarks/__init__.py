"""Measurements run by hand (`python -m benchmarks.<name>`); numbers are printed, never asserted in tests."""
