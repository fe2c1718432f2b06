"""Benchmarks: harness, suites, result tables and plots."""
