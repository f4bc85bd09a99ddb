"""Frozen value types. No I/O, no clock: ``now`` is always an argument."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import xxhash

from referral_watch.text import clean_line, clean_notes, currency_code

PENDING = "pending"
# Substatuses that still wait for the partner's answer ("" and "none": no answer either).
WAITING = frozenset({PENDING, "received", "", "none"})

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
    def awaiting_answer(self) -> bool:
        """Still waiting for the partner's answer: the one rule for polls, webhook leads and
        answering. New (Pending) or Received (opened, not answered): the 14 days still run; a
        substatus of "None", or none at all, is no answer either (keep watching)."""
        return awaiting_answer(self.substatus)

    @property
    def team_emails(self) -> tuple[str, ...]:
        return tuple(m.email for m in self.team if m.email and m.notifications)


def awaiting_answer(substatus: str) -> bool:
    """Whether a referral with this substatus still waits for the partner's answer (see
    ``Referral.awaiting_answer``): the one rule."""
    return substatus.lower() in WAITING


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


# Timestamps outside these bounds are not real: a year-9999 date plus 14 days overflows, a
# year-1 date shown west of UTC underflows. Leaves room for durations of up to ten years.
EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)
LATEST = datetime(9000, 1, 1, tzinfo=UTC)
# Deal values at or beyond this are not real either (Babel cannot format 1e28 and up).
DEAL_VALUE_LIMIT = Decimal("1e18")

# The documented enum values, so that any spelling ("ACCEPTED", "accepted") reads as one.
_ENUMS = {
    name.lower(): name
    for name in [
        "None",
        "New",
        "Active",
        "Closed",
        "Pending",
        "Received",
        "Accepted",
        "Won",
        "Lost",
        "Declined",
        "Expired",
        "Direct",
        "MarketingQualified",
        "SalesQualified",
        "Independent",
        "Shared",
        "Incoming",
        "Outgoing",
    ]
}
_SURROGATES = re.compile("[\ud800-\udfff]")
_MISSING = object()


def parse_time(value: Any) -> datetime | None:
    """Partner Center's UTC timestamps (7 fractional digits, 'Z'); None when absent.

    Raises ValueError for text that is not a timestamp or one outside EARLIEST..LATEST."""
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise ValueError(f"not a timestamp: {str(value)[:40]!r}")
    text = value.strip()
    if (
        len(text) == 28
        and text.find(".") == 19
        and text[27] == "Z"
        and text[20:27].isdigit()
        and "Z" not in text[:19]
    ):  # Partner Center's own shape (7 digits, Z): the text the lines below make of it, sooner
        text = text[:26] + "+00:00"
    else:
        # fromisoformat takes at most 6 fractional digits before 3.11's relaxed parser; trim
        head, dot, rest = text.partition(".")
        if dot:
            digits = "".join(ch for ch in rest if ch.isdigit())
            suffix = rest[len(digits) :]
            text = f"{head}.{digits[:6]}{suffix}"
        text = text.replace("Z", "+00:00")
    try:
        parsed = datetime.fromisoformat(text)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        parsed = parsed.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+05:00
        parsed = EARLIEST - timedelta(days=1)
    if not EARLIEST <= parsed <= LATEST:
        raise ValueError(
            f"{value[:40]!r} is outside {EARLIEST.year}-{LATEST.year}, not a real timestamp"
        )
    return parsed


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _get(fields: dict[str, Any], key: str) -> Any:
    """fields[key], else the value of a key spelt in another case (Microsoft's own 2018
    sample writes "Substatus"); None when there is neither."""
    value = fields.get(key, _MISSING)
    if value is not _MISSING:
        return value
    lower = key.lower()
    for name, other in fields.items():
        if isinstance(name, str) and name.lower() == lower:
            return other
    return None


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _raw_text(value: Any) -> str:
    """Text for a field, whatever JSON value it holds; a lone UTF-16 surrogate ("\\ud800"),
    which no database or channel can encode, becomes U+FFFD."""
    if value is None:
        return ""
    if not isinstance(value, str):
        try:
            value = str(value)
        except ValueError:  # an integer too long to print
            return ""
    return _SURROGATES.sub("\ufffd", value) if _SURROGATES.search(value) else value


def usable_id(ref_id: str) -> bool:
    """Whether an id can be stored and looked up: no lone surrogate, at most 200 characters."""
    return len(ref_id) <= 200 and not _SURROGATES.search(ref_id)


def _enum(value: Any) -> str:
    text = _text(value)
    return _ENUMS.get(text.lower(), text)


def _text(value: Any) -> str:
    """A one-line text field, sanitised at the edge (text.clean_line: SPEC behaviour 9)."""
    return clean_line(_raw_text(value))


def as_decimal(value: Any) -> Decimal | None:
    """A finite amount from a number or text ('25,000.50'); None when there is none."""
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        amount = Decimal(_raw_text(value).replace(",", "").strip())
    except InvalidOperation:
        return None
    return amount if amount.is_finite() else None


def _deal_value(value: Any) -> Decimal | None:
    amount = as_decimal(value)
    return amount if amount is not None and abs(amount) < DEAL_VALUE_LIMIT else None


def _ids(items: Any, key: str = "id") -> tuple[str, ...]:
    values = (_get(_obj(item), key) for item in _list(items))
    return tuple(_text(value) for value in values if value)


def _member(item: Any) -> TeamMember | None:
    member = _obj(item)
    email = _text(_get(member, "email")).strip()
    if not email:
        return None
    name = " ".join(
        p for p in (_text(_get(member, "firstName")), _text(_get(member, "lastName"))) if p
    )
    disabled = _get(_obj(_get(member, "contactPreference")), "disableNotifications") is True
    return TeamMember(email=email, name=name, notifications=not disabled)


def _optional_time(value: Any) -> datetime | None:
    try:
        return parse_time(value)
    except ValueError:
        return None  # an unreadable optional timestamp is treated as absent


def _solutions(items: Any) -> tuple[str, ...]:
    names = (_text(_get(_obj(s), "name")) or _text(_get(_obj(s), "id")) for s in _list(items))
    return tuple(name for name in names if name)


def record_digest(raw: bytes | memoryview | str) -> str:
    """The digest of a record's JSON exactly as served (its UTF-8 bytes): the state keeps it
    beside the record, so a poll recognises an unchanged record without decoding it.

    XXH3-128 (xxhash): a change of one byte, or of many by chance, makes another digest
    (two different records share one with odds of 2^-128). It is not a cryptographic hash:
    someone who could choose a whole record's bytes could make two alike, but every record
    carries Microsoft's own id, dates and eTag, which a sender can neither choose nor
    foresee, and what a digest decides is only whether a record is read again. It is
    about 15 times as fast as SHA-256 (until 0.3; a stored SHA-256 digest matches no
    XXH3 one, so the first poll after the upgrade reads each record once more)."""
    return record_digests((raw,))[0]


def record_digests(items: Iterable[bytes | memoryview | str]) -> list[str]:
    """``record_digest`` of each item, in one pass (a page's at once)."""
    xxh = xxhash.xxh3_128_hexdigest
    return [
        xxh(item.encode("utf-8", "surrogatepass") if isinstance(item, str) else item)
        for item in items
    ]


def parse_referral(data: Any, raw: str | None = None) -> Referral:
    """Build a Referral from one API record, tolerating missing and odd fields; keys and
    enum values are read in any case.

    Raises MalformedReferral only when the record cannot be watched at all.
    """
    if not isinstance(data, dict):
        raise MalformedReferral(f"record is a {type(data).__name__}, not an object")
    ref_id = _get(data, "id")
    if not isinstance(ref_id, str) or not ref_id.strip():
        raise MalformedReferral("record has no id")
    try:
        created = parse_time(_get(data, "createdDateTime"))
    except ValueError as exc:
        raise MalformedReferral(f"referral {ref_id} has no valid createdDateTime: {exc}") from None
    if created is None:
        raise MalformedReferral(f"referral {ref_id} has no valid createdDateTime")
    profile = _obj(_get(data, "customerProfile"))
    details = _obj(_get(data, "details"))
    requirements = _obj(_get(details, "requirements"))
    members = tuple(m for m in (_member(i) for i in _list(_get(data, "team"))) if m is not None)
    invited_by = _obj(_get(_obj(_get(data, "inviteContext")), "invitedBy"))
    name = _text(_get(data, "name"))
    return Referral(
        id=ref_id.strip(),
        name=name,
        customer=_text(_get(profile, "name")) or name or "(unnamed customer)",
        created=created,
        expiration=_optional_time(_get(data, "expirationDateTime")),
        updated=_optional_time(_get(data, "updatedDateTime")),
        status=_enum(_get(data, "status")),
        substatus=_enum(_get(data, "substatus")),
        qualification=_enum(_get(data, "qualification")),
        type=_enum(_get(data, "type")),
        direction=_enum(_get(data, "direction")),
        country=_text(_get(_obj(_get(profile, "address")), "country")).upper(),
        deal_value=_deal_value(_get(details, "dealValue")),
        currency=currency_code(_text(_get(details, "currency"))),
        notes=clean_notes(_raw_text(_get(details, "notes"))),
        products=_ids(_get(requirements, "products")),
        solutions=_solutions(_get(requirements, "solutions")),
        solution_ids=_ids(_get(requirements, "solutions")),
        team=members,
        invited_by=_text(_get(invited_by, "organizationId")),
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


# How a claim was made or ended (audit actions, SPEC 17).
CLAIM_ACTIONS = ("claim", "take-over", "unclaim", "lapse")


@dataclass(frozen=True)
class Claim:
    """Who took a lead without answering it yet (SPEC 17), and until when that holds."""

    lead_id: str
    email: str
    name: str  # how to call them: "Ann de Vries" (the email when no name is known)
    at: datetime
    lapses_at: datetime
    via: str  # "command" | "console" | "alert" (the Take-it link)
    note: str = ""

    def holds(self, now: datetime) -> bool:
        """Still in force at ``now`` (not lapsed)."""
        return now < self.lapses_at

    @property
    def first_name(self) -> str:
        """'Ann' of 'Ann de Vries' (the notice "Ann's claim on Fabrikam lapsed")."""
        words = self.name.split()
        return words[0] if words else self.email.partition("@")[0]


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
    claim: Claim | None = None  # the current claim, lapsed or not (see claimed())

    @property
    def id(self) -> str:
        return self.referral.id

    def remaining(self, now: datetime) -> timedelta:
        return self.deadline - now

    def silenced(self, now: datetime) -> bool:
        return self.silenced_until is not None and self.silenced_until > now

    def claimed(self, now: datetime) -> Claim | None:
        """The claim in force at ``now``: none once it lapsed or the lead is answered."""
        if self.claim is None or self.resolution is not None or not self.claim.holds(now):
            return None
        return self.claim


# --- what policy decides and what has been sent ------------------------------------------

TIER = "tier"
EXPIRED = "expired"
RESOLVED = "resolved"
CLAIMED = "claimed"  # the team hears "Fabrikam taken by Ann de Vries" (SPEC 17)
LAPSED = "lapsed"  # the team hears "Ann's claim on Fabrikam lapsed"


@dataclass(frozen=True)
class Sent:
    """One row of the outbox/history, as far as the policy needs it."""

    lead_id: str
    kind: str  # TIER | EXPIRED | RESOLVED | CLAIMED | LAPSED
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
    # What it is about, for structured channels (incident tools): the outbox kind (TIER,
    # EXPIRED, RESOLVED, ops, report ...), the tier, and each lead with its link.
    kind: str = ""
    tier: str | None = None
    about: tuple[tuple[Lead, str], ...] = field(default=(), compare=False)
    # Buttons (label, URL) for channels that draw them (a Teams card: Accept, Decline, Take it,
    # Open); the body then leaves those links out. Other channels get the links in the body.
    actions: tuple[tuple[str, str], ...] = ()

    def body_with_links(self) -> str:
        """The body with the actions as Markdown links, for what draws no buttons (a channel
        that is not a Teams card, the dry run)."""
        if not self.actions:
            return self.body
        return f"{self.body}\n\n" + " · ".join(f"[{text}]({url})" for text, url in self.actions)


@dataclass(frozen=True, slots=True)  # slots: a first cycle holds tens of thousands of rows
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
    recipients: tuple[str, ...] = ()  # to_assignees: the lead team's; owner channel: the owner's
