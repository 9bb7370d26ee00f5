"""The sections of scripts/bench_gpu.py, one concern per module."""
