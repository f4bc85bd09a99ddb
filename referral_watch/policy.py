"""PURE decision logic: which alerts are due for which channel, and what to send now.

No I/O and no clock: ``now`` is always an argument, so every rule can be tested at any instant.

- ``due_alerts``: tiers (catch-up, repeat), expiry and resolution notices, silences, matches,
  claims (SPEC 17: who hears a claimed lead's tiers, the "taken by" and "lapsed" notices).
- ``held_back``: the one rule saying why a tier's message may not reach a channel now.
- ``delivery_batches``: which pending outbox rows go out now, held by quiet hours, and digests.
- ``in_quiet_hours``: a channel's quiet hours in its local wall-clock time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from referral_watch.config import ChannelConfig, Config, MatchConfig, PolicyConfig, TierConfig
from referral_watch.model import (
    ANSWERS,
    CLAIMED,
    EXPIRED,
    LAPSED,
    RESOLVED,
    TIER,
    Alert,
    Batch,
    Lead,
    PendingRow,
    Referral,
    Sent,
    our_members,
)

# Outbox row states the policy cares about (model.Sent.state).
PENDING_ROW = "pending"
SKIPPED_ROW = "skipped"

# The deadline of a row whose lead is unknown: it sorts after every real one.
NEVER = datetime.max.replace(tzinfo=UTC)

_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_ZERO = timedelta(0)


# --- due_alerts --------------------------------------------------------------------------


def due_alerts(
    leads: Sequence[Lead],
    history: Mapping[str, Sequence[Sent]],
    config: Config,
    now: datetime,
) -> list[Alert]:
    """Every alert to enqueue (or tier to record as skipped) for these leads at ``now``.

    ``history`` maps a lead id to every outbox row ever written for it, in any state; a decision
    already recorded there is never made twice, so calling again at the same ``now`` after the
    alerts were stored returns nothing.
    """
    now = _aware(now)
    alerts: list[Alert] = []
    for lead in leads:
        rows = history.get(lead.id, ())
        alerts.extend(_notices(lead, rows, config, now))
        alerts.extend(_claim_notices(lead, rows, config, now))
        alerts.extend(_tier_alerts(lead, rows, config, now))
    return alerts


def tier_points(config: Config, now: datetime) -> list[tuple[str, str, datetime, datetime | None]]:
    """(channel, tier name, cutoff, repeat_after) for every tier and each channel it notifies.

    The tier is due for a lead whose deadline is at or before the cutoff (time left <=
    remaining). A repeating tier is due again only when no copy that was not skipped is newer
    than repeat_after (now - repeat); it is None for a tier that does not repeat. A watched
    lead for which every due (channel, tier) already has an outbox row, and no repeat is due,
    gets nothing from ``due_alerts``: the store uses these points to skip such leads without
    reading them (``Store.policy_candidates``).
    """
    now = _aware(now)
    return [
        (channel, tier.name, now + tier.remaining, _repeat_after(tier, now))
        for tier in config.policy.tiers
        for channel in _unique(tier.notify)
    ]  # a claimed lead is always a candidate (Store.policy_candidates): no owner points


def _repeat_after(tier: TierConfig, now: datetime) -> datetime | None:
    if tier.repeat is None or tier.repeat <= _ZERO:
        return None
    return now - tier.repeat


def current_tier(lead: Lead, config: Config, now: datetime) -> TierConfig | None:
    """The most severe tier due for a watched lead; None when none is due, past the deadline,
    or the lead is resolved."""
    if lead.resolution is not None:
        return None
    left = lead.remaining(_aware(now))
    if left < _ZERO:
        return None
    due = [tier for tier in config.policy.tiers if left <= tier.remaining]
    return due[-1] if due else None


def next_alert(lead: Lead, config: Config, now: datetime) -> tuple[datetime, str, list[str]] | None:
    """For a waiting lead: when the next tier falls due (its deadline minus the tier's
    `remaining`), which tier, and the channels that would hear it (match applied); past the
    last tier, the expired notice at the deadline. None for a resolved lead, or when nothing
    more is configured to be sent."""
    if lead.resolution is not None:
        return None
    now = _aware(now)
    left = lead.remaining(now)
    upcoming = [tier for tier in config.policy.tiers if tier.remaining < left]
    if upcoming:
        tier = upcoming[0]  # least severe first: the first one not due yet comes next
        names, when, what = tier.notify, lead.deadline - tier.remaining, f"tier {tier.name}"
        if lead.claimed(now) is not None:  # while it holds: where the claim routes the tier
            names = [
                name
                for name in _tier_channels(config)
                if _routed(lead, name, tier, config, now)
                and _claim_hold(lead, name, tier, config, now) is None
            ]
    elif left >= _ZERO and not lead.expired_notified and config.policy.on_expired:
        names, when, what = config.policy.on_expired, lead.deadline, "the expired notice"
    else:
        return None
    hearing = [name for name in _unique(names) if _matches(config, name, lead.referral)]
    return when, what, hearing


def _notice_kind(lead: Lead, now: datetime) -> str | None:
    """EXPIRED or RESOLVED when this lead's notice is still owed, else None."""
    resolution = lead.resolution.lower() if lead.resolution is not None else None
    if resolution is None:
        past = lead.remaining(now) < _ZERO
        return EXPIRED if past and not lead.expired_notified else None
    if resolution in ANSWERS:
        return None if lead.resolution_notified else RESOLVED
    if resolution == "expired":
        return None if lead.expired_notified else EXPIRED
    return None  # "gone" (404): nobody can act on it any more


