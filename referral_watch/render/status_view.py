"""How `status` shows leads: a table for people, JSON for scripts, routing explained."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from referral_watch import policy
from referral_watch.config import Config
from referral_watch.model import CLAIM_ACTIONS, AuditEntry, Lead
from referral_watch.redact import scrub
from referral_watch.render.i18n import money_text, time_left_text
from referral_watch.state.journal import PollRecord
from referral_watch.state.leads import Silence
from referral_watch.state.quarantine import Quarantined
from referral_watch.text import clip, columns, iso_utc, terminal

# CLI output stays English whatever the alert locale.
CLI_LOCALE = "en-US"


def as_json(lead: Lead, now: datetime, quarantined: Quarantined | None = None) -> dict[str, Any]:
    ref = lead.referral
    return {
        "id": lead.id,
        "customer": ref.customer,
        "name": ref.name,
        "kind": ref.kind,
        "status": ref.status,
        "substatus": ref.substatus,
        "created": _iso(ref.created),
        "deadline": _iso(lead.deadline),
        "remaining_seconds": int((lead.deadline - now).total_seconds()),
        "deal_value": float(ref.deal_value) if ref.deal_value is not None else None,
        "currency": ref.currency or None,
        "country": ref.country or None,
        "team": list(ref.team_emails),
        "tiers_sent": list(lead.tiers_sent),
        "silenced_until": _iso(lead.silenced_until) if lead.silenced(now) else None,
        "silence_reason": lead.silence_reason if lead.silenced(now) else None,
        "resolution": lead.resolution,
        "first_seen": _iso(lead.first_seen),
        "resolved_at": _iso(lead.resolved_at) if lead.resolved_at else None,
        "answered_by": _answered_by(lead.answered),
        "claimed_by": claim_json(lead, now),
        "quarantined": _set_aside(quarantined),
    }


def claim_json(lead: Lead, now: datetime) -> dict[str, Any] | None:
    """Who holds the lead now (SPEC 17: ``claimed_by``), or None (never claimed, lapsed,
    unclaimed or answered)."""
    claim = lead.claimed(now)
    if claim is None:
        return None
    return {
        "email": claim.email,
        "name": claim.name,
        "at": _iso(claim.at),
        "lapses_at": _iso(claim.lapses_at),
        "via": claim.via,
    }


def _set_aside(item: Quarantined | None) -> dict[str, Any] | None:
    """Why a watched lead's record is set aside (its message cannot be made...), or None."""
    if item is None:
        return None
    return {"stage": item.stage, "reason": item.reason, "since": _iso(item.first_seen)}


def quarantined_json(item: Quarantined) -> dict[str, Any]:
    """One record set aside, for `status --json --quarantined`."""
    return {
        "id": item.key,
        "lead_id": item.lead_id,
        "stage": item.stage,
        "reason": item.reason,
        "first_seen": _iso(item.first_seen),
        "last_seen": _iso(item.last_seen),
        "operations_told": item.notified,
    }


def quarantine_lines(items: Sequence[Quarantined], limit: int = 10) -> list[str]:
    """The records set aside, for people: id, where it failed, why."""
    if not items:
        return []
    lines = [f"{len(items)} record(s) set aside (quarantined), not watched until fixed:"]
    lines += [f"  {clip(q.key, 40)}  {q.stage}: {clip(q.reason, 100)}" for q in items[:limit]]
    if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more: `referral-watch status --quarantined`")
    return lines


def _answered_by(entry: AuditEntry | None) -> dict[str, Any] | None:
    """Who answered the lead through referral-watch (SPEC 14), or None."""
    if entry is None:
        return None
    return {
        "name": entry.name,
        "who": entry.who,
        "via": entry.via,
        "at": _iso(entry.at),
        "answer": entry.result,
        "reason": entry.reason or None,
        "request_id": entry.request_id,
    }


def _iso(moment: datetime | None) -> str | None:
    return iso_utc(moment) if moment else None


SHORT_ID_MIN = 8


def short_ids(ids: Iterable[str], minimum: int = SHORT_ID_MIN) -> dict[str, str]:
    """Each id's shortest prefix that no other id shares, at least ``minimum`` characters
    (the whole id when it is shorter, or a prefix of another id)."""
    ordered = sorted(set(ids))
    shortest: dict[str, str] = {}
    for index, lead_id in enumerate(ordered):
        neighbours = ordered[max(0, index - 1) : index] + ordered[index + 1 : index + 2]
        shared = max((_common_length(lead_id, other) for other in neighbours), default=0)
        shortest[lead_id] = lead_id[: max(minimum, shared + 1)]
    return shortest


def _common_length(a: str, b: str) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


