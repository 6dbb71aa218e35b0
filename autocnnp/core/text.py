"""Plain text tables for the console."""

from __future__ import annotations

from collections.abc import Sequence


def text_table(head: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 1, rule: bool = False) -> str:
    """``head`` and ``rows`` in aligned columns two spaces apart: the first ``left`` columns left-aligned, the
    others right-aligned; ``rule`` puts a line of dashes under the head."""
    widths = [max(len(str(x)) for x in column) for column in zip(head, *rows)]

    def line(cells) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join(map(line, [head, *([["-" * w for w in widths]] if rule else []), *rows]))
