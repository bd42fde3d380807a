"""Context parallelism: the sequence split over a group of ranks (ring attention)."""