def _notices(lead: Lead, rows: Sequence[Sent], config: Config, now: datetime) -> list[Alert]:
    kind = _notice_kind(lead, now)
    if kind is None:
        return []
    names = config.policy.on_expired if kind == EXPIRED else config.policy.on_resolved
    # The store flips the lead's flag once the rows are written; history covers the gap.
    already = {row.channel for row in rows if row.kind == kind}
    return [
        Alert(lead_id=lead.id, kind=kind, channel=name)
        for name in _unique(names)
        if name not in already and _matches(config, name, lead.referral)
    ]


def _tier_alerts(lead: Lead, rows: Sequence[Sent], config: Config, now: datetime) -> list[Alert]:
    left = lead.remaining(now)
    if lead.resolution is not None or left < _ZERO:
        return []  # answered leads and expired ones get notices, never reminders
    tiers = config.policy.tiers
    alerts: list[Alert] = []
    for channel in _tier_channels(config):
        # The tiers this channel hears for this lead now (a claim routes some to the owner).
        heard = [i for i, tier in enumerate(tiers) if _routed(lead, channel, tier, config, now)]
        if channel == _owner_channel(config) and lead.claim is not None:
            # The owner was on the team: what it heard before the claim is not said again.
            told = _told_before(rows, lead.claim.at)
            heard = [i for i in heard if tiers[i].name not in told]
        due = [i for i in heard if left <= tiers[i].remaining]
        if not due or held_back(lead, channel, tiers[due[-1]], config, now) is not None:
            continue
        if channel != _owner_channel(config) and not _matches(config, channel, lead.referral):
            continue
        sent = [row for row in rows if row.kind == TIER and row.channel == channel]
        alerts.extend(_channel_tier_alerts(lead.id, channel, due, sent, config.policy, now))
    return alerts


def _told_before(rows: Sequence[Sent], moment: datetime) -> set[str]:
    """The tiers any channel heard (or holds in the outbox) before ``moment``."""
    since = _aware(moment)
    return {
        row.tier
        for row in rows
        if row.kind == TIER
        and row.tier
        and row.state != SKIPPED_ROW
        and _aware(row.created) < since
    }


def _tier_channels(config: Config) -> list[str]:
    """Every channel a tier can reach: the tiers' own, then the claims' owner channel."""
    names = [name for tier in config.policy.tiers for name in tier.notify]
    owner = _owner_channel(config)
    return _unique([*names, owner] if owner else names)


