"""Benchmarks: callers of ragkit's API that print figures (`ragkit bench ...`)."""
