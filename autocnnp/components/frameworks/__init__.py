"""framework: what the ranks train with (torch, tensorflow); every other action is resolved for it."""
