"""Frozen value types. No I/O, no clock: ``now`` is always an argument."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from referral_watch.text import clean_line, clean_notes, currency_code

PENDING = "pending"

# Resolutions a lead can end with (lower-cased substatus, or "gone" after a 404).
ANSWERS = frozenset({"accepted", "declined", "won", "lost"})


class MalformedReferral(ValueError):
    """A record that cannot be watched (no id, no usable createdDateTime)."""


@dataclass(frozen=True)
class TeamMember:
    email: str
    name: str = ""
    notifications: bool = True


@dataclass(frozen=True)
class Referral:
    id: str
    name: str
    customer: str
    created: datetime
    expiration: datetime | None = None
    updated: datetime | None = None
    status: str = ""
    substatus: str = ""
    qualification: str = ""
    type: str = ""
    direction: str = ""
    country: str = ""
    deal_value: Decimal | None = None
    currency: str = ""
    notes: str = ""
    products: tuple[str, ...] = ()
    solutions: tuple[str, ...] = ()  # display names (or ids when a solution has no name)
    solution_ids: tuple[str, ...] = ()
    team: tuple[TeamMember, ...] = ()
    invited_by: str = ""
    raw: str = field(default="{}", repr=False, compare=False)

    @property
    def kind(self) -> str:
        """'co-sell' for opportunities shared by Microsoft or another partner, else 'lead'."""
        if self.type == "Shared":
            return "co-sell"
        if self.invited_by and self.invited_by.lower() != "msft" and self.qualification != "Direct":
            return "co-sell"
        return "lead"

    @property
    def is_pending(self) -> bool:
        return self.substatus.lower() == PENDING

    @property
    def team_emails(self) -> tuple[str, ...]:
        return tuple(m.email for m in self.team if m.email and m.notifications)


def our_members(team: Iterable[TeamMember], domains: Iterable[str]) -> tuple[TeamMember, ...]:
    """The members whose email domain is one of ``domains`` (lower case); with no domains,
    every member (nothing says who is ours). A referral's team holds the people of every
    organization involved, Microsoft's sellers among them."""
    wanted = frozenset(domains)
    if not wanted:
        return tuple(team)
    return tuple(m for m in team if m.email.rpartition("@")[2].strip().lower() in wanted)


def deadline_of(referral: Referral, response_window: timedelta) -> datetime:
    """expirationDateTime when the API gives one, else createdDateTime + the window."""
    return referral.expiration or referral.created + response_window


def parse_time(value: Any) -> datetime | None:
    """Partner Center's UTC timestamps (7 fractional digits, 'Z'); None when absent."""
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise ValueError(f"not a timestamp: {value!r}")
    text = value.strip()
    # fromisoformat takes at most 6 fractional digits before 3.11's relaxed parser; trim to be safe
    head, dot, rest = text.partition(".")
    if dot:
        digits = "".join(ch for ch in rest if ch.isdigit())
        suffix = rest[len(digits) :]
        text = f"{head}.{digits[:6]}{suffix}"
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _raw_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _text(value: Any) -> str:
    """A one-line text field, sanitised at the edge (text.clean_line: SPEC behaviour 9)."""
    return clean_line(_raw_text(value))


def as_decimal(value: Any) -> Decimal | None:
    """A finite amount from a number or text ('25,000.50'); None when there is none."""
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        amount = Decimal(str(value).replace(",", "").strip())
    except InvalidOperation:
        return None
    return amount if amount.is_finite() else None


def _ids(items: Any, key: str = "id") -> tuple[str, ...]:
    return tuple(_text(_obj(item).get(key)) for item in _list(items) if _obj(item).get(key))


def _member(item: Any) -> TeamMember | None:
    member = _obj(item)
    email = _text(member.get("email")).strip()
    if not email:
        return None
    name = " ".join(p for p in (_text(member.get("firstName")), _text(member.get("lastName"))) if p)
    disabled = _obj(member.get("contactPreference")).get("disableNotifications") is True
    return TeamMember(email=email, name=name, notifications=not disabled)


def _optional_time(value: Any) -> datetime | None:
    try:
        return parse_time(value)
    except ValueError:
        return None  # an unreadable optional timestamp is treated as absent


