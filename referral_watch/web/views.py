"""What the console pages show, as plain values for the templates: localized, never HTML.

Templates escape everything (autoescape); nothing here builds markup.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

from babel.dates import format_datetime

from referral_watch import policy
from referral_watch.config import Config
from referral_watch.model import AuditEntry, Claim, Lead
from referral_watch.render.i18n import babel_locale, money_text, time_left_text, zone
from referral_watch.state.journal import PollRecord

Gettext = Callable[[str], str]


def when(moment: datetime | None, config: Config) -> str:
    """A short local date and time in the console's locale and zone: '01-12-2026 14:05'."""
    if moment is None:
        return ""
    messages = config.messages
    text = format_datetime(
        moment, "short", tzinfo=zone(messages.timezone), locale=babel_locale(messages.locale)
    )
    return str(text).replace("\u202f", " ")


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


LEVELS = 4  # urgency levels the console draws (colour, fill and a 4-step meter)


def severity(lead: Lead, config: Config, now: datetime) -> tuple[str, str, int]:
    """(CSS classes, tier name, urgency level) of a lead's current tier. ``sev-*`` follows
    Apprise's types as chat does (first tier info, last failure, between warning); the level
    (1 to LEVELS) spreads the tiers over the console's urgency scale, so with the usual four
    tiers each has its own look (reminder and urgent, both "warning", must not look alike)."""
    if lead.remaining(now).total_seconds() < 0:
        return "sev-expired", "", 0
    tier = policy.current_tier(lead, config, now)
    if tier is None:
        return "sev-none", "", 0
    rank = config.policy.severity(tier.name)
    last = len(config.policy.tiers) - 1
    kind = "info" if rank == 0 else "failure" if rank == last else "warning"
    level = urgency_level(rank, last)
    return f"sev-{kind} level-{level}", tier.name, level


def urgency_level(rank: int, last: int) -> int:
    """Tier rank 0..last onto levels 1..LEVELS: the first tier 1, the last LEVELS."""
    if last <= 0:
        return LEVELS
    return 1 + round(rank * (LEVELS - 1) / last)


def assignees(lead: Lead) -> list[str]:
    return [member.name or member.email for member in lead.referral.team if member.email]


@dataclass(frozen=True)
class Row:
    """One lead as a table row."""

    id: str
    short_id: str
    customer: str
    deadline: str  # ISO-8601 UTC, for the countdown in the browser
    deadline_text: str
    left: str
    sev: str
    level: int  # 1..LEVELS while a tier is due, 0 otherwise (the meter's filled steps)
    tier: str
    value: str
    kind: str
    country: str
    assignees: list[str]
    silence: str
    silence_reason: str
    tiers_sent: list[str]
    resolution: str
    search: str  # lower-case text the search box matches
    claims: bool = False  # [claims] is set: the owner column and its buttons show
    owner: str = ""  # who holds the lead now (SPEC 17), by name
    owner_email: str = ""
    owner_for: str = ""  # how long they have held it: '2h 5m'
    unclaimed_for: str = ""  # '3d 4h' for a lead waiting UNCLAIMED_WARN or longer with no owner


UNCLAIMED_WARN = timedelta(days=3)  # the console shows "unclaimed for 3d" in amber from here


def age(delta: timedelta, config: Config) -> str:
    """A duration as the console writes time left: '3d 4h', '2h 5m'."""
    return time_left_text(delta, config.messages.locale)


def _claim_fields(lead: Lead, config: Config, now: datetime) -> dict[str, Any]:
    """The owner and how long they have held the lead, or how long it has waited unclaimed."""
    if config.claims is None:
        return {}
    fields: dict[str, Any] = {"claims": True}
    claim = lead.claimed(now)
    if claim is not None:
        fields.update(owner=claim.name or claim.email, owner_email=claim.email)
        fields["owner_for"] = age(now - claim.at, config)
    elif lead.resolution is None and lead.remaining(now) > timedelta(0):
        waited = now - lead.referral.created
        if waited >= UNCLAIMED_WARN:
            fields["unclaimed_for"] = age(waited, config)
    return fields


