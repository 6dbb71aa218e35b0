"""Built-in components that job files name: one file per implementation, in the folder of its
extension point (generator/points.py). Nothing is registered by importing: the registry reads each
file's ``@component`` mark and ``Config`` without importing it (generator/registry.py)."""
