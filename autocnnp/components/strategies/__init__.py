"""dist_strategy: distributed optimizers (protocols.Strategy)."""