def parse_referral(data: Any, raw: str | None = None) -> Referral:
    """Build a Referral from one API record, tolerating missing and odd fields.

    Raises MalformedReferral only when the record cannot be watched at all.
    """
    if not isinstance(data, dict):
        raise MalformedReferral(f"record is a {type(data).__name__}, not an object")
    ref_id = data.get("id")
    if not isinstance(ref_id, str) or not ref_id.strip():
        raise MalformedReferral("record has no id")
    try:
        created = parse_time(data.get("createdDateTime"))
    except ValueError:
        created = None
    if created is None:
        raise MalformedReferral(f"referral {ref_id} has no valid createdDateTime")
    profile = _obj(data.get("customerProfile"))
    details = _obj(data.get("details"))
    requirements = _obj(details.get("requirements"))
    members = tuple(m for m in (_member(i) for i in _list(data.get("team"))) if m is not None)
    return Referral(
        id=ref_id.strip(),
        name=_text(data.get("name")),
        customer=_text(profile.get("name")) or _text(data.get("name")) or "(unnamed customer)",
        created=created,
        expiration=_optional_time(data.get("expirationDateTime")),
        updated=_optional_time(data.get("updatedDateTime")),
        status=_text(data.get("status")),
        substatus=_text(data.get("substatus")),
        qualification=_text(data.get("qualification")),
        type=_text(data.get("type")),
        direction=_text(data.get("direction")),
        country=_text(_obj(profile.get("address")).get("country")).upper(),
        deal_value=as_decimal(details.get("dealValue")),
        currency=currency_code(_text(details.get("currency"))),
        notes=clean_notes(_raw_text(details.get("notes"))),
        products=_ids(requirements.get("products")),
        solutions=tuple(
            _text(_obj(s).get("name")) or _text(_obj(s).get("id"))
            for s in _list(requirements.get("solutions"))
            if _obj(s).get("name") or _obj(s).get("id")
        ),
        solution_ids=_ids(requirements.get("solutions")),
        team=members,
        invited_by=_text(
            _obj(_obj(data.get("inviteContext")).get("invitedBy")).get("organizationId")
        ),
        raw=raw if raw is not None else json.dumps(data, separators=(",", ":"), sort_keys=True),
    )


@dataclass(frozen=True)
class AuditEntry:
    """One answer given (or refused) through referral-watch (SPEC 14): who, when, what, result.

    ``result`` is ``accepted`` or ``declined`` when Partner Center took the answer, else why
    not: ``changed`` (412), ``refused`` (403), ``gone`` (404), ``already`` (no longer pending),
    ``failed`` (any other error). Never holds a token.
    """

    lead_id: str
    at: datetime
    who: str  # the person's email (console) or the signed-in account / operator (command)
    name: str  # how to call them in a notice: "Ann de Vries"
    via: str  # "console" | "command"
    action: str  # "accept" | "decline"
    result: str
    reason: str = ""
    detail: str = ""
    request_id: str | None = None  # Partner Center's Request-ID of the PATCH

    @property
    def answered(self) -> bool:
        return self.result in ("accepted", "declined")


@dataclass(frozen=True)
class Lead:
    """A referral as the state file knows it."""

    referral: Referral
    deadline: datetime
    first_seen: datetime
    last_seen: datetime
    resolution: str | None = None  # None while watched
    resolved_at: datetime | None = None
    silenced_until: datetime | None = None
    silence_through_deadline: bool = False
    silence_reason: str = ""
    expired_notified: bool = False
    resolution_notified: bool = False
    tiers_sent: tuple[str, ...] = ()
    answered: AuditEntry | None = None  # the answer given through referral-watch, if any

    @property
    def id(self) -> str:
        return self.referral.id

    def remaining(self, now: datetime) -> timedelta:
        return self.deadline - now

    def silenced(self, now: datetime) -> bool:
        return self.silenced_until is not None and self.silenced_until > now


# --- what policy decides and what has been sent ------------------------------------------

TIER = "tier"
EXPIRED = "expired"
RESOLVED = "resolved"


@dataclass(frozen=True)
class Sent:
    """One row of the outbox/history, as far as the policy needs it."""

    lead_id: str
    kind: str  # TIER | EXPIRED | RESOLVED
    channel: str
    tier: str | None
    state: str  # "pending" | "delivered" | "skipped" | "superseded" | "dropped"
    created: datetime


@dataclass(frozen=True)
class Alert:
    """A decision: enqueue one message for one lead and channel, or record a tier as skipped."""

    lead_id: str
    kind: str  # TIER | EXPIRED | RESOLVED
    channel: str
    tier: str | None = None
    severity: int = -1  # index into config.policy.tiers (higher = more severe); -1 for notices
    skipped: bool = False


@dataclass(frozen=True)
class Message:
    """What a channel receives: a short title, a Markdown body and Apprise's notification type
    (info, success, warning, failure: the colour and icon Slack, Teams or Discord show)."""

    title: str
    body: str
    notify_type: str = "info"


@dataclass(frozen=True)
class PendingRow:
    """An outbox row waiting for delivery."""

    id: int
    lead_id: str | None  # None for messages about no single lead (ops, test, report)
    kind: str  # TIER | EXPIRED | RESOLVED (lead alerts); other kinds carry their own text
    channel: str
    tier: str | None
    created: datetime
    attempts: int = 0


@dataclass(frozen=True)
class Batch:
    """One message to send: a single alert, or a digest of several for one channel and tier."""

    channel: str
    kind: str
    tier: str | None
    row_ids: tuple[int, ...]
    lead_ids: tuple[str, ...]  # most urgent first; a digest lists at most digest_limit of them
    digest: bool = False
    more: int = 0  # leads in the digest beyond digest_limit
    recipients: tuple[str, ...] = ()  # to_assignees email channels: the lead team's addresses
