"""PURE: translation setup and the locale-aware formats every message uses.

The only I/O is reading the packaged gettext catalogs
(``referral_watch/locale/<lang>/LC_MESSAGES/messages.po``) once per language. English is the
source language (the msgids); other languages come from the catalogs. Numbers and dates are
formatted by Babel for the channel's locale, in the channel's time zone.
"""

from __future__ import annotations

import gettext
import io
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from importlib import resources
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel import Locale, UnknownLocaleError
from babel.dates import format_skeleton, format_time, format_timedelta
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.numbers import format_decimal

__all__ = [
    "N_",
    "babel_locale",
    "money_text",
    "relative_text",
    "time_left_text",
    "translations",
    "when_text",
    "zone",
]


def N_(message: str) -> str:
    """Mark a constant for extraction; it is translated where it is used."""
    return message


@lru_cache(maxsize=64)
def babel_locale(name: str) -> Locale:
    """'nl-NL' -> Locale('nl', 'NL'); anything Babel does not know formats as en-US."""
    try:
        return Locale.parse(name.replace("-", "_"))
    except (ValueError, TypeError, UnknownLocaleError):
        return Locale("en", "US")


def _catalog_names(name: str) -> list[str]:
    locale = babel_locale(name)
    names = [str(locale)] if locale.territory else []
    return [*names, locale.language]


@lru_cache(maxsize=16)
def translations(name: str) -> gettext.NullTranslations:
    """The packaged catalog for a locale (most specific first); English needs none."""
    root = resources.files("referral_watch") / "locale"
    for candidate in _catalog_names(name):
        po_file = root / candidate / "LC_MESSAGES" / "messages.po"
        if not po_file.is_file():
            continue
        with po_file.open("rb") as handle:
            catalog = read_po(handle, locale=candidate)
        # Compile in memory so gettext handles plural forms; no .mo build step needed.
        compiled = io.BytesIO()
        write_mo(compiled, catalog)
        compiled.seek(0)
        return gettext.GNUTranslations(compiled)
    return gettext.NullTranslations()


@lru_cache(maxsize=64)
def zone(name: str) -> ZoneInfo:
    """The IANA zone, or UTC for a name this machine does not know."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def _zone_label(local: datetime, where: ZoneInfo) -> str:
    """CEST / PST / UTC; zones without an abbreviation are named: 'Asia/Dubai (UTC+04)'."""
    abbreviation = local.tzname() or ""
    if abbreviation[:1].isalpha():
        return abbreviation
    return f"{where.key} (UTC{abbreviation})"


def when_text(moment: datetime, timezone: str, locale: str) -> str:
    """'Sun, Oct 25, 2026, 2:30 AM CET' / 'zo 25 okt 2026, 02:30 CET'."""
    where = zone(timezone)
    babel = babel_locale(locale)
    local = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(where)
    date = format_skeleton("yMMMEd", local, locale=babel)
    clock = format_time(local, "short", locale=babel)
    pattern = str(babel.datetime_formats.get("medium", "{1} {0}")).replace("'", "")
    text = f"{pattern.replace('{1}', date).replace('{0}', clock)} {_zone_label(local, where)}"
    # CLDR puts a narrow no-break space before AM/PM; plain text is safer in every channel.
    return text.replace("\u202f", " ")


def money_text(amount: Decimal | None, currency: str, locale: str) -> str:
    """'25,000 USD' / '25.000 USD' (the ISO code always shown); '' when there is no value."""
    if amount is None:
        return ""
    pattern = "#,##0" if amount == amount.to_integral_value() else "#,##0.00"
    number = format_decimal(amount, format=pattern, locale=babel_locale(locale))
    return f"{number} {currency}".strip()


def _span(span: timedelta, _: Callable[[str], str]) -> str:
    minutes = int(span.total_seconds() // 60)
    days, rest = divmod(minutes, 24 * 60)
    hours, mins = divmod(rest, 60)
    if days:
        text = _("{days}d {hours}h") if hours else _("{days}d")
    elif hours:
        text = _("{hours}h {minutes}m") if mins else _("{hours}h")
    elif mins:
        text = _("{minutes}m")
    else:
        text = _("<1m")
    return text.format(days=days, hours=hours, minutes=mins)


def time_left_text(remaining: timedelta, locale: str) -> str:
    """Compact time left, floored to the minute: '3h 58m', '6d 4h', '45m', 'expired 2h ago'."""
    _ = translations(locale).gettext
    if remaining < timedelta(0):
        return _("expired {duration} ago").format(duration=_span(-remaining, _))
    return _span(remaining, _)


def relative_text(delta: timedelta, locale: str) -> str:
    """Babel's 'in 3 hours' / '2 uur geleden' (delta < 0 is in the past)."""
    return str(format_timedelta(delta, add_direction=True, locale=babel_locale(locale)))
