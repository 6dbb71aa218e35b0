"""Keras imported on a chosen backend, without leaving ``KERAS_BACKEND`` set for the subprocesses the process starts."""

from __future__ import annotations

import os
import sys


def import_keras(backend: str = "torch"):
    """Keras on ``backend``; a clear error when Keras was already imported with another one."""
    loaded = sys.modules.get("keras")
    if loaded is None:
        before = os.environ.get("KERAS_BACKEND")
        os.environ["KERAS_BACKEND"] = backend  # Keras reads it once, when imported: not left for subprocesses
        try:
            import keras as loaded
        finally:
            if before is None:
                del os.environ["KERAS_BACKEND"]
            else:
                os.environ["KERAS_BACKEND"] = before
    found = loaded.backend.backend()
    if found != backend:
        raise RuntimeError(f"Keras is already loaded with the {found!r} backend in this process, but this job's "
                           f"Keras network trains on the {backend} backend: set KERAS_BACKEND={backend} (or import "
                           "nothing that imports keras before the job builds its network)")
    return loaded
