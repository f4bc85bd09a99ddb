"""All wording the product sends: alert -> title and Markdown body, localized.

PURE: no clock (``now`` is an argument), no network, no logging. The only I/O is reading the
packaged gettext catalogs (``referral_watch/locale/<lang>/LC_MESSAGES/messages.po``) once per
language. English is the source language (the msgids); other languages come from the catalogs.
Numbers and dates are formatted by Babel for the channel's locale, in the channel's time zone.

Per-tier Jinja2 overrides (``TierConfig.title`` / ``.body``) run in a sandbox and get the same
helpers (``money``, ``when``, ``time_left``) so a custom template is localized too.
"""

from __future__ import annotations

import gettext
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from importlib import resources
from typing import Any
from urllib.parse import quote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel import Locale, UnknownLocaleError
from babel.dates import format_skeleton, format_time, format_timedelta
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.numbers import format_decimal
from jinja2 import StrictUndefined, Template, TemplateError, TemplateSyntaxError
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment

from referral_watch.config import Config, TierConfig
from referral_watch.model import EXPIRED, RESOLVED, TIER, Lead, Message, Referral, TeamMember

__all__ = [
    "DEFAULT_LINK",
    "SLACK_MAX",
    "TEAMS_MAX",
    "Style",
    "check_templates",
    "md",
    "money_text",
    "render_alert",
    "render_digest",
    "render_ops",
    "render_test",
    "report_headings",
    "style_for",
    "time_left_text",
    "when_text",
]

DEFAULT_LINK = "https://partner.microsoft.com/dashboard/referrals/v2/leads"
TEAMS_MAX = 1000  # Apprise's workflows:// body cap; we keep title + body within it
SLACK_MAX = 3000  # well under what Slack accepts for one message
TITLE_MAX = 119
NOTES_MAX = 280
CUSTOMER_MAX = 150  # in bodies; a longer "name" is data gone wrong, not information
COMPACT_CUSTOMER_MAX = 60
LIST_MAX = 10  # team members / products shown before "+N more"

_TEAMS_SCHEMES = frozenset({"workflow", "workflows", "powerautomate"})
_TEAMS_HOSTS = (".logic.azure.com", ".api.powerplatform.com")
_SLACK_HOSTS = frozenset({"hooks.slack.com"})


def N_(message: str) -> str:
    """Mark a constant for extraction; it is translated where it is used."""
    return message


# --- style: how one channel wants its messages ---------------------------------------------


@dataclass(frozen=True)
class Style:
    """How one channel wants its messages."""

    locale: str = "en-US"
    timezone: str = "UTC"
    compact: bool = False  # Teams: essentials first, short lines
    max_length: int | None = None  # len(title) + len(body) never exceeds this
    link_template: str = DEFAULT_LINK


def _url_kind(url: str) -> str:
    """'teams' (Power Automate workflow), 'slack' or '' from a channel URL, without keeping it."""
    try:
        parts = urlsplit(url.strip())
        host = (parts.hostname or "").lower()
    except ValueError:
        return ""
    scheme = parts.scheme.lower()
    if scheme in _TEAMS_SCHEMES:
        return "teams"
    if scheme in ("http", "https") and host.endswith(_TEAMS_HOSTS):
        return "teams"
    if scheme == "slack" or (scheme in ("http", "https") and host in _SLACK_HOSTS):
        return "slack"
    return ""


def style_for(config: Config, channel: str) -> Style:
    """The channel's locale/timezone (else ``[messages]``) and its size limits."""
    settings = config.channels.get(channel)
    locale = (settings.locale if settings else None) or config.messages.locale
    zone = (settings.timezone if settings else None) or config.messages.timezone
    kind = _url_kind(settings.url) if settings else ""
    return Style(
        locale=locale,
        timezone=zone,
        compact=kind == "teams",
        max_length=TEAMS_MAX if kind == "teams" else SLACK_MAX if kind == "slack" else None,
        link_template=config.partner_center.link_template,
    )


# --- catalogs and Babel ----------------------------------------------------------------------


