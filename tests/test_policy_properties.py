"""Hypothesis properties of the pure policy, run as a simulated daemon: a sequence of cycles at
increasing ``now``s where every decision is stored in the history before the next cycle."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from referral_watch.config import Config
from referral_watch.config.loader import parse_config
from referral_watch.model import TIER, Alert, Lead, PendingRow, Referral, Sent
from referral_watch.policy import delivery_batches, due_alerts, in_quiet_hours

from policies import policy

BASE = (
    '[auth]\nmethod = "env"\n\n'
    + policy(digest_over=2, digest_limit=3)
    + """
[channels]
team = "json://127.0.0.1:9/team"

[channels.managers]
url = "json://127.0.0.1:9/managers"
quiet_hours = "20:00-08:00"
timezone = "Europe/Amsterdam"

[channels.weekend]
url = "json://127.0.0.1:9/weekend"
quiet_hours = "22:30-06:15"
quiet_days = ["Sat", "Sun"]
timezone = "America/Los_Angeles"
"""
)
CONFIG = parse_config(BASE, env={})
START = datetime(2026, 3, 1, tzinfo=UTC)
COUNTRIES = ("NL", "BE", "DE", "US")

PROPERTY = settings(max_examples=75, deadline=None)


@dataclass(frozen=True)
class Spec:
    """One lead as the simulation sees it: time left at START and an optional later move."""

    left: int  # seconds left at START
    country: str
    value: int | None
    move_at: int | None = None  # step index at which Partner Center moves the deadline later
    move_by: int = 0  # seconds


def make_lead(index: int, spec: Spec, **state: Any) -> Lead:
    deadline = START + timedelta(seconds=spec.left)
    ref = Referral(
        id=f"L{index}",
        name=f"deal {index}",
        customer=f"Customer {index}",
        created=deadline - timedelta(days=14),
        country=spec.country,
        deal_value=None if spec.value is None else Decimal(spec.value),
    )
    return Lead(referral=ref, deadline=deadline, first_seen=START, last_seen=START, **state)


specs = st.builds(
    Spec,
    left=st.integers(-86_400, 16 * 86_400),
    country=st.sampled_from(COUNTRIES),
    value=st.none() | st.integers(0, 200_000),
    move_at=st.none() | st.integers(0, 20),
    move_by=st.integers(3600, 10 * 86_400),
)
steps = st.lists(st.integers(60, 3 * 86_400), min_size=1, max_size=20)


def instants(gaps: Sequence[int]) -> list[datetime]:
    out, now = [], START
    for gap in gaps:
        now += timedelta(seconds=gap)
        out.append(now)
    return out


def store(history: dict[str, list[Sent]], alerts: list[Alert], now: datetime, state: str) -> None:
    for alert in alerts:
        row_state = "skipped" if alert.skipped else state
        history[alert.lead_id].append(
            Sent(alert.lead_id, alert.kind, alert.channel, alert.tier, row_state, now)
        )


def leads_at(specs_: Sequence[Spec], step: int, **state: Any) -> list[Lead]:
    """The leads as the store would hand them at ``step`` (moved deadlines applied)."""
    leads = []
    for index, spec in enumerate(specs_):
        lead = make_lead(index, spec, **state)
        if spec.move_at is not None and step >= spec.move_at:
            lead = replace(lead, deadline=lead.deadline + timedelta(seconds=spec.move_by))
        leads.append(lead)
    return leads


# (a) ---------------------------------------------------------------------------------------


@PROPERTY
@given(
    st.lists(specs, min_size=1, max_size=5),
    steps,
    st.sampled_from(["delivered", "pending", "dropped"]),
)
def test_deciding_again_at_the_same_instant_adds_nothing(
    specs_: list[Spec], gaps: list[int], state: str
) -> None:
    history: dict[str, list[Sent]] = defaultdict(list)
    for step, now in enumerate(instants(gaps)):
        leads = leads_at(specs_, step)
        store(history, due_alerts(leads, history, CONFIG, now), now, state)
        assert due_alerts(leads, history, CONFIG, now) == []


# (b) and (e) -------------------------------------------------------------------------------


def severity(tier: str | None) -> int:
    return CONFIG.policy.severity(tier) if tier is not None else -1


def check_completeness(lead: Lead, rows: list[Sent], now: datetime) -> None:
    """Every tier due for a matching channel has been decided: sent or skipped."""
    left = lead.remaining(now)
    if left < timedelta(0):
        return
    for tier in CONFIG.policy.tiers:
        if left > tier.remaining:
            continue
        for channel in tier.notify:
            decided = [r for r in rows if r.channel == channel and r.tier == tier.name]
            assert decided, (lead.id, tier.name, channel, left)


@PROPERTY
@given(st.lists(specs, min_size=1, max_size=5), steps)
def test_severity_never_drops_and_each_tier_is_decided_exactly_once(
    specs_: list[Spec], gaps: list[int]
) -> None:
    history: dict[str, list[Sent]] = defaultdict(list)
    for step, now in enumerate(instants(gaps)):
        leads = leads_at(specs_, step)
        alerts = due_alerts(leads, history, CONFIG, now)
        for alert in alerts:
            if alert.kind != TIER:
                continue
            earlier = [r for r in history[alert.lead_id] if r.channel == alert.channel]
            if not alert.skipped:  # (b) what a channel hears never gets less severe
                assert alert.severity >= max((severity(r.tier) for r in earlier), default=-1)
            copies = [r for r in earlier if r.tier == alert.tier]
            tier = CONFIG.policy.tier(alert.tier or "")
            assert tier is not None
            if copies:  # (e) a second row for a tier only ever comes from `repeat`
                assert tier.repeat is not None and not alert.skipped
                assert now - max(r.created for r in copies) >= tier.repeat
        store(history, alerts, now, "delivered")
        for lead in leads:
            check_completeness(lead, history[lead.id], now)


# (c) ---------------------------------------------------------------------------------------


@PROPERTY
@given(st.lists(specs, min_size=1, max_size=5), steps, st.booleans())
def test_a_silenced_lead_hears_no_tier_alerts(
    specs_: list[Spec], gaps: list[int], through: bool
) -> None:
    beyond = START + timedelta(days=100)  # past every deadline and the whole run
    history: dict[str, list[Sent]] = defaultdict(list)
    for step, now in enumerate(instants(gaps)):
        state = {"silenced_until": beyond, "silence_through_deadline": through}
        alerts = due_alerts(leads_at(specs_, step, **state), history, CONFIG, now)
        tiers = [a for a in alerts if a.kind == TIER]
        if through:
            assert tiers == []
        else:  # only the most severe tier breaks a silence that outlasts the deadline
            assert {a.tier for a in tiers if not a.skipped} <= {"final"}
        store(history, alerts, now, "delivered")


# (d) ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    """A random `match` table for the channel "benelux", and what it should let through."""

    countries: list[str]
    low: int | None
    high: int | None

    def admits(self, spec: Spec) -> bool:  # the oracle, written independently of policy.py
        if self.countries and spec.country not in self.countries:
            return False
        if self.low is None and self.high is None:
            return True
        if spec.value is None:
            return False
        return (self.low is None or spec.value >= self.low) and (
            self.high is None or spec.value <= self.high
        )

    def config(self) -> Config:
        keys = []
        if self.countries:
            keys.append("country = [" + ", ".join(f'"{c.lower()}"' for c in self.countries) + "]")
        if self.low is not None:
            keys.append(f"min_deal_value = {self.low}")
        if self.high is not None:
            keys.append(f"max_deal_value = {self.high}")
        text = BASE.replace('notify = ["team", "managers"]', 'notify = ["team", "benelux"]')
        text = text.replace('on_expired = ["managers"]', 'on_expired = ["benelux"]')
        text = text.replace('on_resolved = ["team"]', 'on_resolved = ["benelux"]')
        text += '\n[channels.benelux]\nurl = "json://127.0.0.1:9/b"\n'
        text += f"match = {{ {', '.join(keys)} }}\n"
        return parse_config(text, env={})


bounds = st.builds(
    Bounds,
    countries=st.lists(st.sampled_from(COUNTRIES), max_size=3, unique=True),
    low=st.none() | st.integers(0, 150_000),
    high=st.none() | st.integers(0, 150_000),
)


@PROPERTY
@given(
    bounds,
    st.lists(specs, min_size=1, max_size=6),
    steps,
    st.sampled_from([None, "accepted", "expired"]),
)
def test_matching_never_sends_a_lead_to_a_channel_it_fails(
    match: Bounds, specs_: list[Spec], gaps: list[int], resolution: str | None
) -> None:
    config = match.config()
    history: dict[str, list[Sent]] = defaultdict(list)
    for step, now in enumerate(instants(gaps)):
        leads = leads_at(specs_, step, resolution=resolution)
        alerts = due_alerts(leads, history, config, now)
        for alert in alerts:
            if alert.channel == "benelux":
                assert match.admits(specs_[int(alert.lead_id[1:])])
        store(history, alerts, now, "delivered")
        # and a lead that matches does hear: its notice, or its tier once "urgent" is due
        for index, lead in enumerate(leads):
            left = lead.remaining(now)
            owed = resolution is not None or left <= timedelta(days=2)  # incl. expired
            if match.admits(specs_[index]) and owed:
                assert any(r.channel == "benelux" for r in history[lead.id])


# (f) ---------------------------------------------------------------------------------------

rows_strategy = st.lists(
    st.tuples(
        st.none() | st.sampled_from(["L0", "L1", "L2", "L3", "L4"]),
        st.sampled_from(["team", "managers", "weekend"]),
        st.sampled_from(
            [("tier", "urgent"), ("tier", "final"), ("tier", "new"), ("expired", None)]
        ),
    ),
    min_size=1,
    max_size=15,
)


@PROPERTY
@given(
    rows_strategy,
    st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2026, 12, 31)),
    st.lists(st.integers(60, 10 * 3600), min_size=1, max_size=25),
)
def test_a_held_row_goes_out_exactly_once_after_its_quiet_hours(
    raw_rows: list[tuple[str | None, str, tuple[str, str | None]]],
    start: datetime,
    gaps: list[int],
) -> None:
    begin = start.replace(tzinfo=UTC)
    pending = {
        i: PendingRow(i, lead_id, kind, channel, tier, begin)
        for i, (lead_id, channel, (kind, tier)) in enumerate(raw_rows, start=1)
    }
    total = len(pending)
    leads = {f"L{i}": make_lead(i, Spec(left=i * 3600, country="NL", value=None)) for i in range(5)}
    batched: list[int] = []

    def cycle(now: datetime) -> None:
        for batch in delivery_batches(list(pending.values()), leads, CONFIG, now):
            quiet = in_quiet_hours(CONFIG.channels[batch.channel], now)
            bypass = batch.kind == TIER and batch.tier == "final"
            assert not quiet or bypass or batch.lead_ids == ()
            for row_id in batch.row_ids:
                assert row_id in pending  # never batched twice
                del pending[row_id]
                batched.append(row_id)
        for held in pending.values():  # nothing is held outside its channel's quiet hours
            assert in_quiet_hours(CONFIG.channels[held.channel], now)

    now = begin
    for gap in gaps:
        now += timedelta(seconds=gap)
        cycle(now)
    # then a cycle on every quarter hour (each quiet-hours edge here is on one) until none is
    # held: a weekend's quiet time lasts under three days
    quarter = timedelta(minutes=15)
    now -= timedelta(minutes=now.minute % 15, seconds=now.second, microseconds=now.microsecond)
    for _ in range(3 * 24 * 4):
        if not pending:
            break
        now += quarter
        cycle(now)
    assert pending == {}
    assert sorted(batched) == list(range(1, total + 1))
