"""Training: the loop every rank runs, its losses, metrics, monitoring and determinism."""
