"""PURE: the report's claims part (SPEC 17): time to claim and time to answer, per person and
for the team, as median and 90th percentile.

Definitions (the contract the docs and tests describe):

- *time to claim*: from when referral-watch first saw the lead (its first alert) to a claim or
  take-over made in the period; per person for each of their claims, for the team the first
  claim of each lead.
- *time to answer*: for a lead answered in the period while claimed, from the owner's claim to
  the answer; per owner, and for the team over all of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from referral_watch.model import ANSWERS, AuditEntry, Lead

CLAIMING = ("claim", "take-over")
ENDING = ("unclaim", "lapse")


@dataclass(frozen=True)
class Spread:
    count: int
    median: timedelta | None
    p90: timedelta | None


@dataclass(frozen=True)
class PersonStats:
    email: str
    name: str
    claimed: Spread  # time to claim, over their claims in the period
    answered: Spread  # time to answer, over the leads answered while theirs


@dataclass(frozen=True)
class ClaimStats:
    claimed: Spread  # the team: the first claim of each lead
    answered: Spread  # the team: every lead answered while claimed
    people: tuple[PersonStats, ...]  # most claims first


def percentile(values: Sequence[timedelta], fraction: float) -> timedelta | None:
    """Linear interpolation between closest ranks (numpy's default, Excel's PERCENTILE.INC)."""
    if not values:
        return None
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def spread(values: Sequence[timedelta]) -> Spread:
    return Spread(len(values), percentile(values, 0.5), percentile(values, 0.9))


def claim_stats(
    leads: Iterable[Lead],
    events: Sequence[AuditEntry],
    start: datetime,
    now: datetime,
    answered_at: Mapping[str, datetime] | None = None,
) -> ClaimStats | None:
    """The claims part of the report over [start, now]; None when nothing was claimed in it.
    ``events``: the audit's claim events (any time: an answer in the period may follow a claim
    made before it), oldest first; ``answered_at``: when each answered lead was answered."""
    by_id = {lead.id: lead for lead in leads}
    names: dict[str, str] = {}
    to_claim: dict[str, list[timedelta]] = {}
    team_claim: dict[str, timedelta] = {}
    for event in events:
        lead = by_id.get(event.lead_id)
        if event.action not in CLAIMING or lead is None or not start <= event.at <= now:
            continue
        names[event.who] = event.name or event.who
        took = max(timedelta(0), event.at - lead.first_seen)
        to_claim.setdefault(event.who, []).append(took)
        team_claim.setdefault(lead.id, took)
    to_answer = _answer_times(by_id, events, start, now, answered_at or {})
    for who in to_answer:
        names.setdefault(who, who)
    if not to_claim and not to_answer:
        return None
    people = [
        PersonStats(who, names[who], spread(to_claim.get(who, [])), spread(to_answer.get(who, [])))
        for who in names
    ]
    people.sort(key=lambda p: (-p.claimed.count, -p.answered.count, p.email))
    every_answer = [value for values in to_answer.values() for value in values]
    return ClaimStats(spread(list(team_claim.values())), spread(every_answer), tuple(people))


def _answer_times(
    by_id: Mapping[str, Lead],
    events: Sequence[AuditEntry],
    start: datetime,
    now: datetime,
    answered_at: Mapping[str, datetime],
) -> dict[str, list[timedelta]]:
    """Owner -> time from their claim to the answer, for leads answered in the period."""
    owners: dict[str, AuditEntry | None] = {}  # lead -> the claim holding at its answer
    for event in events:
        lead = by_id.get(event.lead_id)
        if lead is None or lead.resolution not in ANSWERS or lead.resolved_at is None:
            continue
        if event.at > answered_at.get(lead.id, lead.resolved_at):
            continue
        if event.action in CLAIMING:
            owners[lead.id] = event
        elif event.action == "unclaim" or (
            event.action == "lapse" and owners.get(lead.id) is not None
        ):
            owners[lead.id] = None
    times: dict[str, list[timedelta]] = {}
    for lead_id, claim in owners.items():
        lead = by_id[lead_id]
        answered = answered_at.get(lead_id, lead.resolved_at or now)
        if claim is None or not start <= answered <= now:
            continue
        times.setdefault(claim.who, []).append(max(timedelta(0), answered - claim.at))
    return times


def _seconds(value: timedelta | None) -> int | None:
    return None if value is None else round(value.total_seconds())


def _spread_json(value: Spread) -> dict[str, Any]:
    return {
        "count": value.count,
        "median_seconds": _seconds(value.median),
        "p90_seconds": _seconds(value.p90),
    }


def claims_json(stats: ClaimStats) -> dict[str, Any]:
    return {
        "team": {
            "time_to_claim": _spread_json(stats.claimed),
            "time_to_answer": _spread_json(stats.answered),
        },
        "per_person": [
            {
                "email": p.email,
                "name": p.name,
                "time_to_claim": _spread_json(p.claimed),
                "time_to_answer": _spread_json(p.answered),
            }
            for p in stats.people
        ],
    }


def claims_facts(stats: ClaimStats) -> list[tuple[str, str, Any]]:
    """(metric, key, value) rows for the CSV: key "" is the team, else the person's email."""
    facts: list[tuple[str, str, Any]] = []
    rows = [("", stats.claimed, stats.answered)]
    rows += [(p.email, p.claimed, p.answered) for p in stats.people]
    for key, claimed, answered in rows:
        facts += [
            ("claims", key, claimed.count),
            ("claim_median_seconds", key, _seconds(claimed.median)),
            ("claim_p90_seconds", key, _seconds(claimed.p90)),
            ("answered_while_claimed", key, answered.count),
            ("claimed_answer_median_seconds", key, _seconds(answered.median)),
            ("claimed_answer_p90_seconds", key, _seconds(answered.p90)),
        ]
    return facts


def claims_rows(stats: ClaimStats, span: Any) -> list[tuple[str, ...]]:
    """Table rows (who, claims, time to claim median / p90, answered, time to answer median /
    p90) for people: the team first; ``span`` formats a duration (None: "-")."""
    header = ("", "claims", "to claim (median / p90)", "answered", "to answer (median / p90)")
    rows = [header, _row("team", stats.claimed, stats.answered, span)]
    rows += [_row(p.name or p.email, p.claimed, p.answered, span) for p in stats.people]
    return rows


def _row(who: str, claimed: Spread, answered: Spread, span: Any) -> tuple[str, ...]:
    return (
        who,
        str(claimed.count),
        f"{span(claimed.median)} / {span(claimed.p90)}",
        str(answered.count),
        f"{span(answered.median)} / {span(answered.p90)}",
    )