@lru_cache(maxsize=64)
def _babel_locale(name: str) -> Locale:
    """'nl-NL' -> Locale('nl', 'NL'); anything Babel does not know formats as en-US."""
    try:
        return Locale.parse(name.replace("-", "_"))
    except (ValueError, TypeError, UnknownLocaleError):
        return Locale("en", "US")


def _catalog_names(name: str) -> list[str]:
    locale = _babel_locale(name)
    names = [str(locale)] if locale.territory else []
    return [*names, locale.language]


@lru_cache(maxsize=16)
def _translations(name: str) -> gettext.NullTranslations:
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
def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def _zone_label(local: datetime, zone: ZoneInfo) -> str:
    """CEST / PST / UTC; zones without an abbreviation are named: 'Asia/Dubai (UTC+04)'."""
    abbreviation = local.tzname() or ""
    if abbreviation[:1].isalpha():
        return abbreviation
    return f"{zone.key} (UTC{abbreviation})"


def when_text(moment: datetime, timezone: str, locale: str) -> str:
    """'Sun, Oct 25, 2026, 2:30 AM CET' / 'zo 25 okt 2026, 02:30 CET'."""
    zone = _zone(timezone)
    babel_locale = _babel_locale(locale)
    local = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(zone)
    date = format_skeleton("yMMMEd", local, locale=babel_locale)
    clock = format_time(local, "short", locale=babel_locale)
    pattern = str(babel_locale.datetime_formats.get("medium", "{1} {0}")).replace("'", "")
    text = f"{pattern.replace('{1}', date).replace('{0}', clock)} {_zone_label(local, zone)}"
    # CLDR puts a narrow no-break space before AM/PM; plain text is safer in every channel.
    return text.replace("\u202f", " ")


def money_text(amount: Decimal | None, currency: str, locale: str) -> str:
    """'25,000 USD' / '25.000 USD' (the ISO code always shown); '' when there is no value."""
    if amount is None:
        return ""
    pattern = "#,##0" if amount == amount.to_integral_value() else "#,##0.00"
    number = format_decimal(amount, format=pattern, locale=_babel_locale(locale))
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
    _ = _translations(locale).gettext
    if remaining < timedelta(0):
        return _("expired {duration} ago").format(duration=_span(-remaining, _))
    return _span(remaining, _)


# --- Markdown helpers ------------------------------------------------------------------------

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|])")


