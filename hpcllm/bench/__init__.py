"""Benchmarks: `hpcllm bench train` (and, later, allreduce and pipeline)."""
