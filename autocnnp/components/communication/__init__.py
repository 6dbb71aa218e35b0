"""communication_init: how the ranks join (returns a World)."""