def md(text: object) -> str:
    """User text made safe for one line of Markdown: whitespace collapsed, markup escaped."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _clip(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def _excerpt(notes: str) -> str:
    """The first 280 characters of the notes (whitespace collapsed), '…' when cut."""
    flat = " ".join(notes.split())
    return flat if len(flat) <= NOTES_MAX else flat[:NOTES_MAX].rstrip() + "…"


def _cut(text: str, limit: int) -> str:
    """Hard cut as a last resort, never leaving a dangling Markdown escape."""
    if len(text) <= limit:
        return text
    if limit <= 0:
        return ""
    cut = text[: limit - 1].rstrip()
    if (len(cut) - len(cut.rstrip("\\"))) % 2:
        cut = cut[:-1]
    return cut + "…"


def _title(text: str) -> str:
    return _clip(text, TITLE_MAX)


@dataclass(frozen=True)
class _Part:
    """One line of a body; optional lines are left out (or shortened) when space is short."""

    text: str
    essential: bool = True
    shrink: Callable[[int], str] | None = None  # a version of the line within n characters


def _fit(title: str, parts: Sequence[_Part], max_length: int | None) -> str:
    """Join the lines, keeping len(title) + len(body) within max_length."""
    if max_length is None:
        return "\n".join(p.text for p in parts)
    budget = max_length - len(title)
    kept = {i: p.text for i, p in enumerate(parts) if p.essential}

    def size(lines: dict[int, str]) -> int:
        return len("\n".join(text for _, text in sorted(lines.items())))

    for index, part in enumerate(parts):
        if part.essential:
            continue
        if size({**kept, index: part.text}) <= budget:
            kept[index] = part.text
        elif part.shrink is not None:
            room = budget - size({**kept, index: ""})
            if room >= 40:  # a stub of a line helps nobody
                kept[index] = part.shrink(room)
    body = "\n".join(text for _, text in sorted(kept.items())).rstrip()
    return _cut(body, budget)


# --- the per-message vocabulary --------------------------------------------------------------

_RESOLUTION_WORDS = {
    "accepted": N_("accepted"),
    "declined": N_("declined"),
    "won": N_("won"),
    "lost": N_("lost"),
    "expired": N_("expired"),
    "gone": N_("no longer in Partner Center"),
}

_RESOLVED_TITLES = {
    ("lead", "accepted"): N_("Lead accepted: {customer}"),
    ("lead", "declined"): N_("Lead declined: {customer}"),
    ("lead", "won"): N_("Lead won: {customer}"),
    ("lead", "lost"): N_("Lead lost: {customer}"),
    ("lead", ""): N_("Lead closed: {customer}"),
    ("co-sell", "accepted"): N_("Co-sell opportunity accepted: {customer}"),
    ("co-sell", "declined"): N_("Co-sell opportunity declined: {customer}"),
    ("co-sell", "won"): N_("Co-sell opportunity won: {customer}"),
    ("co-sell", "lost"): N_("Co-sell opportunity lost: {customer}"),
    ("co-sell", ""): N_("Co-sell opportunity closed: {customer}"),
}


class _Words:
    """Translations, zone and formats for one message."""

    def __init__(self, style: Style, now: datetime) -> None:
        self.style = style
        self.now = now
        translations = _translations(style.locale)
        self._: Callable[[str], str] = translations.gettext
        self.ngettext: Callable[[str, str, int], str] = translations.ngettext

    def when(self, moment: datetime | None) -> str:
        return when_text(moment, self.style.timezone, self.style.locale) if moment else ""

    def money(self, amount: Decimal | None, currency: str) -> str:
        return money_text(amount, currency, self.style.locale)

    def left(self, remaining: timedelta) -> str:
        return time_left_text(remaining, self.style.locale)

    def relative(self, delta: timedelta) -> str:
        """Babel's 'in 3 hours' / '2 uur geleden' (delta < 0 is in the past)."""
        return str(
            format_timedelta(delta, add_direction=True, locale=_babel_locale(self.style.locale))
        )

    def link(self, referral_id: str) -> str:
        return self.style.link_template.replace("{id}", quote(referral_id, safe=""))

    def list_link(self) -> str:
        """A link for many leads: the template when it names no single lead."""
        template = self.style.link_template
        return DEFAULT_LINK if "{id}" in template else template

    def kind(self, referral: Referral) -> str:
        return self._("Co-sell opportunity") if referral.kind == "co-sell" else self._("Lead")

    def field(self, label: str, value: str) -> str:
        return f"- **{self._(label)}:** {value}"

    def open_link(self, url: str) -> str:
        text = self._("Open in Partner Center")
        return f"[{text}]({url})"

    def capped(self, items: Sequence[str], limit: int = LIST_MAX) -> str:
        shown = [md(_clip(item, 80)) for item in items[:limit]]
        if len(items) > limit:
            shown.append(self._("+{count} more").format(count=len(items) - limit))
        return ", ".join(shown)

    def resolution(self, resolution: str | None) -> str:
        word = _RESOLUTION_WORDS.get(resolution or "")
        return self._(word) if word else md(resolution or "")


def _member_name(member: TeamMember) -> str:
    return member.name or member.email


# --- single alerts ---------------------------------------------------------------------------


def _alert_title(w: _Words, lead: Lead, kind: str) -> str:
    ref = lead.referral
    customer = " ".join(ref.customer.split())
    co_sell = ref.kind == "co-sell"
    remaining = lead.remaining(w.now)
    if kind == TIER and remaining >= timedelta(0):
        template = (
            w._("Co-sell opportunity expires in {time_left}: {customer}")
            if co_sell
            else w._("Lead expires in {time_left}: {customer}")
        )
        return _title(template.format(time_left=w.left(remaining), customer=customer))
    if kind in (TIER, EXPIRED):
        template = (
            w._("Co-sell opportunity expired unanswered: {customer}")
            if co_sell
            else w._("Lead expired unanswered: {customer}")
        )
        return _title(template.format(customer=customer))
    outcome = lead.resolution if lead.resolution in ("accepted", "declined", "won", "lost") else ""
    template = w._(_RESOLVED_TITLES[("co-sell" if co_sell else "lead", outcome or "")])
    return _title(template.format(customer=customer))


