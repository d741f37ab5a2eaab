"""Benchmarks of the gateway: setup through the control plane, load, scale."""
