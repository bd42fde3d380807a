"""Training: the config, the validated plan, the trainer and loop, the optimizer, checkpoints, and
sampling from a run."""