def _intro(w: _Words, lead: Lead, kind: str) -> str:
    customer = f"**{md(_clip(lead.referral.customer, CUSTOMER_MAX))}**"
    remaining = lead.remaining(w.now)
    if kind == TIER and remaining >= timedelta(0):
        return w._("{customer} needs an answer in Partner Center within {time_left}.").format(
            customer=customer, time_left=f"**{w.left(remaining)}**"
        )
    if kind in (TIER, EXPIRED):
        return w._(
            "{customer} was not answered before its deadline; "
            "Partner Center archives it as expired."
        ).format(customer=customer)
    return w._(
        "{customer} was answered in Partner Center ({resolution}); no more reminders."
    ).format(customer=customer, resolution=w.resolution(lead.resolution))


def _notes_part(w: _Words, notes: str, essential: bool) -> _Part:
    prefix = w.field(N_("Notes"), "")
    excerpt = _excerpt(notes)

    def shrink(room: int) -> str:
        # Escaping can lengthen the text, so shorten until the escaped line fits.
        keep = room - len(prefix)
        while keep > 1:
            line = prefix + md(_clip(excerpt, keep))
            if len(line) <= room:
                return line
            keep -= max(1, len(line) - room)
        return prefix + "…"

    return _Part(prefix + md(excerpt), essential, shrink)


def _full_parts(w: _Words, lead: Lead, kind: str) -> list[_Part]:
    ref = lead.referral
    team = [_member_name(m) for m in ref.team]
    value = w.money(ref.deal_value, ref.currency) or w._("not stated")
    parts = [
        _Part(_intro(w, lead, kind)),
        _Part(""),
        _Part(w.field(N_("Customer"), md(_clip(ref.customer, CUSTOMER_MAX)))),
        _Part(w.field(N_("Deal value"), value)),
        _Part(w.field(N_("Kind"), w.kind(ref))),
        _Part(w.field(N_("Created"), w.when(ref.created)), essential=False),
        _Part(w.field(N_("Deadline"), w.when(lead.deadline))),
    ]
    if kind == RESOLVED:
        parts.append(_Part(w.field(N_("Outcome"), w.resolution(lead.resolution))))
    else:
        parts.append(_Part(w.field(N_("Time left"), w.left(lead.remaining(w.now)))))
    if ref.notes.strip() and kind != RESOLVED:
        parts.append(_notes_part(w, ref.notes, essential=False))
    if ref.solutions or ref.products:
        # a solution and a product often carry the same name: show each name once
        products = w.capped(list(dict.fromkeys([*ref.solutions, *ref.products])))
        parts.append(_Part(w.field(N_("Products/solutions"), products), essential=False))
    assigned = w.capped(team) if team else w._("nobody assigned")
    parts.append(_Part(w.field(N_("Assigned team"), assigned), essential=False))
    parts.append(_Part(w.field(N_("Referral id"), md(ref.id))))
    parts.extend([_Part(""), _Part(w.open_link(w.link(ref.id)))])
    return parts


