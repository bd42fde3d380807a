"""Parallelism: the layout and grid (every communicator and Horovod process set, made eagerly),
parameter sharding, data parallelism, the task pool; tensor/ and pipeline/ below."""