def table(
    leads: list[Lead],
    config: Config,
    now: datetime,
    last: PollRecord | None,
    all_ids: Iterable[str] = (),
    quarantined: Sequence[Quarantined] = (),
) -> str:
    """``all_ids``: every id in the state, so each short id shown is unique among them;
    ``quarantined``: the records set aside, listed below the table."""
    zone = ZoneInfo(config.messages.timezone)
    short = short_ids([*all_ids, *(lead.id for lead in leads)])
    header = (
        "ID",
        "CUSTOMER",
        "VALUE",
        "CREATED",
        "DEADLINE",
        "LEFT",
        "TIERS SENT",
        "OWNER",
        "SILENCE/STATE",
    )
    rows = [header]
    for lead in sorted(leads, key=lambda x: (x.resolution is not None, x.deadline)):
        ref = lead.referral
        state = lead.resolution or (
            f"until {lead.silenced_until.astimezone(zone):%m-%d %H:%M}"
            if lead.silenced(now) and lead.silenced_until
            else ""
        )
        rows.append(
            (
                short[lead.id],
                clip(ref.customer, 32),
                money_text(ref.deal_value, ref.currency, CLI_LOCALE) or "-",
                f"{ref.created.astimezone(zone):%Y-%m-%d}",
                f"{lead.deadline.astimezone(zone):%Y-%m-%d %H:%M}",
                time_left_text(lead.deadline - now, CLI_LOCALE),
                ",".join(lead.tiers_sent) or "-",
                _owner(lead, now),
                state or "-",
            )
        )
    lines = columns(rows)
    watched = sum(1 for lead in leads if lead.resolution is None)
    lines.append("")
    lines.append(f"{watched} lead(s) waiting for an answer; times in {config.messages.timezone}.")
    if leads:
        lines.append("Any command taking an ID accepts the short one shown.")
    lines.append(_poll_line(last))
    lines += quarantine_lines(quarantined)
    return terminal("\n".join(lines))  # Partner Center text never drives the terminal


def _owner(lead: Lead, now: datetime) -> str:
    claim = lead.claimed(now)
    return clip(claim.name or claim.email, 24) if claim is not None else "-"


def claim_lines(lead: Lead, config: Config, now: datetime) -> list[str]:
    """Who holds the lead and where each tier goes meanwhile (`status --explain`)."""
    claim = lead.claimed(now)
    if claim is None:
        if lead.claim is not None and config.claims is not None:
            return [
                f"  claim by {lead.claim.email} lapsed {lead.claim.lapses_at:%Y-%m-%d %H:%M} UTC"
            ]
        return []
    who = claim.email if claim.name in ("", claim.email) else f"{claim.name} <{claim.email}>"
    note = f": {claim.note}" if claim.note else ""
    lines = [
        f"  claimed by {who} via {claim.via} at {claim.at:%Y-%m-%d %H:%M} UTC, lapses "
        f"{claim.lapses_at:%Y-%m-%d %H:%M} UTC unless answered{note}"
    ]
    owner = config.claims.owner_channel if config.claims is not None else None
    for tier in config.policy.tiers:
        mode = tier.claimed
        if mode == "owner":
            where = f"to the owner only (channel {owner}, to {claim.email})"
        elif mode == "all":
            extra = f" and the owner (channel {owner})" if owner else ""
            where = f"to its channels ({', '.join(tier.notify)}){extra}, naming the owner"
        else:
            where = "waits until the claim ends"
        lines.append(f"  while claimed, tier {tier.name} ({mode}): {where}")
    return lines


def _poll_line(last: PollRecord | None) -> str:
    if last is None:
        return "No poll yet: run `referral-watch run --once`."
    when = f"{last.finished:%Y-%m-%d %H:%M:%S} UTC"
    if last.ok:
        return f"Last poll {when}: ok, {last.fetched} fetched."
    return f"Last poll {when} FAILED: {scrub(last.error or '')}"


def explain(
    lead: Lead | None, config: Config, now: datetime, audit: Sequence[AuditEntry] = ()
) -> str:
    if lead is None:
        return "unknown lead"
    ref = lead.referral
    lines = [
        f"{ref.customer} ({lead.id})",
        f"  kind {ref.kind}, country {ref.country or '-'}, "
        f"value {money_text(ref.deal_value, ref.currency, CLI_LOCALE) or '-'}",
    ]
    if lead.resolution is not None:  # answered, expired or gone: nothing more will be sent
        lines.append(f"  {outcome_line(lead)}")
        lines.extend(audit_lines(audit))
        return terminal("\n".join(lines))
    lines.append(
        f"  deadline {lead.deadline:%Y-%m-%d %H:%M} UTC, "
        f"left {time_left_text(lead.deadline - now, CLI_LOCALE)}"
    )
    tier = policy.current_tier(lead, config, now)
    lines.append(f"  current tier: {tier.name if tier else '(none due yet)'}")
    if lead.silenced(now) and lead.silenced_until:
        lines.append(
            f"  silenced until {lead.silenced_until:%Y-%m-%d %H:%M} UTC: "
            f"{lead.silence_reason or 'no reason given'}"
        )
    lines.extend(claim_lines(lead, config, now))
    lines.append(f"  {next_alert_line(lead, config, now)}")
    for name, channel in config.channels.items():
        verdict = _channel_verdict(name, policy.channel_matches(channel, ref), config)
        quiet = (
            " (in quiet hours now)"
            if policy.in_quiet_hours(channel, now, config.messages.timezone)
            else ""
        )
        lines.append(f"  channel {name}: {verdict}{quiet}")
    lines.extend(audit_lines(audit))
    return terminal("\n".join(lines))  # Partner Center text never drives the terminal


