"""lr_policy: learning-rate policies (protocols.LRPolicy)."""
