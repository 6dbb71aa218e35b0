"""The CNN-Parallelism-Generator: registries, the component tree and its assembly."""
