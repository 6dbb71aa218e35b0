"""tracker: where a run's events go besides metrics.csv (<monitoring> tracker, several at once)."""