def outcome_line(lead: Lead) -> str:
    """How a resolved lead ended, who answered and when, as far as anyone knows."""
    resolution = lead.resolution or ""
    seen = f"{lead.resolved_at:%Y-%m-%d %H:%M} UTC" if lead.resolved_at else "?"
    answered = lead.answered
    if answered is not None and answered.result == resolution:
        who = (
            answered.who
            if answered.name in ("", answered.who)
            else (f"{answered.name} <{answered.who}>")
        )
        return f"{resolution} by {who} via {answered.via} at {answered.at:%Y-%m-%d %H:%M} UTC"
    if resolution == "expired":
        return f"expired unanswered (deadline {lead.deadline:%Y-%m-%d %H:%M} UTC)"
    if resolution == "gone":
        return f"gone: Partner Center no longer returns it (noticed {seen})"
    when = lead.referral.updated
    at = f"{when:%Y-%m-%d %H:%M} UTC" if when else seen
    # Partner Center's record does not say who answered (no such field is documented).
    return f"{resolution} in Partner Center at {at} (not through referral-watch)"


def next_alert_line(lead: Lead, config: Config, now: datetime) -> str:
    upcoming = policy.next_alert(lead, config, now)
    if upcoming is None:
        return "next alert: none (no further tier, and no on_expired channel)"
    when, what, channels = upcoming
    wait = time_left_text(when - now, CLI_LOCALE) if when > now else "now"
    to = ", ".join(channels) or "no channel (their match leaves this lead out)"
    held = ""
    if lead.silenced(now) and lead.silenced_until and lead.silenced_until > when:
        held = f"; held by the silence until {lead.silenced_until:%Y-%m-%d %H:%M} UTC"
    return f"next alert: {what} at {when:%Y-%m-%d %H:%M} UTC (in {wait}) to {to}{held}"


def _channel_verdict(name: str, matches: bool, config: Config) -> str:
    """Whether a channel hears about a lead at all: only tiers and the expired and resolved
    notices send lead alerts; a channel named by none of them (say, operations only) never
    hears about any lead, whatever its match."""
    roles = [f"tier {tier.name}" for tier in config.policy.tiers if name in tier.notify]
    roles += ["expired notice"] if name in config.policy.on_expired else []
    roles += ["resolved notice"] if name in config.policy.on_resolved else []
    if not roles:
        uses = ["operations alerts"] if name in config.operations.notify else []
        uses += ["reports"] if any(name in report.notify for report in config.reports) else []
        also = f" (only {' and '.join(uses)})" if uses else ""
        return f"no lead alerts: no tier, on_expired or on_resolved sends here{also}"
    if not matches:
        return "match fails"
    return f"hears this lead ({', '.join(roles)})"


def audit_lines(audit: Sequence[AuditEntry]) -> list[str]:
    """The answers given or tried through referral-watch, and the claims, oldest first."""
    claims = any(entry.action in CLAIM_ACTIONS for entry in audit)
    lines = [f"  {'answers and claims' if claims else 'answers'}:"] if audit else []
    for entry in audit:
        who = entry.who if entry.name in ("", entry.who) else f"{entry.name} <{entry.who}>"
        reason = f" ({entry.reason})" if entry.reason else ""
        request = f", Partner Center request {entry.request_id}" if entry.request_id else ""
        if entry.action in CLAIM_ACTIONS and entry.detail:
            request = f" ({entry.detail})"
        lines.append(
            f"    {entry.at:%Y-%m-%d %H:%M} UTC {entry.action}{reason} by {who} via {entry.via}: "
            f"{entry.result}{request}"
        )
    return lines


def silences_table(silences: Sequence[Silence], all_ids: Iterable[str], zone_name: str) -> str:
    """`silences`: each running silence, the one ending first first."""
    if not silences:
        return "No lead is silenced."
    zone = ZoneInfo(zone_name)
    short = short_ids([*all_ids, *(s.lead_id for s in silences)])
    rows = [("ID", "CUSTOMER", "UNTIL", "REASON", "BY")]
    for item in silences:
        until = f"{item.until.astimezone(zone):%Y-%m-%d %H:%M}"
        if item.through_deadline:
            until += " (through deadline)"
        rows.append(
            (
                short[item.lead_id],
                clip(item.customer or "(not in the state)", 32)
                + (f" [{item.resolution}]" if item.resolution else ""),
                until,
                clip(item.reason, 40) or "-",
                clip(item.by, 24) or "-",
            )
        )
    lines = columns(rows)
    lines.append("")
    lines.append(f"{len(silences)} silence(s); times in {zone_name}. `unsilence ID` ends one.")
    return terminal("\n".join(lines))


def silence_json(item: Silence) -> dict[str, Any]:
    return {
        "id": item.lead_id,
        "customer": item.customer or None,
        "until": _iso(item.until),
        "reason": item.reason or None,
        "by": item.by or None,
        "since": _iso(item.since),
        "through_deadline": item.through_deadline,
        "deadline": _iso(item.deadline),
        "resolution": item.resolution,
    }
