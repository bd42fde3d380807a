"""Data: corpus -> tokenizer -> token files + manifest (prepare), and the per-rank sampler."""
