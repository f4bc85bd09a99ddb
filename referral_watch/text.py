"""PURE: text shaping shared by every output: Markdown escaping, clipping, fitting, columns.

Every function here takes and returns plain strings; none knows about leads or channels.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

__all__ = [
    "Part",
    "clip",
    "columns",
    "cut",
    "fit",
    "iso_utc",
    "md",
]

# --- Markdown --------------------------------------------------------------------------------

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|])")


def md(text: object) -> str:
    """User text made safe for one line of Markdown: whitespace collapsed, markup escaped."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


# --- lengths ---------------------------------------------------------------------------------


def clip(text: str, limit: int) -> str:
    """One line (whitespace collapsed) of at most ``limit`` characters, '…' when cut."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def cut(text: str, limit: int) -> str:
    """Hard cut as a last resort, never leaving a dangling Markdown escape."""
    if len(text) <= limit:
        return text
    if limit <= 0:
        return ""
    head = text[: limit - 1].rstrip()
    if (len(head) - len(head.rstrip("\\"))) % 2:
        head = head[:-1]
    return head + "…"


@dataclass(frozen=True)
class Part:
    """One line or paragraph of a body; optional ones are left out (or shortened) when short."""

    text: str
    essential: bool = True
    shrink: Callable[[int], str] | None = None  # a version of the part within n characters


def fit(title: str, parts: Sequence[Part], max_length: int | None, sep: str = "\n") -> str:
    """Join the parts with ``sep``: essential ones always, optional ones (in order) while
    len(title) + len(body) stays within max_length; the body is cut as a last resort."""
    if max_length is None:
        return sep.join(p.text for p in parts)
    budget = max_length - len(title)
    kept = {i: p.text for i, p in enumerate(parts) if p.essential}

    def size(lines: dict[int, str]) -> int:
        return len(sep.join(text for _, text in sorted(lines.items())))

    for index, part in enumerate(parts):
        if part.essential:
            continue
        if size({**kept, index: part.text}) <= budget:
            kept[index] = part.text
        elif part.shrink is not None:
            room = budget - size({**kept, index: ""})
            if room >= 40:  # a stub of a line helps nobody
                kept[index] = part.shrink(room)
    body = sep.join(text for _, text in sorted(kept.items())).rstrip()
    return cut(body, budget)


# --- terminal layout and machine formats ------------------------------------------------------


def columns(rows: Sequence[Sequence[str]], indent: str = "", gap: str = "  ") -> list[str]:
    """Rows as left-aligned columns, each as wide as its widest cell; trailing space removed."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        (indent + gap.join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))).rstrip()
        for row in rows
    ]


def iso_utc(moment: datetime) -> str:
    """'2026-03-02T09:30:00Z': the timestamp form of JSON and CSV output."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
