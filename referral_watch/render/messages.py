"""PURE: all wording the product sends: alert -> title and Markdown body, localized.

No clock (``now`` is an argument), no network, no logging. Translation and number/date formats
come from ``i18n``, channel kinds and styles from ``channels``, text shaping from ``text`` and
the Jinja2 sandbox for per-tier overrides from ``templates``. A custom template gets the same
helpers (``money``, ``when``, ``time_left``) so it is localized too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from referral_watch.config import TierConfig
from referral_watch.model import (
    CLAIMED,
    EXPIRED,
    LAPSED,
    RESOLVED,
    TIER,
    Lead,
    Message,
    Referral,
    TeamMember,
    as_decimal,
    our_members,
)
from referral_watch.render.channels import DEFAULT_LINK, SLACK_MAX, TEAMS_MAX, Style, style_for
from referral_watch.render.claims import owner_line, render_claim_notice
from referral_watch.render.i18n import (
    N_,
    money_text,
    time_left_text,
    when_text,
)
from referral_watch.render.templates import render_template
from referral_watch.render.words import Words, clip_title, lead_link
from referral_watch.text import Part, clip, cut, fit, md

__all__ = [
    "DEFAULT_LINK",
    "SLACK_MAX",
    "TEAMS_MAX",
    "Style",
    "lead_link",
    "md",
    "money_text",
    "notify_type",
    "render_alert",
    "render_digest",
    "style_for",
    "time_left_text",
    "when_text",
]

NOTES_MAX = 280
# A card's four button URLs together stay far below Teams' 28 KB per message (4 x 2,000)
BUTTON_URL_MAX = 2000
CUSTOMER_MAX = 150  # in bodies; a longer "name" is data gone wrong, not information
COMPACT_CUSTOMER_MAX = 60


def _excerpt(notes: str) -> str:
    """The first 280 characters of the notes (whitespace collapsed), '…' when cut."""
    flat = " ".join(notes.split())
    return flat if len(flat) <= NOTES_MAX else flat[:NOTES_MAX].rstrip() + "…"


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


def _member_name(member: TeamMember) -> str:
    return member.name or member.email


def _ours(w: Words, ref: Referral) -> tuple[TeamMember, ...]:
    return our_members(ref.team, w.style.team_domains)


# --- single alerts ---------------------------------------------------------------------------


def _alert_title(w: Words, lead: Lead, kind: str) -> str:
    ref = lead.referral
    customer = w.title_text(ref.customer)
    co_sell = ref.kind == "co-sell"
    remaining = lead.remaining(w.now)
    if kind == TIER and remaining >= timedelta(0):
        template = (
            w._("Co-sell opportunity expires in {time_left}: {customer}")
            if co_sell
            else w._("Lead expires in {time_left}: {customer}")
        )
        return clip_title(template.format(time_left=w.left(remaining), customer=customer))
    if kind in (TIER, EXPIRED):
        template = (
            w._("Co-sell opportunity expired unanswered: {customer}")
            if co_sell
            else w._("Lead expired unanswered: {customer}")
        )
        return clip_title(template.format(customer=customer))
    outcome = lead.resolution if lead.resolution in ("accepted", "declined", "won", "lost") else ""
    template = w._(_RESOLVED_TITLES[("co-sell" if co_sell else "lead", outcome or "")])
    return clip_title(template.format(customer=customer))


def _intro(w: Words, lead: Lead, kind: str) -> str:
    customer = f"**{w.esc(clip(lead.referral.customer, CUSTOMER_MAX))}**"
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


_ANSWERED_BY = {
    "accepted": N_("Accepted by {name} via referral-watch, {time_left} before the deadline."),
    "declined": N_("Declined by {name} via referral-watch, {time_left} before the deadline."),
}


def _answered_line(w: Words, lead: Lead) -> str | None:
    """'Accepted by Ann de Vries via referral-watch, 3d 4h before the deadline.' (SPEC 14), for
    a lead answered through referral-watch; None otherwise."""
    entry = lead.answered
    if entry is None or entry.result not in _ANSWERED_BY:
        return None
    early = max(lead.deadline - entry.at, timedelta(0))
    return w._(_ANSWERED_BY[entry.result]).format(
        name=w.esc(clip(entry.name or entry.who, 80)), time_left=w.left(early)
    )


def _notes_part(w: Words, notes: str, essential: bool) -> Part:
    prefix = w.field(N_("Notes"), "")
    excerpt = _excerpt(notes)

    def shrink(room: int) -> str:
        # Escaping can lengthen the text, so shorten until the escaped line fits.
        keep = room - len(prefix)
        while keep > 1:
            line = prefix + w.esc(clip(excerpt, keep))
            if len(line) <= room:
                return line
            keep -= max(1, len(line) - room)
        return prefix + "…"

    return Part(prefix + w.esc(excerpt), essential, shrink)


def _full_parts(w: Words, lead: Lead, kind: str) -> list[Part]:
    ref = lead.referral
    team = [_member_name(m) for m in _ours(w, ref)]
    value = w.money(ref.deal_value, ref.currency) or w._("not stated")
    parts = [
        Part(_intro(w, lead, kind)),
        Part(""),
        Part(w.field(N_("Customer"), w.esc(clip(ref.customer, CUSTOMER_MAX)))),
        Part(w.field(N_("Deal value"), value)),
        Part(w.field(N_("Kind"), w.kind(ref))),
        Part(w.field(N_("Created"), w.when(ref.created)), essential=False),
        Part(w.field(N_("Deadline"), w.when(lead.deadline))),
    ]
    if kind == RESOLVED:
        parts.append(Part(w.field(N_("Outcome"), w.resolution(lead.resolution))))
        answered = _answered_line(w, lead)
        if answered:
            parts[1:1] = [Part(""), Part(answered)]
        if lead.answered is not None and lead.answered.reason:
            parts.append(Part(w.field(N_("Reason"), w.esc(clip(lead.answered.reason, NOTES_MAX)))))
    else:
        parts.append(Part(w.field(N_("Time left"), w.left(lead.remaining(w.now)))))
        owner = owner_line(w, lead)
        if owner:
            parts[1:1] = [Part(""), Part(owner)]
    if ref.notes.strip() and kind != RESOLVED:
        parts.append(_notes_part(w, ref.notes, essential=False))
    if ref.solutions or ref.products:
        # a solution and a product often carry the same name: show each name once
        products = w.capped(list(dict.fromkeys([*ref.solutions, *ref.products])))
        parts.append(Part(w.field(N_("Products/solutions"), products), essential=False))
    assigned = w.capped(team) if team else w._("nobody assigned")
    parts.append(Part(w.field(N_("Assigned team"), assigned), essential=False))
    parts.append(Part(w.field(N_("Referral id"), w.esc(ref.id))))
    parts.extend([Part(""), Part(w.links(lead, kind))])
    return parts


def _compact_parts(w: Words, lead: Lead, kind: str, buttons: bool = False) -> list[Part]:
    """Teams: the deadline, the customer and the link first; the rest only as space allows.
    ``buttons``: the card shows the links as buttons, so the body leaves them out."""
    ref = lead.referral
    remaining = lead.remaining(w.now)
    if kind == RESOLVED:
        deadline = _answered_line(w, lead) or w.field(N_("Outcome"), w.resolution(lead.resolution))
    elif remaining >= timedelta(0):
        left = w._("{time_left} left").format(time_left=w.left(remaining))
        deadline = w.field(N_("Deadline"), f"{w.when(lead.deadline)} ({left})")
    else:
        deadline = w.field(N_("Deadline"), f"{w.when(lead.deadline)} ({w.left(remaining)})")
    value = w.money(ref.deal_value, ref.currency)
    team = [_member_name(m) for m in _ours(w, ref)]
    owner = owner_line(w, lead) if kind == TIER else None
    parts = [
        *([Part(owner)] if owner else []),
        Part(deadline),
        Part(w.field(N_("Customer"), w.esc(clip(ref.customer, COMPACT_CUSTOMER_MAX)))),
        Part(w.field(N_("Deal value"), f"{value} · {w.kind(ref)}" if value else w.kind(ref))),
        Part(w.field(N_("Assigned team"), w.capped(team, 3) or w._("nobody assigned")), False),
        Part(w.field(N_("Referral id"), w.esc(ref.id)), essential=False),
        *([] if buttons else [Part(""), Part(w.links(lead, kind))]),
    ]
    if ref.notes.strip() and kind != RESOLVED:
        parts.append(Part("", essential=False))
        parts.append(_notes_part(w, ref.notes, essential=False))
    return parts


def _buttons(w: Words, lead: Lead, kind: str) -> tuple[tuple[str, str], ...]:
    """The card's buttons (label, URL) for a Teams tier alert that offers more than Open:
    Accept, Decline, Take it, Open. () elsewhere (the links stay in the body), and for a lead
    whose links are too long to keep the card within Teams' size limit."""
    if w.style.markup != "teams" or kind != TIER:
        return ()
    actions = w.actions(lead, kind)
    if len(actions) < 2 or any(len(url) > BUTTON_URL_MAX for _, url in actions):
        return ()
    return tuple(actions)


