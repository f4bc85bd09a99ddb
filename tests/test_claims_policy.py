"""The pure policy of claims (SPEC 17): who hears a claimed lead's tiers (owner / all / skip),
the team's "taken by" and "lapsed" notices, a lapse resuming escalation, the owner channel
addressed to the owner; the config rules; and a hypothesis property that while a claim holds,
an "owner" tier never reaches a team channel. ``now`` is always passed in."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from referral_watch.config import Config
from referral_watch.config.claims import claims_problems
from referral_watch.config.loader import parse_config
from referral_watch.model import (
    CLAIMED,
    LAPSED,
    TIER,
    Alert,
    Claim,
    Lead,
    PendingRow,
    Referral,
    Sent,
)
from referral_watch.policy import delivery_batches, due_alerts, held_back
from referral_watch.render.channels import Style
from referral_watch.render.messages import render_alert

from policies import policy

BASE = (
    '[auth]\nmethod = "env"\n\n'
    + policy()
    + """
[channels]
team = "json://127.0.0.1:9/team"
managers = "json://127.0.0.1:9/managers"
owners = "mailtos://u:p@127.0.0.1:9?to=sales@contoso.com"

[claims]
owner_channel = "owners"
lapse_after = "2d"
"""
)

CONFIG = parse_config(BASE, env={})
NOW = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
H = timedelta(hours=1)
D = timedelta(days=1)


def config_with(text: str) -> Config:
    return parse_config(BASE + text, env={})


def lead(left: timedelta, claim: Claim | None = None, resolution: str | None = None) -> Lead:
    ref = Referral(id="L1", name="deal", customer="Fabrikam", created=NOW - D)
    return Lead(
        referral=ref,
        deadline=NOW + left,
        first_seen=NOW - D,
        last_seen=NOW,
        resolution=resolution,
        claim=claim,
    )


def ann(at: datetime = NOW - H, lapse: timedelta = 2 * D) -> Claim:
    return Claim("L1", "ann@contoso.com", "Ann de Vries", at, at + lapse, "command")


def sent(alerts: list[Alert], when: datetime) -> list[Sent]:
    return [
        Sent(a.lead_id, a.kind, a.channel, a.tier, "skipped" if a.skipped else "delivered", when)
        for a in alerts
    ]


def live(alerts: list[Alert]) -> set[tuple[str, str, str | None]]:
    return {(a.kind, a.channel, a.tier) for a in alerts if not a.skipped}


# --- routing while claimed: a table of cases ------------------------------------------------


@pytest.mark.parametrize(
    ("left", "extra", "expected"),
    [
        # not claimed: as always
        (3 * D, None, {(TIER, "team", "reminder")}),
        # claimed, an "owner" tier (the default for every tier but the last): the owner only
        (3 * D, "claimed", {(TIER, "owners", "reminder"), (CLAIMED, "team", None)}),
        (
            1 * D,
            "claimed",
            {(TIER, "owners", "urgent"), (CLAIMED, "team", None), (CLAIMED, "managers", None)},
        ),
        # the last tier defaults to "all": its channels and the owner
        (
            6 * H,
            "claimed",
            {
                (TIER, "team", "final"),
                (TIER, "managers", "final"),
                (TIER, "owners", "final"),
                (CLAIMED, "team", None),
                (CLAIMED, "managers", None),
            },
        ),
        # lapsed before anyone heard it was taken: the lapse notice, and the team's tier again
        (3 * D, "lapsed", {(TIER, "team", "reminder"), (LAPSED, "team", None)}),
        # answered: nothing about the claim
        (3 * D, "answered", set()),
    ],
)
def test_who_hears_a_claimed_lead(
    left: timedelta, extra: str | None, expected: set[object]
) -> None:
    claim = None
    resolution = None
    if extra == "claimed":
        claim = ann()
    elif extra == "lapsed":
        claim = ann(at=NOW - 3 * D)
    elif extra == "answered":
        claim, resolution = ann(), "accepted"
    alerts = due_alerts([lead(left, claim, resolution)], {}, CONFIG, NOW)
    found = live(alerts)
    if resolution:
        found = {item for item in found if item[0] != "resolved"}
    assert found == expected


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("owner", {(TIER, "owners", "final")}),
        ("all", {(TIER, "owners", "final"), (TIER, "team", "final"), (TIER, "managers", "final")}),
        # the final tier waits; the owner hears the most severe tier that still goes to them
        ("skip", {(TIER, "owners", "urgent")}),
    ],
)
def test_when_claimed_of_the_last_tier(mode: str, expected: set[object]) -> None:
    config = parse_config(
        BASE.replace('name = "final"\n', f'name = "final"\nwhen_claimed = "{mode}"\n'), env={}
    )
    alerts = due_alerts([lead(6 * H, ann())], {}, config, NOW)
    assert {item for item in live(alerts) if item[0] == TIER} == expected


def test_the_team_hears_once_that_the_lead_was_taken() -> None:
    first = due_alerts([lead(3 * D, ann())], {}, CONFIG, NOW)
    history = {"L1": sent(first, NOW)}
    again = due_alerts([lead(3 * D, ann())], history, CONFIG, NOW + H)
    assert (CLAIMED, "team", None) in live(first)
    assert live(again) == set()


def test_a_lapse_resumes_escalation_where_it_stands() -> None:
    """Claimed at 10d left; the owner heard reminder and urgent; the claim lapses at 1d 12h
    left: the team hears the lapse and the urgent tier (reminder recorded as skipped), once."""
    claim = ann(at=NOW, lapse=8 * D + 12 * H)  # lapses when 1d 12h are left
    history: dict[str, list[Sent]] = {}
    team_tiers: list[Alert] = []
    for step in range(0, 10):
        now = NOW + step * D
        alerts = due_alerts([replace(lead(10 * D - (now - NOW), claim), deadline=NOW + 10 * D)],
                            history, CONFIG, now)  # fmt: skip
        history.setdefault("L1", []).extend(sent(alerts, now))
        team_tiers += [a for a in alerts if a.kind == TIER and a.channel == "team"]
        if now < claim.lapses_at:
            assert not [a for a in team_tiers if not a.skipped], f"team heard a tier at {now}"
    kinds = [(a.kind, a.channel) for a in history["L1"] if a.kind == LAPSED]
    assert kinds == [(LAPSED, "team"), (LAPSED, "managers")]  # the urgent tier's channels
    heard = [a.tier for a in team_tiers if not a.skipped]
    assert heard[0] == "urgent"
    assert "reminder" in [a.tier for a in team_tiers if a.skipped]


def test_the_owner_channel_goes_to_the_owners_address() -> None:
    claimed = lead(3 * D, ann())
    rows = [
        PendingRow(1, "L1", TIER, "owners", "reminder", NOW),
        PendingRow(2, "L1", CLAIMED, "team", None, NOW),
    ]
    batches = delivery_batches(rows, {"L1": claimed}, CONFIG, NOW)
    owner = next(b for b in batches if b.channel == "owners")
    assert owner.recipients == ("ann@contoso.com",)
    assert next(b for b in batches if b.channel == "team").recipients == ()


def test_a_team_reminder_written_before_the_claim_is_held_while_it_holds() -> None:
    rows = [PendingRow(1, "L1", TIER, "team", "reminder", NOW - 2 * H)]
    assert delivery_batches(rows, {"L1": lead(3 * D, ann())}, CONFIG, NOW) == []
    assert len(delivery_batches(rows, {"L1": lead(3 * D)}, CONFIG, NOW)) == 1


def test_the_one_hold_rule_names_the_reason() -> None:
    reminder = CONFIG.policy.tier("reminder")
    assert reminder is not None
    reason = held_back(lead(3 * D, ann()), "team", reminder, CONFIG, NOW)
    assert reason is not None and "Ann de Vries" in reason and "owner only" in reason
    assert held_back(lead(3 * D, ann()), "owners", reminder, CONFIG, NOW) is None
    assert held_back(lead(3 * D), "owners", reminder, CONFIG, NOW) is not None
    silenced = replace(lead(3 * D, ann()), silenced_until=NOW + D)
    assert "silenced" in (held_back(silenced, "owners", reminder, CONFIG, NOW) or "")


def test_without_a_claims_section_a_claim_changes_nothing() -> None:
    config = parse_config(BASE.split("[claims]")[0], env={})
    alerts = due_alerts([lead(3 * D, ann())], {}, config, NOW)
    assert live(alerts) == {(TIER, "team", "reminder")}


# --- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('owner_channel = "nope"', "claims.owner_channel: unknown channel 'nope'"),
        ('owner_channel = "team"', "is not an email channel"),
        ("add_to_team = true", "claims.owner_channel: required: policy.tiers[0], policy.tiers[1]"),
    ],
)
def test_claims_config_problems(text: str, problem: str) -> None:
    config = parse_config(BASE.split("[claims]")[0] + "[claims]\n" + text + "\n", env={})
    assert any(problem in p for p in claims_problems(config)), claims_problems(config)


def test_defaults_and_a_valid_claims_section() -> None:
    assert claims_problems(CONFIG) == []
    assert CONFIG.claims is not None and CONFIG.claims.lapse_after == 2 * D
    modes = [tier.claimed for tier in CONFIG.policy.tiers]
    assert modes == ["owner", "owner", "owner", "all"]


# --- wording ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("locale", "taken", "lapsed"),
    [
        ("en-US", "Fabrikam taken by Ann de Vries", "Ann's claim on Fabrikam lapsed"),
        ("nl-NL", "Fabrikam opgepakt door Ann de Vries", "Claim van Ann op Fabrikam verlopen"),
    ],
)
def test_notices_read_as_the_team_expects(locale: str, taken: str, lapsed: str) -> None:
    style = Style(locale=locale)
    assert render_alert(lead(3 * D, ann()), CLAIMED, None, NOW, style).title == taken
    gone = lead(3 * D, ann(at=NOW - 3 * D))
    assert render_alert(gone, LAPSED, None, NOW, style).title == lapsed


def test_an_all_tier_alert_names_the_owner() -> None:
    final = CONFIG.policy.tier("final")
    message = render_alert(lead(6 * H, ann()), TIER, final, NOW, Style())
    assert "Taken by **Ann de Vries**" in message.body
    plain = render_alert(lead(6 * H), TIER, final, NOW, Style())
    assert "Taken by" not in plain.body


# --- property ----------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    claimed_at=st.integers(min_value=0, max_value=14 * 24),
    lapse_hours=st.integers(min_value=1, max_value=10 * 24),
    steps=st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=25),
    modes=st.lists(st.sampled_from(["owner", "all", "skip", None]), min_size=4, max_size=4),
)
def test_owner_tiers_never_reach_team_channels_while_the_claim_holds(
    claimed_at: int, lapse_hours: int, steps: list[int], modes: list[str | None]
) -> None:
    """A simulated daemon from 14 days before the deadline; decisions go to the history."""
    text = BASE
    for name, mode in zip(("new", "reminder", "urgent", "final"), modes, strict=True):
        if mode:
            text = text.replace(f'name = "{name}"\n', f'name = "{name}"\nwhen_claimed = "{mode}"\n')
    config = parse_config(text, env={})
    start = NOW
    deadline = start + 14 * D
    claim = Claim("L1", "ann@contoso.com", "Ann", start + claimed_at * H,
                  start + (claimed_at + lapse_hours) * H, "command")  # fmt: skip
    history: dict[str, list[Sent]] = {}
    now = start
    for step in steps:
        now += step * H
        current = claim if now >= claim.at else None
        item = replace(lead(deadline - now, current), deadline=deadline)
        alerts = due_alerts([item], history, config, now)
        history.setdefault("L1", []).extend(sent(alerts, now))
        if current is None or not current.holds(now):
            continue
        for alert in alerts:
            if alert.kind != TIER or alert.skipped or alert.tier is None:
                continue
            tier = config.policy.tier(alert.tier)
            assert tier is not None
            if tier.claimed == "owner":
                assert alert.channel == "owners", (alert, now)
            if tier.claimed == "skip":
                pytest.fail(f"a skip tier was sent while claimed: {alert}")


def test_the_next_alert_of_a_claimed_lead_names_the_owner_channel() -> None:
    from referral_watch.policy import next_alert

    upcoming = next_alert(lead(8 * D, ann()), CONFIG, NOW)
    assert upcoming is not None and upcoming[1:] == ("tier reminder", ["owners"])
    last = next_alert(lead(1 * D, ann()), CONFIG, NOW)
    assert last is not None and last[1:] == ("tier final", ["team", "managers", "owners"])
    assert next_alert(lead(8 * D), CONFIG, NOW)[1:] == ("tier reminder", ["team"])  # type: ignore[index]
