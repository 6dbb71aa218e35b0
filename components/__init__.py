"""Built-in components that job files name. Importing this registers them all (cheaply: no torch)."""

from . import architectures, datasets, environment, strategies, task, training  # noqa: F401
