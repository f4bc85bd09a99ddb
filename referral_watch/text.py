"""PURE: text from outside made safe, and text shaping shared by every output.

Text from Partner Center is data (SPEC behaviour 9): a customer name, a note or a team member's
name may hold terminal escape sequences, bidirectional overrides, zero-width characters or chat
markup. Two steps keep it data:

1. **At the edge** (``model.parse_referral``): ``clean_line`` / ``clean_notes`` make control and
   bidi characters visible (``<U+202E>``), drop NUL and zero-width spoofing characters, and clip
   over-long fields. The stored raw JSON keeps the original for the record.
2. **On the way out**: each channel's escaper (``escaper(markup)``: Markdown backslashes for
   Teams, email and webhooks; entities for Slack), ``csv_cell`` for spreadsheets and
   ``terminal`` for everything printed.

Every function here takes and returns plain strings; none knows about leads or channels.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

__all__ = [
    "NAME_MAX",
    "NOTES_MAX",
    "Part",
    "clean_line",
    "clean_notes",
    "clip",
    "columns",
    "csv_cell",
    "currency_code",
    "cut",
    "escape_slack",
    "escaper",
    "fit",
    "iso_utc",
    "md",
    "terminal",
    "visible",
]

NAME_MAX = 200  # characters of a name or any other one-line field
NOTES_MAX = 10_000  # characters of notes kept (280 are shown in a message)

# --- the sanitising step ----------------------------------------------------------------------

# C0 and C1 controls and DEL, bidirectional embeddings/overrides (U+202A-202E) and isolates
# (U+2066-2069), the interlinear annotation marks, lone surrogates: shown as <U+XXXX>.
_SHOWN = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ufff9-\ufffb\ud800-\udfff]")
# Zero-width characters that only hide things (spoofed look-alike names, split keywords).
_HIDDEN = re.compile("[\u200b\u2060\ufeff\u180e]")
# Joiners are part of emoji sequences and of Arabic, Persian and Indic writing: kept there,
# dropped next to ASCII (where they only split a word such as 'Micro\u200dsoft') or at an edge.
_JOINER_SPOOF = re.compile("(?<![^\x00-\x7f])[\u200c\u200d]|[\u200c\u200d](?![^\x00-\x7f])")
_NOTE_TROUBLE = re.compile("[^\t\n\x20-\x7e]")
_LINE_BREAKS = re.compile("\r\n|[\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")


def _shown(match: re.Match[str]) -> str:
    char = match.group(0)
    return "" if char == "\x00" else f"<U+{ord(char):04X}>"


def visible(text: str) -> str:
    """``text`` with no control, bidi or hiding character left: NUL and zero-width spoofing
    characters removed, the others shown as ``<U+202E>``. Idempotent; emoji and right-to-left
    scripts stay as they are."""
    if text.isascii() and text.isprintable():
        return text  # the common case, at no cost
    text = _JOINER_SPOOF.sub("", _HIDDEN.sub("", text))
    return _SHOWN.sub(_shown, text)


def clean_line(value: str, limit: int = NAME_MAX) -> str:
    """A one-line field from outside: whitespace (line breaks, tabs) collapsed to single
    spaces, then made ``visible``, then clipped to ``limit`` characters."""
    if len(value) <= limit:
        return _clean_short(value, limit)  # statuses, countries, names repeat across records
    head = value[: limit * 4 + 64]  # bounded work for a 1 MB "name"
    return clip(visible(" ".join(head.split())), limit)


@lru_cache(maxsize=4096)
def _clean_short(value: str, limit: int) -> str:
    if value.isascii() and value.isprintable() and "  " not in value and value == value.strip():
        return value
    return clip(visible(" ".join(value.split())), limit)


def clean_notes(value: str, limit: int = NOTES_MAX) -> str:
    """Free text from outside: line breaks and tabs kept (as \\n and \\t), everything else
    made ``visible``, clipped to ``limit`` characters."""
    head = value[: limit * 4 + 64]
    if not _NOTE_TROUBLE.search(head):  # printable ASCII, tabs and newlines: nothing to do
        kept = head.strip()
        return kept if len(kept) <= limit else kept[: limit - 1].rstrip() + "…"
    head = _LINE_BREAKS.sub("\n", head)
    lines = (visible(part) for part in head.split("\n"))
    kept = "\n".join(_keep_tabs(line) for line in lines).strip()
    return kept if len(kept) <= limit else kept[: limit - 1].rstrip() + "…"


def _keep_tabs(line: str) -> str:
    return line.replace("<U+0009>", "\t")


def terminal(text: str) -> str:
    """Text safe to print on a terminal: line breaks kept, every other control made visible."""
    return "\n".join(visible(line) for line in text.split("\n"))


_CURRENCY = re.compile("[A-Z]{3}")


def currency_code(value: str) -> str:
    """An ISO 4217 code ('usd' -> 'USD'), or '' when the text is none (it is then not shown)."""
    code = value.strip().upper()
    return code if _CURRENCY.fullmatch(code) and _is_currency(code) else ""


@lru_cache(maxsize=512)
def _is_currency(code: str) -> bool:
    from babel.numbers import is_currency  # Babel's list of ISO 4217 codes

    return bool(is_currency(code))


# --- escaping per output ----------------------------------------------------------------------

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|])")


def md(text: object) -> str:
    """User text made safe for one line of Markdown (Teams, email, webhooks): whitespace
    collapsed, controls made visible, markup escaped with backslashes, so no link, image,
    emphasis, HTML tag or Teams ``<at>`` mention comes from it."""
    return _MD_SPECIAL.sub(r"\\\1", visible(" ".join(str(text).split())))


# Apprise turns our CommonMark into Slack mrkdwn: it makes '\<' and '\>' entities and '&' an
# entity, drops the backslash of '\[' and '\]', and keeps any other backslash pair as it is
# (Slack then shows the backslash: mrkdwn has no escapes). So only what could become live is
# escaped: '<' and '>' (mentions such as <!channel>, <@U...>, links <http://x|y>) and '[' and ']'
# (a Markdown link Apprise would turn into <url|label>). A backslash of the text right before
# one of those is doubled so it cannot swallow the escape.
_SLACK_SPECIAL = re.compile(r"\\(?=[<>\[\]])|[<>\[\]]")


def escape_slack(text: object) -> str:
    """User text made safe for one line of a Slack message sent through Apprise's Markdown."""
    flat = visible(" ".join(str(text).split()))
    return _SLACK_SPECIAL.sub(lambda m: "\\" + m.group(0), flat)


def escaper(markup: str) -> Callable[[object], str]:
    """The escaping function for a channel's markup ('slack' or 'markdown')."""
    return escape_slack if markup == "slack" else md


_FORMULA_START = ("=", "+", "-", "@")


def csv_cell(value: object) -> object:
    """A spreadsheet cell that cannot run as a formula: text starting with = + - @ gets a
    leading apostrophe (a tab or carriage return is made visible first); numbers stay numbers."""
    if not isinstance(value, str):
        return value
    text = visible(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


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
