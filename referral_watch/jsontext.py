"""Find the parts of a JSON text without decoding it, at any depth.

The API pages are split with msgspec, which is fast but stops (RecursionError) at about 1,000
levels of nesting anywhere in the text, even inside a field nobody reads. This scanner keeps no
stack of Python frames, so a hostile page still splits into its records: the deep one is then
set aside on its own and the others go on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

# A string (with its escapes), a bracket, a comma or a colon; everything else is a scalar.
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},:]')


class NotAnObject(ValueError):
    """The text is not a JSON object (or is cut off)."""


def top_level(text: str) -> dict[str, str]:
    """The members of the JSON object in ``text``: key -> the value's JSON text."""
    members: dict[str, str] = {}
    depth = 0
    key: str | None = None
    start = 0
    expect_key = False
    for match in _TOKEN.finditer(text):
        token = match.group()
        if depth == 1 and key is None and expect_key and token.startswith('"'):
            key = json.loads(token)
            continue
        if depth == 1 and token == ":" and key is not None:
            start = match.end()
            continue
        if token in "[{":
            depth += 1
            expect_key = depth == 1
        elif token in "]}":
            depth -= 1
            if depth == 0:
                _close(members, key, text, start, match.start())
                return members
        elif token == "," and depth == 1:
            _close(members, key, text, start, match.start())
            key, expect_key = None, True
    raise NotAnObject("not a complete JSON object")


def _close(members: dict[str, str], key: str | None, text: str, start: int, end: int) -> None:
    if key is not None:
        members[key] = text[start:end].strip()


def array_items(text: str) -> Iterator[str]:
    """The JSON texts of the items of the JSON array in ``text``."""
    if not text.startswith("["):
        raise NotAnObject("not a JSON array")
    depth = 0
    start = 1
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
        elif token in "]}":
            depth -= 1
            if depth == 0:
                item = text[start : match.start()].strip()
                if item:
                    yield item
                return
        elif token == "," and depth == 1:
            yield text[start : match.start()].strip()
            start = match.end()
    raise NotAnObject("not a complete JSON array")


def member(text: str, key: str) -> Any:
    """One top-level member of the object in ``text``, decoded (None when absent or when the
    text is not an object): e.g. a record's id when the record is too deep to decode."""
    try:
        value = top_level(text).get(key)
        return None if value is None else json.loads(value)
    except (ValueError, RecursionError):
        return None
