"""The engine: parse and validate a job file (nothing here imports torch)."""
