"""Observing a run: metrics.jsonl, the loss plot, MFU, and the per-step phase timer."""