def _compact_parts(w: _Words, lead: Lead, kind: str) -> list[_Part]:
    """Teams: the deadline, the customer and the link first; the rest only as space allows."""
    ref = lead.referral
    remaining = lead.remaining(w.now)
    if kind == RESOLVED:
        deadline = w.field(N_("Outcome"), w.resolution(lead.resolution))
    elif remaining >= timedelta(0):
        left = w._("{time_left} left").format(time_left=w.left(remaining))
        deadline = w.field(N_("Deadline"), f"{w.when(lead.deadline)} ({left})")
    else:
        deadline = w.field(N_("Deadline"), f"{w.when(lead.deadline)} ({w.left(remaining)})")
    value = w.money(ref.deal_value, ref.currency)
    team = [_member_name(m) for m in ref.team]
    parts = [
        _Part(deadline),
        _Part(w.field(N_("Customer"), md(_clip(ref.customer, COMPACT_CUSTOMER_MAX)))),
        _Part(w.field(N_("Deal value"), f"{value} · {w.kind(ref)}" if value else w.kind(ref))),
        _Part(w.field(N_("Assigned team"), w.capped(team, 3) or w._("nobody assigned")), False),
        _Part(w.field(N_("Referral id"), md(ref.id)), essential=False),
        _Part(""),
        _Part(w.open_link(w.link(ref.id))),
    ]
    if ref.notes.strip() and kind != RESOLVED:
        parts.append(_Part("", essential=False))
        parts.append(_notes_part(w, ref.notes, essential=False))
    return parts


def _default_alert(w: _Words, lead: Lead, kind: str, reserve: int = 0) -> Message:
    """The standard wording; ``reserve`` keeps room for text appended afterwards."""
    title = _alert_title(w, lead, kind)
    parts = _compact_parts(w, lead, kind) if w.style.compact else _full_parts(w, lead, kind)
    limit = None if w.style.max_length is None else w.style.max_length - reserve
    return Message(title, _fit(title, parts, limit))


def render_alert(
    lead: Lead, kind: str, tier: TierConfig | None, now: datetime, style: Style
) -> Message:
    """One lead's tier reminder, expired notice or resolved notice."""
    if kind not in (TIER, EXPIRED, RESOLVED):
        raise ValueError(f"unknown alert kind {kind!r}")
    w = _Words(style, now)
    default = _default_alert(w, lead, kind)
    if kind != TIER or tier is None or not (tier.title or tier.body):
        return default
    try:
        context = _template_context(w, lead, tier)
        title = _render_template(tier.title, context) if tier.title else default.title
        body = _render_template(tier.body, context) if tier.body else default.body
    except Exception:  # a broken override must never cost the reminder itself
        return _with_template_note(w, lead)
    title = _title(title) or default.title
    budget = None if style.max_length is None else style.max_length - len(title)
    return Message(title, body.strip() if budget is None else _cut(body.strip(), budget))


def _with_template_note(w: _Words, lead: Lead) -> Message:
    """The standard wording, with a visible hint that the operator's template failed."""
    text = w._("The custom template for this reminder failed; this is the standard wording.")
    note = f"\n\n_{text}_"
    standard = _default_alert(w, lead, TIER, reserve=len(note))
    return Message(standard.title, standard.body + note)


# --- digests ---------------------------------------------------------------------------------


def _digest_title(w: _Words, kind: str, tier: TierConfig | None, count: int) -> str:
    if kind == EXPIRED:
        text = w.ngettext(
            "{count} lead expired unanswered", "{count} leads expired unanswered", count
        )
    elif kind == RESOLVED:
        text = w.ngettext("{count} lead was answered", "{count} leads were answered", count)
    elif tier is not None:
        text = w.ngettext(
            "{count} lead needs an answer within {window}",
            "{count} leads need an answer within {window}",
            count,
        )
    else:
        text = w.ngettext("{count} lead needs an answer", "{count} leads need an answer", count)
    window = w.left(tier.remaining) if tier is not None else ""
    return _title(text.format(count=count, window=window))


def _digest_line(w: _Words, lead: Lead, kind: str) -> str:
    ref = lead.referral
    remaining = lead.remaining(w.now)
    if w.style.compact:
        customer = md(_clip(ref.customer, 40))
        status = w.resolution(lead.resolution) if kind == RESOLVED else w.left(remaining)
        return f"- **{customer}** · {status}"
    pieces = [f"**{md(_clip(ref.customer, 80))}**"]
    value = w.money(ref.deal_value, ref.currency)
    if value:
        pieces.append(value)
    if kind == RESOLVED:
        pieces.append(w.resolution(lead.resolution))
    elif remaining >= timedelta(0):
        pieces.append(w._("{time_left} left").format(time_left=w.left(remaining)))
        pieces.append(w._("due {deadline}").format(deadline=w.when(lead.deadline)))
    else:
        pieces.append(w.left(remaining))
    if "{id}" in w.style.link_template:
        open_text = w._("open")
        pieces.append(f"[{open_text}]({w.link(ref.id)})")
    return "- " + " · ".join(pieces)