def _owner_channel(config: Config) -> str | None:
    return config.claims.owner_channel if config.claims is not None else None


def _routed(lead: Lead, channel: str, tier: TierConfig, config: Config, now: datetime) -> bool:
    """Whether this tier goes to this channel for this lead at all: its own channels, or the
    owner channel while the lead is claimed; ``held_back`` says whether it may go now."""
    return channel in tier.notify or (
        channel == _owner_channel(config) and _claim_hold(lead, channel, tier, config, now) is None
    )


def held_back(
    lead: Lead, channel: str, tier: TierConfig, config: Config, now: datetime
) -> str | None:
    """THE rule for holding back a lead's tier message (Alertmanager's Muter): why this tier
    may not reach this channel now, or None when it may. A claim routes the tier (to the
    owner only, to its channels and the owner, or nowhere yet); a silence holds every tier,
    except that the most severe one breaks a silence outlasting the deadline (unless meant to
    last through it). Quiet hours hold a written message at delivery (``delivery_batches``)."""
    claimed = _claim_hold(lead, channel, tier, config, now)
    if claimed is not None:
        return claimed
    if lead.silenced(now):
        last = tier is config.policy.tiers[-1]
        if not (last and _final_breaks_silence(lead)):
            return f"silenced until {lead.silenced_until:%Y-%m-%d %H:%M} UTC"
    return None


def _claim_hold(
    lead: Lead, channel: str, tier: TierConfig, config: Config, now: datetime
) -> str | None:
    owner_channel = _owner_channel(config)
    claim = lead.claimed(now) if config.claims is not None else None
    mine = channel == owner_channel and channel not in tier.notify
    if claim is None:
        return "the owner channel hears claimed leads only" if mine else None
    mode = tier.claimed
    if mode == "skip":
        return f"claimed by {claim.name or claim.email}: tier {tier.name} waits (when_claimed skip)"
    if mode == "owner" and not mine and channel != owner_channel:
        return f"claimed by {claim.name or claim.email}: tier {tier.name} goes to the owner only"
    return None


def team_channels(lead: Lead, config: Config, now: datetime) -> list[str]:
    """Who hears that a lead was taken or that its claim lapsed: the channels of the tier the
    lead is in (the first tier before any is due), the owner channel aside, match applied."""
    tier = current_tier(lead, config, now) or config.policy.tiers[0]
    owner = _owner_channel(config)
    return [
        name
        for name in _unique(tier.notify)
        if name != owner and _matches(config, name, lead.referral)
    ]


def _claim_notices(lead: Lead, rows: Sequence[Sent], config: Config, now: datetime) -> list[Alert]:
    """ "Fabrikam taken by Ann de Vries" once per claim; "Ann's claim on Fabrikam lapsed" once
    when it lapses unanswered (the store ends it in the same transaction)."""
    claim = lead.claim
    if config.claims is None or claim is None or lead.resolution is not None:
        return []
    if lead.remaining(now) < _ZERO:
        return []  # the expired notice speaks for the lead now
    kind = CLAIMED if claim.holds(now) else LAPSED
    since = _aware(claim.at)
    if any(row.kind == kind and _aware(row.created) >= since for row in rows):
        return []
    return [Alert(lead.id, kind, name) for name in team_channels(lead, config, now)]


def _final_breaks_silence(lead: Lead) -> bool:
    """A silence that outlasts the deadline would hide the lead's expiry; the most severe tier
    still gets through unless the silence was explicitly meant to last through the deadline."""
    assert lead.silenced_until is not None
    return not lead.silence_through_deadline and lead.silenced_until >= lead.deadline


