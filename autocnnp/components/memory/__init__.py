"""memory_allocation: how GPU memory is allocated."""