def holder_view(claim: Claim | None, config: Config, now: datetime) -> dict[str, str] | None:
    """Who holds a lead, for the pages: name, email, since (date and how long), until."""
    if claim is None:
        return None
    return {
        "name": claim.name or claim.email,
        "email": claim.email,
        "since": when(claim.at, config),
        "for": age(now - claim.at, config),
        "until": when(claim.lapses_at, config),
        "note": claim.note,
    }


def row(lead: Lead, config: Config, now: datetime, _: Gettext) -> Row:
    ref = lead.referral
    sev, tier, level = severity(lead, config, now)
    locale = config.messages.locale
    silenced = lead.silenced(now) and lead.silenced_until is not None
    products = [*ref.products, *ref.solutions]
    return Row(
        id=lead.id,
        short_id=lead.id[:8],
        customer=ref.customer,
        deadline=iso(lead.deadline),
        deadline_text=when(lead.deadline, config),
        left=time_left_text(lead.deadline - now, locale),
        sev=sev,
        level=level,
        tier=tier,
        value=money_text(ref.deal_value, ref.currency, locale),
        kind=_("co-sell") if ref.kind == "co-sell" else _("lead"),
        country=ref.country,
        assignees=assignees(lead),
        silence=when(lead.silenced_until, config) if silenced else "",
        silence_reason=lead.silence_reason if silenced else "",
        tiers_sent=sorted(lead.tiers_sent, key=config.policy.severity),  # in escalation order
        resolution=_resolution(lead, now, _),
        search=" ".join([ref.customer, ref.country, *products, ref.name]).lower(),
        **_claim_fields(lead, config, now),
    )


def _resolution(lead: Lead, now: datetime, _: Gettext) -> str:
    words = {
        "accepted": _("accepted"),
        "declined": _("declined"),
        "won": _("won"),
        "lost": _("lost"),
        "expired": _("expired"),
        "gone": _("gone from Partner Center"),
    }
    if lead.resolution is None:
        return _("expired") if lead.remaining(now).total_seconds() < 0 else ""
    return words.get(lead.resolution, lead.resolution)


@dataclass(frozen=True)
class Banner:
    ok: bool
    last_success: str
    problem: str
    standby: bool = False


def banner(
    health: tuple[bool, dict[str, Any]],
    last_success: datetime | None,
    last: PollRecord | None,
    config: Config,
    _: Gettext,
) -> Banner:
    """The health verdict (/healthz's, whatever it weighs) with, when unhealthy, its reason:
    the verdict's own, else the one from the last failed poll."""
    healthy, body = health
    problem = ""
    status = str(body.get("status", ""))
    if not healthy:
        if body.get("reason") and status != "stale":  # stale: the failed poll says why
            problem = str(body["reason"])
        elif status not in ("", "stale"):
            problem = _("Health check: {status}").format(status=status)
        elif last is None:
            problem = _("No poll has run yet.")
        elif last.needs_login:
            problem = _("Partner Center sign-in expired: run referral-watch login.")
        elif not last.ok and last.error:
            problem = _("The last poll failed: {error}").format(error=last.error)
        else:
            problem = _("No successful poll for a while.")
    standby = body.get("role") == "standby"
    return Banner(healthy, when(last_success, config), problem, standby)


@dataclass(frozen=True)
class MessageLine:
    kind: str
    channel: str
    tier: str
    state: str
    created: str
    delivered: str
    attempts: str  # tries made to deliver it ("–" for one never due to go out)


def message_lines(rows: Sequence[dict[str, Any]], config: Config, _: Gettext) -> list[MessageLine]:
    states = {
        "delivered": _("sent"),
        "pending": _("held or waiting"),
        "skipped": _("skipped (a more urgent tier was due)"),
        "superseded": _("replaced by a later message"),
        "dropped": _("dropped after a day of failures"),
        "quarantined": _("set aside: the message could not be made"),
    }
    # A tier message is named after its tier ("new alert", "urgent alert"): it once read
    # "reminder" whatever the tier, which is also the name of a tier.
    kinds = {"expired": _("expired notice"), "resolved": _("answered notice")}
    return [
        MessageLine(
            kind=(
                _("{tier} alert").format(tier=r["tier"] or "")
                if r["kind"] == "tier"
                else kinds.get(r["kind"], r["kind"])
            ),
            channel=r["channel"],
            tier=r["tier"] or "",
            state=states.get(r["state"], r["state"]),
            created=when(r["created"], config),
            delivered=when(r["delivered_at"], config),
            attempts=_tries(r["state"], int(r["attempts"])),
        )
        for r in rows
    ]