def _channel_tier_alerts(
    lead_id: str,
    channel: str,
    due: list[int],
    sent: list[Sent],
    policy: PolicyConfig,
    now: datetime,
) -> list[Alert]:
    """Catch-up for one (lead, channel): send the most severe due tier, skip the rest."""
    top = due[-1]
    if any(policy.severity(row.tier) > top for row in sent if row.tier is not None):
        return []  # the deadline moved later: the severity a channel heard never goes down
    have = {row.tier for row in sent}

    def alert(index: int, skipped: bool = False) -> Alert:
        name = policy.tiers[index].name
        return Alert(lead_id, TIER, channel, tier=name, severity=index, skipped=skipped)

    alerts = [alert(i, skipped=True) for i in due[:-1] if policy.tiers[i].name not in have]
    top_tier = policy.tiers[top]
    earlier = [row for row in sent if row.tier == top_tier.name]
    if not earlier or _repeat_due(top_tier, earlier, now):
        alerts.append(alert(top))
    return alerts


def _repeat_due(tier: TierConfig, rows: list[Sent], now: datetime) -> bool:
    if tier.repeat is None or tier.repeat <= _ZERO:
        return False  # a zero repeat would re-send on every call
    live = [row for row in rows if row.state != SKIPPED_ROW]
    if not live or any(row.state == PENDING_ROW for row in live):
        return False  # one copy waiting in the outbox (e.g. held) is enough
    return max(_aware(row.created) for row in live) <= now - tier.repeat


# --- match -------------------------------------------------------------------------------


def channel_matches(channel: ChannelConfig, referral: Referral) -> bool:
    """Whether a channel with a ``match`` table hears about this referral (keys are ANDed,
    a list means any of, strings compare case-insensitively; no match hears everything)."""
    match = channel.match
    if match is None:
        return True
    return _strings_match(match, referral) and _value_matches(match, referral.deal_value)


def _strings_match(match: MatchConfig, referral: Referral) -> bool:
    return (
        _any_of(match.country, [referral.country])
        and _any_of(match.direction, [referral.direction])
        and _any_of(match.type, [referral.type])
        and _any_of(match.qualification, [referral.qualification])
        and _any_of(match.solution, [*referral.solution_ids, *referral.solutions])
        and _any_of(match.product, referral.products)
        # who the lead is assigned to, whether or not they opted out of notifications
        and _any_of(match.team_email, [member.email for member in referral.team])
    )


def _any_of(wanted: Sequence[str] | None, values: Iterable[str]) -> bool:
    # An absent key or an empty list sets no condition; an empty list is far more likely a
    # templating leftover than a wish to silence the channel.
    if not wanted:
        return True
    folded = {item.strip().casefold() for item in wanted}
    return any(value.strip().casefold() in folded for value in values)


def _value_matches(match: MatchConfig, value: Decimal | None) -> bool:
    if match.min_deal_value is None and match.max_deal_value is None:
        return True
    if value is None:
        return False  # a bound on the value cannot be met by a lead without one
    if match.min_deal_value is not None and value < Decimal(str(match.min_deal_value)):
        return False
    return match.max_deal_value is None or value <= Decimal(str(match.max_deal_value))


def _matches(config: Config, name: str, referral: Referral) -> bool:
    channel = config.channels.get(name)
    # An unknown name cannot pass config validation; if it ever does, delivery reports it
    # loudly, which beats dropping the alert here without a trace.
    return channel is None or channel_matches(channel, referral)


# --- quiet hours -------------------------------------------------------------------------


def in_quiet_hours(channel: ChannelConfig, now: datetime, default_zone: str = "UTC") -> bool:
    """Whether ``now`` falls in the channel's quiet hours or quiet days, in its local time."""
    return _quiet_at(channel, _aware(now), _zone(channel, default_zone))


def _zone(channel: ChannelConfig, default_zone: str) -> ZoneInfo:
    return ZoneInfo(channel.timezone or default_zone)


def _window(channel: ChannelConfig) -> tuple[time, time] | None:
    if not channel.quiet_hours:
        return None
    start, _, end = channel.quiet_hours.partition("-")
    return time.fromisoformat(start.strip()), time.fromisoformat(end.strip())


