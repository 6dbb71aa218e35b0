"""architecture_injection: segmentation networks (<CNN_archi>)."""
