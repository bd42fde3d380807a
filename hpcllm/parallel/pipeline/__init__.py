"""Pipeline parallelism: the stage partition, point-to-point transport, and the GPipe / 1F1B
schedules."""