def _quiet_at(channel: ChannelConfig, instant: datetime, zone: ZoneInfo) -> bool:
    local = instant.astimezone(zone)
    if _WEEKDAYS[local.weekday()] in channel.quiet_days:
        return True
    window = _window(channel)
    if window is None:
        return False
    start, end = window
    wall = local.time()
    if start < end:
        return start <= wall < end
    if start > end:  # crosses midnight: "20:00-08:00" is 20:00 up to 08:00 the next morning
        return wall >= start or wall < end
    return False  # "08:00-08:00" is an empty range


# --- delivery_batches --------------------------------------------------------------------


def delivery_batches(
    rows: Sequence[PendingRow],
    leads: Mapping[str, Lead],
    config: Config,
    now: datetime,
    deadlines: Mapping[str, datetime] | None = None,
) -> list[Batch]:
    """What to send now from the pending outbox rows; rows left out are held (quiet hours).

    ``leads``: the leads the rows are about (one that is not given has no claim and, unless
    ``deadlines`` gives it, no deadline: it goes last in a digest). ``deadlines``: the rows'
    leads' deadlines, when ``leads`` holds only those whose claim or team matters (a first
    cycle delivers tens of thousands of rows).

    Every row id appears in at most one batch, and every row id of a batch is settled by that
    one message. Rows about no lead come first, then one batch per alert, or one digest for a
    (channel, kind, tier, recipients) group of more than ``policy.digest_over`` alerts.

    Several pending rows for one lead and channel are folded into one message: a held tier
    superseded by a more severe tier, or any tier reminder once an expired/resolved notice is
    waiting, rides along with that message instead of going out on its own.
    """
    now = _aware(now)
    batches: list[Batch] = []
    quiet: dict[str, bool] = {}
    heads, riders = _fold_superseded(rows, config.policy)
    groups: dict[tuple[str, str, str | None, tuple[str, ...]], list[PendingRow]] = {}
    # Each lead is looked up once per row (a first cycle has tens of thousands of rows, and
    # the outlines build a Lead at each lookup); its deadline is kept for ordering digests.
    order: dict[str, datetime] = {}
    for row in heads:
        if row.lead_id is None:  # ops, test and report messages are never held nor batched
            batches.append(Batch(row.channel, row.kind, row.tier, (row.id,), ()))
            continue
        lead = leads.get(row.lead_id)
        if _held(row, lead, config, now, quiet):
            continue
        order[row.lead_id] = _deadline(row.lead_id, lead, deadlines)
        key = (row.channel, row.kind, row.tier, _recipients(row, lead, config, now))
        groups.setdefault(key, []).append(row)
    for key, members in groups.items():
        batches.extend(_group_batches(key, members, riders, order, config.policy))
    return batches


def _fold_superseded(
    rows: Sequence[PendingRow], policy: PolicyConfig
) -> tuple[list[PendingRow], dict[int, list[int]]]:
    """Pick the row that speaks for each (lead, channel): the first notice if one is pending,
    else the most severe tier. Returns those heads (in row order) and head id -> rider ids."""
    # Only targets with several rows can fold; a first cycle has tens of thousands of rows,
    # nearly all alone, so count first and keep lists for the few that are not.
    counts = Counter((row.lead_id, row.channel) for row in rows if row.lead_id is not None)
    tier_targets = {
        (row.lead_id, row.channel)
        for row in rows
        if row.lead_id is not None and row.kind == TIER and counts[(row.lead_id, row.channel)] > 1
    }
    by_target: dict[tuple[str, str], list[PendingRow]] = {}
    for row in rows:
        if row.lead_id is not None and (row.lead_id, row.channel) in tier_targets:
            by_target.setdefault((row.lead_id, row.channel), []).append(row)
    riders: dict[int, list[int]] = {}
    folded: set[int] = set()
    for group in by_target.values():
        tiers = [row for row in group if row.kind == TIER]
        notices = [row for row in group if row.kind in (EXPIRED, RESOLVED)]
        head = notices[0] if notices else max(tiers, key=lambda r: (_severity(policy, r), r.id))
        for row in tiers:
            if row is not head:
                riders.setdefault(head.id, []).append(row.id)
                folded.add(row.id)
    return [row for row in rows if row.id not in folded], riders


