"""Operator tooling: the parley CLI, configuration, local cluster runner, benchmarks."""
