"""How a component declares its parameters: a dataclass whose fields are made with :func:`setting`.

::

    @dataclass
    class Config:
        warmup_epochs: int = setting(5, min=0, aliases=("warmup",), help="epochs of the linear warmup")

The engine binds the job's text onto such a Config (engine/values.py: types, bounds, aliases, located
errors); the implementation receives the bound Config and never re-declares a default or re-checks a
bound. Field types: ``int``, ``float``, ``bool``, ``str``, ``Path``, ``Literal[...]`` and ``X | None``.
"""

from __future__ import annotations

import dataclasses

REQUIRED = dataclasses.MISSING


def setting(default=REQUIRED, *, min=None, max=None, gt=None, aliases: tuple[str, ...] = (), help: str = "",
            must_exist: bool = False):
    """A Config field: its default, bounds (``min``/``max`` inclusive, ``gt`` exclusive), other spellings
    the job may use, a one-line help, and for paths whether they must exist."""
    metadata = {"min": min, "max": max, "gt": gt, "aliases": tuple(aliases), "help": help, "must_exist": must_exist}
    metadata = {k: v for k, v in metadata.items() if v is not None and v is not False and v != () and v != ""}
    if default is REQUIRED:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)

