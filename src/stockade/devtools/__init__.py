"""Helpers for tests and benchmarks: a throw-away PostgreSQL cluster and a real
``stockade server`` process on a free port."""
