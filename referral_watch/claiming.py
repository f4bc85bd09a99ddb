"""Claiming a lead (SPEC 17), for `referral-watch claim`/`unclaim` and the console.

One function each for the command line and the web pages: ``claim_lead`` and ``unclaim_lead``.
A claim by another person than the one holding the lead is refused (naming the owner) unless a
take-over is asked for. With ``claims.add_to_team`` the owner is also added to the referral's
team in Partner Center (GET by id for the eTag, then PATCH ``add /team/-`` with If-Match); a
refusal there is reported and the claim still holds. Status and substatus are never touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import structlog

from referral_watch.config import Config
from referral_watch.errors import ReferralWatchError
from referral_watch.model import Claim, Lead, parse_referral
from referral_watch.partner_center.answering import AnswerApi, Person
from referral_watch.state.claims import Written

log = structlog.get_logger(__name__)

NOTE_LIMIT = 500
_EMAIL = re.compile(r"[^@\s,;<>]+@[^@\s,;<>]+\.[^@\s,;<>]+")

CLAIMED, TAKEN_OVER, ALREADY_YOURS, HELD = "claimed", "taken-over", "already-yours", "held"
UNCLAIMED, NOT_CLAIMED = "unclaimed", "not-claimed"

NO_CLAIMS = (
    "claims are not set up: add a [claims] section to the config (owner_channel = an email "
    'channel, lapse_after = "2d"), then run check-config'
)


class ClaimStore(Protocol):
    def lead(self, lead_id: str) -> Lead | None: ...

    def put_claim(self, claim: Claim, now: datetime, *, take_over: bool = False) -> Written: ...

    def drop_claim(
        self, lead_id: str, who: str, name: str, via: str, now: datetime, owner_channel: str | None
    ) -> Claim | None: ...


class ClaimRefused(ReferralWatchError):
    """Nothing was claimed: no [claims] section, an unknown lead, one that no longer waits, or
    an address that is not one."""


@dataclass(frozen=True)
class TeamResult:
    """What Partner Center said to adding the owner to the referral's team."""

    ok: bool
    message: str


@dataclass(frozen=True)
class ClaimOutcome:
    code: str  # CLAIMED | TAKEN_OVER | ALREADY_YOURS | HELD | UNCLAIMED | NOT_CLAIMED
    message: str  # one line for the command line and the log
    claim: Claim | None = None  # the claim in force now (None after an unclaim)
    previous: Claim | None = None  # the claim replaced, or the one that refused us
    team: TeamResult | None = None

    @property
    def ok(self) -> bool:
        """The person holds the lead now (a claim), or nobody does (an unclaim)."""
        return self.code != HELD


def owner_text(claim: Claim) -> str:
    """'Ann de Vries (ann@contoso.com)', or the address alone."""
    if claim.name and claim.name.lower() != claim.email.lower():
        return f"{claim.name} ({claim.email})"
    return claim.email


def _waiting_lead(store: ClaimStore, lead_id: str, now: datetime) -> Lead:
    lead = store.lead(lead_id)
    if lead is None:
        raise ClaimRefused(f"no lead with id {lead_id!r} in the state file")
    if lead.resolution is not None:
        raise ClaimRefused(
            f"{lead.referral.customer} was already answered ({lead.resolution}): nothing to claim"
        )
    if lead.remaining(now) < timedelta(0):
        raise ClaimRefused(f"{lead.referral.customer} is past its deadline: nothing to claim")
    return lead


def _person_name(lead: Lead, person: Person, email: str) -> str:
    """The name given, else the referral team member's with this address, else none ("")."""
    if person.name.strip() and person.name.strip().lower() != email:
        return " ".join(person.name.split())
    for member in lead.referral.team:
        if member.email.strip().lower() == email and member.name:
            return member.name
    return ""


