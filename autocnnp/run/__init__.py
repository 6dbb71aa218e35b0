"""Run & manage: launch the ranks, run the generator on each, watch them."""