def _tries(state: str, failures: int) -> str:
    """The outbox counts failed attempts; a sent message took one more, the one that worked."""
    if state == "delivered":
        return str(failures + 1)
    if state in ("pending", "dropped") or failures:
        return str(failures)
    return "–"


@dataclass(frozen=True)
class Detail:
    row: Row
    name: str
    status: str
    created: str
    first_seen: str
    last_seen: str
    resolved_at: str
    products: list[str]
    solutions: list[str]
    team: list[str]
    notes: str
    link: str
    silenced: bool
    fields: list[tuple[str, str]] = field(default_factory=list)


def detail(
    lead: Lead, config: Config, now: datetime, _: Gettext, last_poll: datetime | None = None
) -> Detail:
    """``last_poll``: when the last successful poll ended. Every poll sees a watched lead (in
    its list, or fetched by id when absent) but rewrites it only when it changed, so its stored
    ``last_seen`` is when it last changed; while it is watched, the last poll saw it."""
    ref = lead.referral
    seen = lead.last_seen
    if lead.resolution is None and last_poll is not None and last_poll > seen:
        seen = last_poll
    base = row(lead, config, now, _)
    template = config.partner_center.link_template
    link = template.replace("{id}", quote(lead.id, safe="")) if "{id}" in template else template
    team = [f"{m.name} <{m.email}>" if m.name and m.email else m.name or m.email for m in ref.team]
    return Detail(
        row=base,
        name=ref.name,
        status=" / ".join(x for x in (ref.status, ref.substatus) if x),
        created=when(ref.created, config),
        first_seen=when(lead.first_seen, config),
        last_seen=when(seen, config),
        resolved_at=when(lead.resolved_at, config),
        products=list(ref.products),
        solutions=list(ref.solutions),
        team=team,
        notes=ref.notes,
        link=link,
        silenced=bool(base.silence),
    )


@dataclass(frozen=True)
class SetAside:
    """A record quarantined on its way (issue 20): shown so nobody thinks it was handled."""

    key: str
    lead_id: str
    stage: str
    reason: str
    first_seen: str
    last_seen: str


def set_aside(records: Sequence[Any], config: Config) -> list[SetAside]:
    return [
        SetAside(
            key=r.key,
            lead_id=r.lead_id or "",
            stage=r.stage,
            reason=r.reason,
            first_seen=when(r.first_seen, config),
            last_seen=when(r.last_seen, config),
        )
        for r in records
    ]


@dataclass(frozen=True)
class AnswerLine:
    """One answer given or tried through referral-watch (SPEC 14), for the lead's page."""

    at: str
    who: str
    via: str
    action: str
    reason: str
    result: str
    request_id: str


def audit_lines(entries: Sequence[AuditEntry], config: Config, _: Gettext) -> list[AnswerLine]:
    actions = {
        "accept": _("accept"),
        "decline": _("decline"),
        "claim": _("take it"),
        "take-over": _("take over"),
        "unclaim": _("give up"),
        "lapse": _("claim lapsed"),
    }
    results = {
        "accepted": _("accepted"),
        "declined": _("declined"),
        "changed": _("changed meanwhile, nothing answered"),
        "refused": _("refused: the Referral Admin or Referral User role is missing"),
        "gone": _("gone from Partner Center"),
        "already": _("already answered"),
        "failed": _("failed"),
        "claimed": _("taken"),
        "taken over": _("taken over"),
        "unclaimed": _("given up"),
        "lapsed": _("lapsed unanswered"),
    }
    vias = {"console": _("console"), "command": _("command line"), "alert": _("alert link")}
    return [
        AnswerLine(
            at=when(entry.at, config),
            who=entry.who if entry.name in ("", entry.who) else f"{entry.name} <{entry.who}>",
            via=vias.get(entry.via, entry.via),
            action=actions.get(entry.action, entry.action),
            reason=entry.reason,
            result=results.get(entry.result, entry.result),
            request_id=entry.request_id or "",
        )
        for entry in entries
    ]
