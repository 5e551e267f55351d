"""Benchmarks. `python -m bench` runs the end-to-end suite (bench/e2e); the other
modules here are component benchmarks run as plain scripts (`python bench/webhook.py`)."""
