"""device_placement: which device each rank computes on."""
