"""Who am I and where: launcher detection, the rank runtime, Slurm, the stall watchdog,
preemption and fault injection."""