def claim_lead(
    store: ClaimStore,
    config: Config,
    lead_id: str,
    person: Person,
    now: datetime,
    *,
    note: str = "",
    take_over: bool = False,
    api: AnswerApi | None = None,
    token: str | None = None,
) -> ClaimOutcome:
    """Make ``person`` the owner of a waiting lead. Raises ClaimRefused (nothing written) when
    claims are not configured, the lead is unknown or no longer waits, or ``person.who`` is not
    an email address; returns HELD (nothing written) when another person holds it."""
    claims = config.claims
    if claims is None:
        raise ClaimRefused(NO_CLAIMS)
    email = person.who.strip().lower()
    if not _EMAIL.fullmatch(email):
        raise ClaimRefused(f"{person.who!r} is not an email address: the owner is one")
    note = " ".join(note.split())
    if len(note) > NOTE_LIMIT:
        raise ClaimRefused(f"the note is too long ({len(note)} characters, at most {NOTE_LIMIT})")
    lead = _waiting_lead(store, lead_id, now)
    name = _person_name(lead, person, email)
    claim = Claim(lead.id, email, name, now, now + claims.lapse_after, person.via, note)
    written = store.put_claim(claim, now, take_over=take_over)
    customer = lead.referral.customer
    previous = written.previous
    if not written.won:
        assert previous is not None
        text = (
            f"{customer} is claimed by {owner_text(previous)} since "
            f"{previous.at:%Y-%m-%d %H:%M} UTC (until {previous.lapses_at:%Y-%m-%d %H:%M} UTC); "
            "nothing changed (take it over with --take-over)"
        )
        log.info("claim.refused", lead=lead.id, who=email, via=person.via, owner=previous.email)
        return ClaimOutcome(HELD, text, previous, previous)
    if previous is not None and previous.email.lower() != email:
        code, verb = TAKEN_OVER, f"taken over from {owner_text(previous)} by"
    elif previous is not None:
        code, verb = ALREADY_YOURS, "still claimed by"
    else:
        code, verb = CLAIMED, "claimed by"
    text = f"{customer} {verb} {owner_text(claim)} until {claim.lapses_at:%Y-%m-%d %H:%M} UTC"
    log.info("claim.done", lead=lead.id, who=email, via=person.via, result=code)
    team = None
    if claims.add_to_team and api is not None:
        team = add_to_team(api, lead.id, claim, token=token)
    return ClaimOutcome(code, text, claim, previous, team)


def unclaim_lead(
    store: ClaimStore, config: Config, lead_id: str, person: Person, now: datetime
) -> ClaimOutcome:
    """End the lead's claim, whoever holds it (escalation goes to the team again)."""
    claims = config.claims
    if claims is None:
        raise ClaimRefused(NO_CLAIMS)
    lead = store.lead(lead_id)
    if lead is None:
        raise ClaimRefused(f"no lead with id {lead_id!r} in the state file")
    ended = store.drop_claim(
        lead.id, person.who, person.name, person.via, now, claims.owner_channel
    )
    customer = lead.referral.customer
    if ended is None:
        return ClaimOutcome(NOT_CLAIMED, f"{customer} was not claimed")
    log.info("claim.ended", lead=lead.id, who=person.who, via=person.via, owner=ended.email)
    text = f"{customer} is no longer claimed by {owner_text(ended)}; reminders go to the team"
    return ClaimOutcome(UNCLAIMED, text, None, ended)


# --- Partner Center: the owner on the referral's team -------------------------------------


def team_member(claim: Claim) -> dict[str, Any]:
    """The team member to add: Microsoft's member shape (email, firstName, lastName)."""
    first, _, last = claim.name.partition(" ")
    return {"email": claim.email, "firstName": first, "lastName": last}


def team_operations(claim: Claim) -> list[dict[str, Any]]:
    """The JSON Patch document: one ``add /team/-`` (reference: "Update a lead or
    opportunity", https://learn.microsoft.com/en-us/partner-center/developer/patch-a-referral)."""
    return [{"op": "add", "path": "/team/-", "value": team_member(claim)}]


def add_to_team(
    api: AnswerApi, lead_id: str, claim: Claim, *, token: str | None = None
) -> TeamResult:
    """Add the owner to the referral's team in Partner Center, unless already on it: the record
    by id for its eTag, then one PATCH with If-Match. Never raises; never changes the status."""
    try:
        record = api.current(lead_id, token=token)
        if record is None:
            return TeamResult(False, "Partner Center no longer knows this referral (404)")
        team = parse_referral(record).team
        if any(member.email.strip().lower() == claim.email for member in team):
            return TeamResult(True, f"{claim.email} is already on the referral's team")
        api.patch(lead_id, team_operations(claim), etag=record.get("eTag"), token=token)
    except ReferralWatchError as exc:
        log.warning("claim.team_refused", lead=lead_id, who=claim.email, reason=str(exc))
        return TeamResult(False, f"Partner Center refused to add {claim.email} to the team: {exc}")
    except ValueError as exc:  # a record we cannot read (MalformedReferral)
        return TeamResult(False, f"the referral's record cannot be read: {exc}")
    log.info("claim.team_added", lead=lead_id, who=claim.email)
    return TeamResult(True, f"{claim.email} added to the referral's team in Partner Center")
