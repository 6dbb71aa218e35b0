"""checkpoint: when and how training state is saved (protocols.Checkpointer)."""
