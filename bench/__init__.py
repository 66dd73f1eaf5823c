"""Benchmarks: each script prints a table and compares in one run (see README, Numbers)."""
