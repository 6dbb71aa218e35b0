"""Training utilities: losses and segmentation metrics."""