def _default_alert(w: Words, lead: Lead, kind: str, reserve: int = 0) -> Message:
    """The standard wording; ``reserve`` keeps room for text appended afterwards."""
    title = _alert_title(w, lead, kind)
    buttons = _buttons(w, lead, kind)
    if w.style.compact:
        parts = _compact_parts(w, lead, kind, buttons=bool(buttons))
    else:
        parts = _full_parts(w, lead, kind)
    limit = None if w.style.max_length is None else w.style.max_length - reserve
    return Message(title, fit(title, parts, limit), actions=buttons)


def notify_type(kind: str, tier: TierConfig | None) -> str:
    """Apprise's type for an alert: the tier's severity, success for an answered lead,
    failure for an expired one (SPEC [[policy.tiers]] severity)."""
    if kind == RESOLVED:
        return "success"
    if kind == EXPIRED:
        return "failure"
    return tier.notify_type if tier is not None else "info"


def render_alert(
    lead: Lead, kind: str, tier: TierConfig | None, now: datetime, style: Style
) -> Message:
    """One lead's tier reminder, expired notice or resolved notice, or a claim notice."""
    if kind in (CLAIMED, LAPSED):
        return render_claim_notice(lead, kind, now, style)
    message = _render_alert(lead, kind, tier, now, style)
    return replace(message, notify_type=notify_type(kind, tier))


