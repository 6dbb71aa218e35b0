"""hyperparameters_injection: the <hyperparameters> section handed to training."""
