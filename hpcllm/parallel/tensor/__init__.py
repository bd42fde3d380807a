"""Tensor parallelism (Megatron): the collectives over the TP group, the autograd mappings that
communicate, and the layers that compute."""
