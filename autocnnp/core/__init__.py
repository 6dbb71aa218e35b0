"""The core layer: errors and exit codes, the rank's place in the world, the run folder, atomic
files, how components declare settings, metric names. It imports nothing of autocnnp above it."""
