"""Benchmarks behind `hpcllm bench train|allreduce|pipeline|startup`."""