def _digest_footer(w: _Words, hidden: int) -> list[str]:
    lines: list[str] = []
    if hidden:
        more = w.ngettext("…and {count} more lead.", "…and {count} more leads.", hidden)
        lines += ["", more.format(count=hidden)]
    if w.style.compact or "{id}" not in w.style.link_template:
        lines += ["", w.open_link(w.list_link())]
    return lines


def render_digest(
    leads: Sequence[Lead],
    kind: str,
    tier: TierConfig | None,
    more: int,
    now: datetime,
    style: Style,
) -> Message:
    """Many leads for one channel and tier in one message, most urgent first.

    ``more`` counts leads left out before rendering (beyond digest_limit); leads that do not fit
    the channel's size limit are left out too and counted with them.
    """
    if kind not in (TIER, EXPIRED, RESOLVED):
        raise ValueError(f"unknown alert kind {kind!r}")
    w = _Words(style, now)
    ordered = sorted(leads, key=lambda lead: lead.deadline)
    title = _digest_title(w, kind, tier, len(ordered) + more)
    head = [] if style.compact or kind != TIER else [w._("Most urgent first."), ""]
    lines = [_digest_line(w, lead, kind) for lead in ordered]
    budget = None if style.max_length is None else style.max_length - len(title)
    shown: list[str] = []
    for line in lines:
        hidden = len(lines) - len(shown) - 1 + more
        candidate = "\n".join([*head, *shown, line, *_digest_footer(w, hidden)])
        if budget is not None and len(candidate) > budget:
            break
        shown.append(line)
    body = "\n".join([*head, *shown, *_digest_footer(w, len(lines) - len(shown) + more)])
    return Message(title, body if budget is None else _cut(body, budget))


# --- test, operations and report wording ------------------------------------------------------


def _plain(title: str, paragraphs: Sequence[str], style: Style) -> Message:
    """Short notices: one paragraph per line (a single newline is not a break everywhere)."""
    title = _title(title)
    parts = [_Part(p + "\n") for p in paragraphs[:-1]] + [_Part(p) for p in paragraphs[-1:]]
    return Message(title, _fit(title, parts, style.max_length))


def render_test(channel: str, now: datetime, style: Style) -> Message:
    """A clearly marked test message for ``test-notify``."""
    w = _Words(style, now)
    return _plain(
        w._("TEST: referral-watch can reach this channel"),
        [
            w._("This is a test message from referral-watch for {channel}, sent {when}.").format(
                channel=f"**{md(channel)}**", when=w.when(now)
            ),
            w._(
                "Reminders about Partner Center leads that need an answer will arrive here. "
                "There is nothing to do."
            ),
        ],
        style,
    )


def _failing_lines(w: _Words, reason: str, failures: int, since: datetime | None) -> list[str]:
    lines = [
        w.ngettext(
            "Polling Partner Center has failed {count} time in a row.",
            "Polling Partner Center has failed {count} times in a row.",
            failures,
        ).format(count=failures)
    ]
    if since is not None:
        lines.append(
            w._("Failing since {when} ({ago}).").format(
                when=w.when(since), ago=w.relative(since - w.now)
            )
        )
    if reason:
        lines.append(w._("Reason: {reason}").format(reason=md(reason)))
    lines += [
        w._(
            "referral-watch retries every cycle; until a poll succeeds it sees no new leads "
            "and no answers."
        ),
    ]
    return lines


