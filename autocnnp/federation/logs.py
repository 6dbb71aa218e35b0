"""Flower's console: its warnings stay, its per-message INFO lines and deprecation notices go (the
federation's own ``autocnnp:`` lines say what happens)."""

from __future__ import annotations

import logging


def say(text: str) -> None:
    print(f"autocnnp: {text}", flush=True)


def quiet_flower() -> None:
    logger = logging.getLogger("flwr")
    logger.setLevel(logging.WARNING)
    logger.addFilter(lambda record: "deprecated" not in record.getMessage().lower())