def _render_alert(
    lead: Lead, kind: str, tier: TierConfig | None, now: datetime, style: Style
) -> Message:
    if kind not in (TIER, EXPIRED, RESOLVED):
        raise ValueError(f"unknown alert kind {kind!r}")
    w = Words(style, now)
    default = _default_alert(w, lead, kind)
    if kind != TIER or tier is None or not (tier.title or tier.body):
        return default
    try:
        context = template_context(w, lead, tier)
        title = render_template(tier.title, context) if tier.title else default.title
        body = render_template(tier.body, context) if tier.body else default.body
    except Exception:  # a broken override must never cost the reminder itself
        return _with_template_note(w, lead)
    title = clip_title(title) or default.title
    budget = None if style.max_length is None else style.max_length - len(title)
    text = body.strip() if budget is None else cut(body.strip(), budget)
    return Message(title, text, actions=default.actions)


def _with_template_note(w: Words, lead: Lead) -> Message:
    """The standard wording, with a visible hint that the operator's template failed."""
    text = w._("The custom template for this reminder failed; this is the standard wording.")
    note = f"\n\n_{text}_"
    standard = _default_alert(w, lead, TIER, reserve=len(note))
    return Message(standard.title, standard.body + note, actions=standard.actions)


# --- digests ---------------------------------------------------------------------------------


def _digest_title(w: Words, kind: str, tier: TierConfig | None, count: int) -> str:
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
    return clip_title(text.format(count=count, window=window))


def _digest_line(w: Words, lead: Lead, kind: str) -> str:
    ref = lead.referral
    remaining = lead.remaining(w.now)
    if w.style.compact:
        customer = w.esc(clip(ref.customer, 40))
        status = w.resolution(lead.resolution) if kind == RESOLVED else w.left(remaining)
        return f"- **{customer}** · {status}"
    pieces = [f"**{w.esc(clip(ref.customer, 80))}**"]
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
    if kind == TIER and w.style.answer_base:
        accept, decline = w._("accept"), w._("decline")
        pieces.append(f"[{accept}]({w.answer_url(ref.id, 'accept')})")
        pieces.append(f"[{decline}]({w.answer_url(ref.id, 'decline')})")
    take = w.take_label(lead, inline=True) if kind == TIER else None
    if take:
        pieces.append(f"[{take}]({w.claim_url(ref.id)})")
    return "- " + " · ".join(pieces)


def _digest_footer(w: Words, hidden: int) -> list[str]:
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
    w = Words(style, now)
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
    final = body if budget is None else cut(body, budget)
    return Message(title, final, notify_type(kind, tier))


# --- Jinja2 overrides ------------------------------------------------------------------------

_LEAD_VALUE = object()  # money() without arguments: the lead's own deal value


def template_context(w: Words, lead: Lead, tier: TierConfig | None) -> dict[str, Any]:
    ref = lead.referral
    remaining = lead.remaining(w.now)

    def money(amount: Any = _LEAD_VALUE, currency: str | None = None) -> str:
        value = ref.deal_value if amount is _LEAD_VALUE else as_decimal(amount)
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
        "team": [_member_name(m) for m in _ours(w, ref)],
        "team_emails": [m.email for m in _ours(w, ref) if m.email and m.notifications],
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
        "md": w.esc,
    }