def render_ops(
    event: str,
    reason: str,
    now: datetime,
    style: Style,
    *,
    failures: int = 0,
    since: datetime | None = None,
) -> Message:
    """Alerts about referral-watch itself for ``operations.notify``.

    event: "failing", "still_failing", "recovered", or "dropped" (a message that could not be
    delivered for a day; ``reason`` names the channel and lead).
    """
    w = _Words(style, now)
    if event in ("failing", "still_failing"):
        title = (
            w._("referral-watch: polling Partner Center is failing")
            if event == "failing"
            else w._("referral-watch: polling Partner Center is still failing")
        )
        return _plain(title, _failing_lines(w, reason, failures, since), style)
    if event == "recovered":
        lines = [w._("Polling Partner Center works again since {when}.").format(when=w.when(now))]
        if failures:
            lines.append(
                w.ngettext(
                    "It had failed {count} time in a row.",
                    "It had failed {count} times in a row.",
                    failures,
                ).format(count=failures)
            )
        return _plain(w._("referral-watch: polling Partner Center works again"), lines, style)
    if event == "dropped":
        lines = [w._("A message could not be delivered for a day and was dropped.")]
        if reason:
            lines.append(w._("Details: {reason}").format(reason=md(reason)))
        return _plain(w._("referral-watch: a message was dropped"), lines, style)
    raise ValueError(f"unknown operations event {event!r}")


def report_headings(locale: str, period: timedelta) -> dict[str, str]:
    """Localized headings for the ``report`` summary (keys are stable, English)."""
    _ = _translations(locale).gettext
    return {
        "title": _("Partner Center referrals: the last {period}").format(
            period=time_left_text(period, locale)
        ),
        "open": _("Open leads, most urgent first"),
        "answered": _("Answered in this period"),
        "expired": _("Expired unanswered in this period"),
        "median": _("Median time to answer"),
        "assignees": _("Leads per assignee"),
        "none": _("None"),
        "waiting": _("{count} waiting for an answer"),
        "buckets": _("{day} expire within a day, {three} within three days, {later} later."),
        "open_value": _("Deal value waiting: {values}"),
        "expired_value": _("Deal value lost: {values}"),
        "p90": _("90th percentile"),
        "left": _("{time_left} left"),
        "due": _("deadline {when}"),
        "more": _("+{count} more"),
        "period": _("From {start} to {end}."),
        "unassigned": _("unassigned"),
        "no_currency": _("(no currency)"),
        "accepted": _("accepted"),
        "declined": _("declined"),
        "won": _("won"),
        "lost": _("lost"),
    }


# --- Jinja2 overrides ------------------------------------------------------------------------

_MAX_REPEAT = 10_000