def _severity(policy: PolicyConfig, row: PendingRow) -> int:
    return policy.severity(row.tier) if row.tier is not None else -1


def _held(
    row: PendingRow, lead: Lead | None, config: Config, now: datetime, quiet: dict[str, bool]
) -> bool:
    channel = config.channels.get(row.channel)
    if channel is None:
        return False  # delivery reports the unknown channel; holding would hide it forever
    if row.kind == TIER and row.tier is not None:
        tier = config.policy.tier(row.tier)
        # claimed after the row was written: the claim's routing holds it (the one rule)
        if tier is not None and _claim_holds_row(lead, row.channel, tier, config, now):
            return True
        if tier is not None and tier.bypass_quiet:
            return False
    if row.channel not in quiet:
        quiet[row.channel] = in_quiet_hours(channel, now, config.messages.timezone)
    return quiet[row.channel]


def _claim_holds_row(
    lead: Lead | None, channel: str, tier: TierConfig, config: Config, now: datetime
) -> bool:
    if lead is None or lead.claim is None:
        return False
    return _claim_hold(lead, channel, tier, config, now) is not None


def _recipients(
    row: PendingRow, lead: Lead | None, config: Config, now: datetime
) -> tuple[str, ...]:
    """For to_assignees channels the lead's team, for the claims' owner channel the owner's
    address; () means the URL's own recipients. ``lead``: the row's lead (None: not known)."""
    if row.channel == _owner_channel(config) and row.lead_id is not None:
        claim = lead.claimed(now) if lead is not None else None
        if claim is not None:
            return (claim.email,)
    channel = config.channels.get(row.channel)
    if channel is None or not channel.to_assignees or row.lead_id is None:
        return ()
    if lead is None:
        return ()
    ours = our_members(lead.referral.team, channel.assignee_domains)
    emails = {m.email for m in ours if m.email and m.notifications}
    return tuple(sorted(emails, key=lambda email: (email.lower(), email)))


def _group_batches(
    key: tuple[str, str, str | None, tuple[str, ...]],
    members: list[PendingRow],
    riders: Mapping[int, list[int]],
    deadlines: Mapping[str, datetime],
    policy: PolicyConfig,
) -> list[Batch]:
    channel, kind, tier, recipients = key

    def row_ids(row: PendingRow) -> tuple[int, ...]:
        return (row.id, *riders.get(row.id, ()))

    if len(members) <= policy.digest_over or kind in (CLAIMED, LAPSED):  # news of one person
        return [
            Batch(channel, kind, tier, row_ids(row), (_lead_id(row),), recipients=recipients)
            for row in members
        ]
    # Most urgent first; leads already pruned from the state have no deadline and go last.
    ordered = sorted(members, key=lambda row: (deadlines[_lead_id(row)], row.id))
    lead_ids = _unique(_lead_id(row) for row in ordered)
    shown = tuple(lead_ids[: policy.digest_limit])
    every_row = tuple(row_id for row in members for row_id in row_ids(row))
    return [
        Batch(
            channel,
            kind,
            tier,
            every_row,
            shown,
            digest=True,
            more=len(lead_ids) - len(shown),
            recipients=recipients,
        )
    ]


def _deadline(
    lead_id: str, lead: Lead | None, deadlines: Mapping[str, datetime] | None
) -> datetime:
    """The lead's deadline (NEVER for a lead not known: pruned from the state)."""
    if lead is not None:
        return _aware(lead.deadline)
    known = deadlines.get(lead_id) if deadlines is not None else None
    return _aware(known) if known is not None else NEVER


def _lead_id(row: PendingRow) -> str:
    assert row.lead_id is not None  # rows about no lead never reach grouping
    return row.lead_id


# --- small helpers -----------------------------------------------------------------------


def _aware(moment: datetime) -> datetime:
    """Naive datetimes are taken as UTC (the state file and the API speak UTC)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
