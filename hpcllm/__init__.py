"""hpcllm: train GPT language models on HPC clusters with MPI ranks, Horovod and Slurm."""

__version__ = "0.1.0"