class _Sandbox(SandboxedEnvironment):
    """The sandbox, also refusing '"x" * 10**9'-style output bombs."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > 100:
            raise SecurityError("exponent too large")
        if operator == "*" and _repeat_size(left, right) > _MAX_REPEAT:
            raise SecurityError("repetition too large")
        return super().call_binop(context, operator, left, right)


def _repeat_size(left: Any, right: Any) -> int:
    """The length of a string or list repeated by a number; 0 for plain arithmetic."""
    for sequence, count in ((left, right), (right, left)):
        if isinstance(sequence, str | list | tuple) and isinstance(count, int):
            return len(sequence) * count
    return 0


@lru_cache(maxsize=1)
def _sandbox() -> SandboxedEnvironment:
    env = _Sandbox(
        undefined=StrictUndefined,  # a typo in a variable name is an error check-config shows
        autoescape=False,  # Markdown, not HTML: user text is escaped with the md filter
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["md"] = md
    return env


@lru_cache(maxsize=256)
def _template(source: str) -> Template:
    return _sandbox().from_string(source)


def _render_template(source: str, context: dict[str, Any]) -> str:
    return _template(source).render(context)


def _as_decimal(value: Any) -> Decimal | None:
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        return Decimal(str(value).replace(",", ""))
    except InvalidOperation:
        return None


_LEAD_VALUE = object()  # money() without arguments: the lead's own deal value


def _template_context(w: _Words, lead: Lead, tier: TierConfig | None) -> dict[str, Any]:
    ref = lead.referral
    remaining = lead.remaining(w.now)

    def money(amount: Any = _LEAD_VALUE, currency: str | None = None) -> str:
        value = ref.deal_value if amount is _LEAD_VALUE else _as_decimal(amount)
        return w.money(value, ref.currency if currency is None else str(currency))

    def when(moment: Any = None) -> str:
        return w.when(moment) if isinstance(moment, datetime) else ""

    def time_left(value: Any = None) -> str:
        if isinstance(value, datetime):
            return w.left(value - w.now)
        return w.left(value if isinstance(value, timedelta) else remaining)

    def relative(value: Any = None) -> str:
        if isinstance(value, datetime):
            return w.relative(value - w.now)
        return w.relative(value if isinstance(value, timedelta) else remaining)

    return {
        "lead": lead,
        "referral": ref,
        "id": ref.id,
        "name": ref.name,
        "customer": ref.customer,
        "kind": ref.kind,
        "kind_text": w.kind(ref),
        "deal_value": ref.deal_value,
        "currency": ref.currency,
        "country": ref.country,
        "created": ref.created,
        "deadline": lead.deadline,
        "remaining": remaining,
        "notes": ref.notes,
        "notes_excerpt": _excerpt(ref.notes),
        "products": list(ref.products),
        "solutions": list(ref.solutions),
        "team": [_member_name(m) for m in ref.team],
        "team_emails": list(ref.team_emails),
        "link": w.link(ref.id),
        "tier": tier.name if tier else "",
        "now": w.now,
        "locale": w.style.locale,
        "timezone": w.style.timezone,
        "compact": w.style.compact,
        "money": money,
        "when": when,
        "time_left": time_left,
        "relative": relative,
        "md": md,
    }


_SAMPLE_NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)


def _sample_leads() -> list[Lead]:
    """A lead with every field and one with none of the optional ones."""
    created = _SAMPLE_NOW - timedelta(days=12)
    full = Referral(
        id="00000000-0000-0000-0000-000000000001",
        name="Sample lead",
        customer="Fabrikam Customer Inc",
        created=created,
        status="New",
        substatus="Pending",
        type="Independent",
        direction="Incoming",
        country="NL",
        deal_value=Decimal("25000"),
        currency="USD",
        notes="Interested in a migration to Azure.",
        products=("Azure",),
        solutions=("Sample solution",),
        team=(TeamMember(email="alice@example.com", name="Alice Example"),),
    )
    sparse = Referral(id="sample-2", name="", customer="Contoso", created=created)
    return [
        Lead(ref, deadline=created + timedelta(days=14), first_seen=created, last_seen=_SAMPLE_NOW)
        for ref in (full, sparse)
    ]


def _template_problem(source: str, tier: TierConfig, styles: Sequence[Style]) -> str | None:
    try:
        _template(source)
    except TemplateSyntaxError as exc:
        return f"line {exc.lineno}: {exc.message}"
    for style in styles:
        w = _Words(style, _SAMPLE_NOW)
        for lead in _sample_leads():
            try:
                text = _render_template(source, _template_context(w, lead, tier))
            except SecurityError as exc:
                return f"unsafe template: {exc}"
            except TemplateError as exc:
                return str(exc.message or exc)
            except Exception as exc:  # helpers misused, arithmetic on a missing value...
                return f"{type(exc).__name__}: {exc}"
            if not text.strip():
                return "renders as empty text"
    return None


def check_templates(config: Config) -> list[str]:
    """Problems in the per-tier Jinja2 overrides, each with its key path.

    Each template is compiled and rendered with sample leads (one with every field, one with
    none of the optional ones) in every locale its channels use, so a typo or a template that
    breaks on a lead without a deal value shows up in check-config, not at 3 a.m.
    Key paths count tiers in the file's order, as the operator wrote them.
    """
    problems: list[str] = []
    for tier in config.policy.tiers:
        styles = list(dict.fromkeys(style_for(config, name) for name in ["", *tier.notify]))
        for field in ("title", "body"):
            source = getattr(tier, field)
            if not source:
                continue
            problem = _template_problem(source, tier, styles)
            if problem:
                problems.append(f"{tier.key}.{field}: {problem} (tier {tier.name!r})")
    return problems
