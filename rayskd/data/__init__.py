"""Datasets, samplers and the built-in demo task."""
