"""task_definition: what is learnt and how it is scored."""
