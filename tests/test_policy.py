"""Table tests for the pure policy: tiers, catch-up, repeat, expiry, resolution, silences,
match, quiet hours (across DST) and delivery batches. ``now`` is always passed in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from referral_watch.config import ChannelConfig, Config
from referral_watch.config.loader import parse_config
from referral_watch.model import (
    EXPIRED,
    RESOLVED,
    TIER,
    Alert,
    Lead,
    PendingRow,
    Referral,
    Sent,
    TeamMember,
    parse_referral,
)
from referral_watch.policy import (
    channel_matches,
    current_tier,
    delivery_batches,
    due_alerts,
    in_quiet_hours,
)

from policies import policy

CONFIG_TOML = (
    '[auth]\nmethod = "env"\n\n'
    + policy(digest_over=3, digest_limit=4)
    + """
[channels]
team = "json://127.0.0.1:9/team"
owners = { url = "mailto://u:p@127.0.0.1:9?to=sales@example.com", to_assignees = true, \
assignee_domains = ["example.com", "X.org"] }

[channels.managers]
url = "json://127.0.0.1:9/managers"
quiet_hours = "20:00-08:00"
timezone = "Europe/Amsterdam"
"""
)

CONFIG = parse_config(CONFIG_TOML, env={})
NOW = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)  # a Monday, 14:00 in Amsterdam
H = timedelta(hours=1)
D = timedelta(days=1)
S = timedelta(seconds=1)


def config_with(extra: str) -> Config:
    return parse_config(CONFIG_TOML + extra, env={})


def referral(ref_id: str = "L1", **fields: Any) -> Referral:
    base: dict[str, Any] = {
        "id": ref_id,
        "name": f"deal {ref_id}",
        "customer": f"Customer {ref_id}",
        "created": NOW - 14 * D,
    }
    return Referral(**{**base, **fields})


def lead(ref_id: str = "L1", left: timedelta = 10 * D, now: datetime = NOW, **state: Any) -> Lead:
    """A watched lead with ``left`` time left at ``now``."""
    ref = state.pop("referral", None) or referral(ref_id)
    return Lead(referral=ref, deadline=now + left, first_seen=now, last_seen=now, **state)


def sent(
    tier: str | None,
    channel: str = "team",
    state: str = "delivered",
    created: datetime = NOW - D,
    kind: str = TIER,
    lead_id: str = "L1",
) -> Sent:
    return Sent(lead_id, kind, channel, tier, state, created)


def table(alerts: list[Alert]) -> set[tuple[str, str, str | None, bool]]:
    """Alerts as comparable (kind, channel, tier, skipped) tuples."""
    return {(a.kind, a.channel, a.tier, a.skipped) for a in alerts}


def tier_sent(alerts: list[Alert], channel: str) -> str | None:
    names = [a.tier for a in alerts if a.kind == TIER and a.channel == channel and not a.skipped]
    assert len(names) <= 1
    return names[0] if names else None


def tiers_skipped(alerts: list[Alert], channel: str) -> list[str]:
    return sorted(a.tier or "" for a in alerts if a.channel == channel and a.skipped)


# --- config sanity: the policy relies on tiers being sorted least severe first -------------


def test_tiers_are_ordered_by_severity_whatever_the_file_order() -> None:
    assert [t.name for t in CONFIG.policy.tiers] == ["new", "reminder", "urgent", "final"]


# --- tier boundaries -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("left", "team", "team_skipped", "managers"),
    [
        (14 * D + S, None, [], None),
        (14 * D, "new", [], None),
        (14 * D - S, "new", [], None),
        (7 * D + S, "new", [], None),
        (7 * D, "reminder", ["new"], None),
        (7 * D - S, "reminder", ["new"], None),
        (2 * D + S, "reminder", ["new"], None),
        (2 * D, "urgent", ["new", "reminder"], "urgent"),
        (2 * D - S, "urgent", ["new", "reminder"], "urgent"),
        (12 * H + S, "urgent", ["new", "reminder"], "urgent"),
        (12 * H, "final", ["new", "reminder", "urgent"], "final"),
        (12 * H - S, "final", ["new", "reminder", "urgent"], "final"),
        (S, "final", ["new", "reminder", "urgent"], "final"),
        (timedelta(0), "final", ["new", "reminder", "urgent"], "final"),  # at the deadline itself
    ],
)
def test_first_sight_sends_the_most_severe_due_tier_and_skips_the_rest(
    left: timedelta, team: str | None, team_skipped: list[str], managers: str | None
) -> None:
    alerts = due_alerts([lead(left=left)], {}, CONFIG, NOW)
    assert tier_sent(alerts, "team") == team
    assert tiers_skipped(alerts, "team") == team_skipped
    assert tier_sent(alerts, "managers") == managers
    # managers never hear about new/reminder, not even as skipped rows
    assert tiers_skipped(alerts, "managers") == (["urgent"] if managers == "final" else [])
    assert all(a.kind == TIER for a in alerts)


def test_alert_carries_the_tier_severity() -> None:
    alerts = due_alerts([lead(left=H)], {}, CONFIG, NOW)
    final = next(a for a in alerts if a.channel == "team" and not a.skipped)
    assert (final.tier, final.severity) == ("final", 3)
    assert {a.severity for a in alerts if a.skipped and a.channel == "team"} == {0, 1, 2}


@pytest.mark.parametrize(
    ("left", "expected"),
    [
        (15 * D, None),
        (14 * D, "new"),
        (7 * D, "reminder"),
        (12 * H + S, "urgent"),
        (12 * H, "final"),
        (timedelta(0), "final"),
        (-S, None),
    ],
)
def test_current_tier(left: timedelta, expected: str | None) -> None:
    tier = current_tier(lead(left=left), CONFIG, NOW)
    assert (tier.name if tier else None) == expected


def test_current_tier_of_a_resolved_lead_is_none() -> None:
    assert current_tier(lead(left=H, resolution="accepted"), CONFIG, NOW) is None


# --- progression and catch-up --------------------------------------------------------------


def test_next_tier_is_sent_once_without_skips_when_the_earlier_ones_went_out() -> None:
    history = {"L1": [sent("new")]}
    alerts = due_alerts([lead(left=7 * D)], history, CONFIG, NOW)
    assert table(alerts) == {(TIER, "team", "reminder", False)}


def test_an_already_sent_tier_is_not_sent_again() -> None:
    history = {"L1": [sent("new", state="skipped"), sent("reminder")]}
    assert due_alerts([lead(left=3 * D)], history, CONFIG, NOW) == []


@pytest.mark.parametrize("state", ["pending", "delivered", "skipped", "superseded", "dropped"])
def test_any_recorded_row_counts_as_decided(state: str) -> None:
    history = {"L1": [sent("new", state=state)]}
    assert due_alerts([lead(left=8 * D)], history, CONFIG, NOW) == []


def test_catch_up_after_downtime_skips_only_tiers_without_a_row() -> None:
    history = {"L1": [sent("new")]}  # then the daemon was down for a week
    alerts = due_alerts([lead(left=D)], history, CONFIG, NOW)
    assert table(alerts) == {
        (TIER, "team", "reminder", True),
        (TIER, "team", "urgent", False),
        (TIER, "managers", "urgent", False),
    }


def test_each_channel_is_decided_on_its_own() -> None:
    history = {"L1": [sent("new"), sent("reminder"), sent("urgent")]}  # team only
    alerts = due_alerts([lead(left=D)], history, CONFIG, NOW)
    assert table(alerts) == {(TIER, "managers", "urgent", False)}


def test_deadline_moved_later_never_lowers_the_severity() -> None:
    history = {"L1": [sent("new"), sent("reminder", "team"), sent("urgent", "team")]}
    history["L1"].append(sent("urgent", "managers"))
    # Partner Center extended the deadline: only "new" and "reminder" are due now
    assert due_alerts([lead(left=6 * D)], history, CONFIG, NOW) == []
    assert due_alerts([lead(left=13 * D)], history, CONFIG, NOW) == []
    # and when the lead gets close again, the next more severe tier still comes
    alerts = due_alerts([lead(left=6 * H)], history, CONFIG, NOW)
    assert table(alerts) == {(TIER, "team", "final", False), (TIER, "managers", "final", False)}


def test_a_tier_added_later_is_not_sent_below_what_was_heard() -> None:
    # "heads-up" (4d) joined the config after "urgent" went out; then the deadline moved later
    config = config_with(
        '\n[[policy.tiers]]\nname = "heads-up"\nremaining = "4d"\nnotify = ["team"]\n'
    )
    history = {"L1": [sent("new"), sent("reminder"), sent("urgent")]}
    assert due_alerts([lead(left=3 * D)], history, config, NOW) == []
    # a lead that never heard "urgent" does get it
    fresh = {"L1": [sent("new"), sent("reminder")]}
    alerts = due_alerts([lead(left=3 * D)], fresh, config, NOW)
    assert table(alerts) == {(TIER, "team", "heads-up", False)}


# --- repeat --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("last_sent_ago", "repeats"),
    [(4 * H - S, False), (4 * H, True), (4 * H + S, True), (timedelta(0), False)],
)
def test_final_tier_repeats_every_interval(last_sent_ago: timedelta, repeats: bool) -> None:
    history = {"L1": [sent(t) for t in ("new", "reminder", "urgent")]}
    history["L1"].append(sent("final", created=NOW - last_sent_ago))
    alerts = due_alerts([lead(left=5 * H)], history, CONFIG, NOW)
    expected = {(TIER, "team", "final", False)} if repeats else set()
    assert table([a for a in alerts if a.channel == "team"]) == expected


def test_repeat_counts_from_the_latest_copy() -> None:
    history = {"L1": [sent(t) for t in ("new", "reminder", "urgent")]}
    history["L1"] += [sent("final", created=NOW - 9 * H), sent("final", created=NOW - 3 * H)]
    alerts = due_alerts([lead(left=5 * H)], history, CONFIG, NOW)
    assert tier_sent(alerts, "team") is None


def test_a_pending_copy_blocks_the_repeat() -> None:
    history = {"L1": [sent(t) for t in ("new", "reminder", "urgent")]}
    history["L1"].append(sent("final", state="pending", created=NOW - 9 * H))
    alerts = due_alerts([lead(left=3 * H)], history, CONFIG, NOW)
    assert tier_sent(alerts, "team") is None


def test_a_skipped_row_is_not_a_copy_to_repeat_from() -> None:
    history = {"L1": [sent("final", state="skipped", created=NOW - 9 * H)]}
    alerts = due_alerts([lead(left=3 * H)], history, CONFIG, NOW)
    assert tier_sent(alerts, "team") is None  # the row exists: not a first send either


def test_tiers_without_repeat_never_repeat() -> None:
    history = {"L1": [sent("new", created=NOW - 30 * D), sent("reminder", created=NOW - 9 * D)]}
    assert due_alerts([lead(left=3 * D)], history, CONFIG, NOW) == []


def test_zero_repeat_does_not_resend_on_every_cycle() -> None:
    config = parse_config(CONFIG_TOML.replace('repeat = "4h"', 'repeat = "0s"'), env={})
    history = {"L1": [sent(t) for t in ("new", "reminder", "urgent", "final")]}
    alerts = due_alerts([lead(left=3 * H)], history, config, NOW)
    assert [a for a in alerts if a.channel == "team"] == []


# --- expiry --------------------------------------------------------------------------------


def test_past_deadline_announces_expiry_once_and_stops_tiers() -> None:
    alerts = due_alerts([lead(left=-S)], {}, CONFIG, NOW)
    assert table(alerts) == {(EXPIRED, "managers", None, False)}
    notice = alerts[0]
    assert (notice.severity, notice.lead_id) == (-1, "L1")


def test_expiry_notice_already_in_history_is_not_repeated() -> None:
    history = {"L1": [sent(None, "managers", kind=EXPIRED, state="pending")]}
    assert due_alerts([lead(left=-H)], history, CONFIG, NOW) == []


def test_expired_notified_flag_ends_it() -> None:
    assert due_alerts([lead(left=-H, expired_notified=True)], {}, CONFIG, NOW) == []


def test_expiry_is_announced_even_when_silenced() -> None:
    silenced = lead(left=-H, silenced_until=NOW + 30 * D, silence_through_deadline=True)
    assert table(due_alerts([silenced], {}, CONFIG, NOW)) == {(EXPIRED, "managers", None, False)}


def test_no_on_expired_channels_means_no_notice() -> None:
    config = parse_config(CONFIG_TOML.replace('on_expired = ["managers"]', ""), env={})
    assert due_alerts([lead(left=-H)], {}, config, NOW) == []


# --- resolution ----------------------------------------------------------------------------


@pytest.mark.parametrize("answer", ["accepted", "declined", "won", "lost"])
def test_an_answer_is_announced_once_to_on_resolved(answer: str) -> None:
    resolved = lead(left=5 * D, resolution=answer, resolved_at=NOW)
    assert table(due_alerts([resolved], {}, CONFIG, NOW)) == {(RESOLVED, "team", None, False)}
    history = {"L1": [sent(None, "team", kind=RESOLVED)]}
    assert due_alerts([resolved], history, CONFIG, NOW) == []
    notified = lead(left=5 * D, resolution=answer, resolution_notified=True)
    assert due_alerts([notified], {}, CONFIG, NOW) == []


def test_resolved_leads_get_no_more_tier_reminders() -> None:
    resolved = lead(left=H, resolution="declined", resolution_notified=True)
    assert due_alerts([resolved], {}, CONFIG, NOW) == []


def test_expired_via_api_sends_the_expired_notice_if_not_sent_yet() -> None:
    by_api = lead(left=H, resolution="expired")  # Partner Center's clock ran out first
    assert table(due_alerts([by_api], {}, CONFIG, NOW)) == {(EXPIRED, "managers", None, False)}


def test_expired_via_api_after_our_notice_sends_nothing() -> None:
    by_api = lead(left=-H, resolution="expired", expired_notified=True)
    assert due_alerts([by_api], {}, CONFIG, NOW) == []
    history = {"L1": [sent(None, "managers", kind=EXPIRED)]}
    assert due_alerts([lead(left=-H, resolution="expired")], history, CONFIG, NOW) == []


def test_gone_leads_send_nothing() -> None:
    assert due_alerts([lead(left=H, resolution="gone")], {}, CONFIG, NOW) == []
    assert due_alerts([lead(left=-H, resolution="gone")], {}, CONFIG, NOW) == []


# --- silences ------------------------------------------------------------------------------


def test_silenced_lead_gets_no_tier_alerts_until_the_silence_ends() -> None:
    quiet = lead(left=3 * D, silenced_until=NOW + D)
    assert due_alerts([quiet], {}, CONFIG, NOW) == []
    # the silence is over: catch up with the most severe due tier
    later = NOW + D
    alerts = due_alerts([quiet], {}, CONFIG, later)
    assert tier_sent(alerts, "team") == "urgent"
    assert tiers_skipped(alerts, "team") == ["new", "reminder"]


def test_silence_ending_exactly_now_is_over() -> None:
    alerts = due_alerts([lead(left=3 * D, silenced_until=NOW)], {}, CONFIG, NOW)
    assert tier_sent(alerts, "team") == "reminder"


@pytest.mark.parametrize("until", [timedelta(0), S, 30 * D])  # relative to the deadline
def test_final_tier_breaks_a_silence_that_outlasts_the_deadline(until: timedelta) -> None:
    early = lead(left=D, silenced_until=NOW + D + until)
    assert due_alerts([early], {}, CONFIG, NOW) == []  # urgent stays silent
    late = lead(left=6 * H, silenced_until=NOW + 6 * H + until)
    alerts = due_alerts([late], {}, CONFIG, NOW)
    assert tier_sent(alerts, "team") == "final"
    assert tier_sent(alerts, "managers") == "final"


def test_silence_ending_before_the_deadline_holds_even_the_final_tier() -> None:
    quiet = lead(left=6 * H, silenced_until=NOW + 6 * H - S)
    assert due_alerts([quiet], {}, CONFIG, NOW) == []


def test_silence_through_deadline_holds_everything_but_expiry() -> None:
    quiet = lead(left=6 * H, silenced_until=NOW + 30 * D, silence_through_deadline=True)
    assert due_alerts([quiet], {}, CONFIG, NOW) == []
    assert table(due_alerts([quiet], {}, CONFIG, NOW + 7 * H)) == {
        (EXPIRED, "managers", None, False)
    }


def test_resolution_notice_ignores_silence() -> None:
    quiet = lead(resolution="accepted", silenced_until=NOW + 30 * D, silence_through_deadline=True)
    assert table(due_alerts([quiet], {}, CONFIG, NOW)) == {(RESOLVED, "team", None, False)}


# --- match ---------------------------------------------------------------------------------

SAMPLE = {
    "id": "m1",
    "createdDateTime": "2026-05-01T09:00:00.0000000Z",
    "name": "Contoso Azure migration",
    "qualification": "Direct",
    "type": "Independent",
    "direction": "Incoming",
    "customerProfile": {"name": "Contoso", "address": {"country": "nl"}},
    "details": {
        "dealValue": "60,000",
        "currency": "EUR",
        "requirements": {
            "products": [{"id": "Azure"}, {"id": "Microsoft365"}],
            "solutions": [{"id": "SOL-123", "name": "Data Platform"}],
        },
    },
    "team": [
        {"email": "Ann@Example.com", "firstName": "Ann"},
        {"email": "bob@example.com", "contactPreference": {"disableNotifications": True}},
    ],
}
MATCHED = parse_referral(SAMPLE)


def channel(match: dict[str, Any] | None = None, **keys: Any) -> ChannelConfig:
    return ChannelConfig.model_validate({"url": "json://127.0.0.1:9/x", "match": match, **keys})


@pytest.mark.parametrize(
    ("match", "expected"),
    [
        (None, True),
        ({}, True),
        ({"country": "NL"}, True),
        ({"country": ["be", "nl", "lu"]}, True),
        ({"country": ["DE"]}, False),
        ({"country": []}, True),  # an empty list sets no condition
        ({"direction": "incoming"}, True),
        ({"direction": "Outgoing"}, False),
        ({"type": ["INDEPENDENT", "Shared"]}, True),
        ({"type": "Shared"}, False),
        ({"qualification": "direct"}, True),
        ({"qualification": ["MarketingQualified", "SalesQualified"]}, False),
        ({"solution": "SOL-123"}, True),
        ({"solution": "data platform"}, True),
        ({"solution": ["Security"]}, False),
        ({"product": "azure"}, True),
        ({"product": ["Dynamics365"]}, False),
        ({"team_email": "ann@example.com"}, True),
        ({"team_email": "BOB@example.com"}, True),  # assigned, though opted out of mail
        ({"team_email": ["carol@example.com"]}, False),
        ({"min_deal_value": 60000}, True),
        ({"min_deal_value": 60000.01}, False),
        ({"max_deal_value": 60000}, True),
        ({"max_deal_value": 59999.99}, False),
        ({"min_deal_value": 50000, "max_deal_value": 100000}, True),
        ({"country": "NL", "min_deal_value": 50000, "product": "Azure"}, True),
        ({"country": "NL", "min_deal_value": 50000, "product": "Dynamics365"}, False),
        ({"country": "BE", "min_deal_value": 50000}, False),
    ],
)
def test_channel_matches_every_key(match: dict[str, Any] | None, expected: bool) -> None:
    assert channel_matches(channel(match), MATCHED) is expected


@pytest.mark.parametrize("match", [{"min_deal_value": 0}, {"max_deal_value": 1e12}])
def test_a_lead_without_a_value_fails_any_value_bound(match: dict[str, Any]) -> None:
    no_value = parse_referral({**SAMPLE, "details": {"currency": "EUR"}})
    assert no_value.deal_value is None
    assert channel_matches(channel(match), no_value) is False


def test_a_lead_without_a_team_fails_a_team_email_match() -> None:
    assert channel_matches(channel({"team_email": "ann@example.com"}), referral()) is False


BENELUX = """
[channels.benelux]
url = "json://127.0.0.1:9/benelux"
match = { country = ["NL", "BE"], min_deal_value = 50000 }
"""


def benelux_config() -> Config:
    text = CONFIG_TOML.replace('notify = ["team", "managers"]', 'notify = ["benelux"]')
    text = text.replace('on_expired = ["managers"]', 'on_expired = ["benelux"]')
    text = text.replace('on_resolved = ["team"]', 'on_resolved = ["benelux"]')
    return parse_config(text + BENELUX, env={})


@pytest.mark.parametrize(
    ("country", "value", "hears"),
    [("NL", Decimal(60000), True), ("DE", Decimal(60000), False), ("BE", Decimal(100), False)],
)
def test_match_filters_tiers_and_notices(country: str, value: Decimal, hears: bool) -> None:
    config = benelux_config()
    ref = referral(country=country, deal_value=value)
    expected_tier = {(TIER, "benelux", "final", False)} if hears else set()
    alerts = due_alerts([lead(left=H, referral=ref)], {}, config, NOW)
    assert {t for t in table(alerts) if t[1] == "benelux" and not t[3]} == expected_tier
    for resolution, kind in (("accepted", RESOLVED), ("expired", EXPIRED)):
        notice = lead(left=H, referral=ref, resolution=resolution)
        expected = {(kind, "benelux", None, False)} if hears else set()
        assert table(due_alerts([notice], {}, config, NOW)) == expected


# --- quiet hours ---------------------------------------------------------------------------

AMS = channel(quiet_hours="20:00-08:00", timezone="Europe/Amsterdam")
WEEKEND = channel(quiet_hours="20:00-08:00", quiet_days=["Sat", "Sun"], timezone="Europe/Amsterdam")
DAYTIME = channel(quiet_hours="09:00-17:00")  # no zone: the default zone applies
LA = channel(quiet_hours="22:00-07:00", timezone="America/Los_Angeles")


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("ch", "instant", "quiet"),
    [
        (AMS, "2026-05-04T17:59:59", False),  # 19:59:59 CEST
        (AMS, "2026-05-04T18:00:00", True),  # 20:00 CEST
        (AMS, "2026-05-04T22:00:00", True),  # midnight
        (AMS, "2026-05-05T05:59:59", True),  # 07:59:59
        (AMS, "2026-05-05T06:00:00", False),  # 08:00: the end is not quiet
        (AMS, "2026-01-05T19:00:00", True),  # 20:00 CET in winter
        (AMS, "2026-01-05T18:59:00", False),
        (AMS, "2026-03-29T05:59:59", True),  # 07:59:59 CEST, the morning after springing forward
        (AMS, "2026-03-29T06:00:00", False),  # 08:00 CEST
        (DAYTIME, "2026-05-04T08:59:00", False),
        (DAYTIME, "2026-05-04T09:00:00", True),
        (DAYTIME, "2026-05-04T16:59:59", True),
        (DAYTIME, "2026-05-04T17:00:00", False),
        (WEEKEND, "2026-05-08T12:00:00", False),  # Friday 14:00
        (WEEKEND, "2026-05-08T21:59:59", True),  # Friday 23:59:59 (quiet hours)
        (WEEKEND, "2026-05-09T12:00:00", True),  # Saturday noon
        (WEEKEND, "2026-05-10T21:59:59", True),  # Sunday 23:59:59
        (WEEKEND, "2026-05-11T05:59:00", True),  # Monday 07:59 (quiet hours)
        (WEEKEND, "2026-05-11T06:00:00", False),  # Monday 08:00
        (WEEKEND, "2026-05-08T22:30:00", True),  # 00:30 Saturday local, still Friday in UTC
        (channel(quiet_days=["Mon"], timezone="Pacific/Auckland"), "2026-05-03T12:00:00", True),
        (channel(quiet_hours="08:00-08:00"), "2026-05-04T08:00:00", False),  # empty range
        (channel(), "2026-05-09T12:00:00", False),
    ],
)
def test_in_quiet_hours(ch: ChannelConfig, instant: str, quiet: bool) -> None:
    assert in_quiet_hours(ch, utc(instant)) is quiet


def test_default_zone_applies_when_the_channel_names_none() -> None:
    at = utc("2026-05-04T07:30:00")  # 09:30 in Amsterdam, 07:30 in UTC
    assert in_quiet_hours(DAYTIME, at) is False
    assert in_quiet_hours(DAYTIME, at, "Europe/Amsterdam") is True


def test_quiet_hours_starting_in_the_spring_gap() -> None:
    # 02:30 does not exist on 2026-03-29 in Amsterdam: the jump to 03:00 ends the quiet time
    gap = channel(quiet_hours="01:30-02:30", timezone="Europe/Amsterdam")
    assert in_quiet_hours(gap, utc("2026-03-29T00:30:00")) is True  # 01:30 CET
    assert in_quiet_hours(gap, utc("2026-03-29T00:59:59")) is True
    assert in_quiet_hours(gap, utc("2026-03-29T01:00:00")) is False  # 03:00 CEST


def test_quiet_hours_in_the_autumn_fold_are_quiet_twice() -> None:
    # 01:00-01:30 happens twice on 2026-11-01 in Los Angeles (PDT, then PST)
    fold = channel(quiet_hours="01:00-01:30", timezone="America/Los_Angeles")
    assert in_quiet_hours(fold, utc("2026-11-01T08:15:00")) is True  # 01:15 PDT
    assert in_quiet_hours(fold, utc("2026-11-01T08:45:00")) is False  # 01:45 PDT
    assert in_quiet_hours(fold, utc("2026-11-01T09:15:00")) is True  # 01:15 PST


# --- delivery batches ----------------------------------------------------------------------

NIGHT = utc("2026-05-04T22:00:00")  # midnight in Amsterdam: managers are quiet


def row(
    row_id: int,
    lead_id: str | None = "L1",
    channel: str = "team",
    tier: str | None = "urgent",
    kind: str = TIER,
) -> PendingRow:
    return PendingRow(row_id, lead_id, kind, channel, tier, NOW)


def leads_by_id(*items: Lead) -> dict[str, Lead]:
    return {item.id: item for item in items}


def test_each_alert_is_its_own_batch_up_to_digest_over() -> None:
    rows = [row(i, f"L{i}") for i in (1, 2, 3)]
    known = leads_by_id(*(lead(f"L{i}", left=i * H) for i in (1, 2, 3)))
    batches = delivery_batches(rows, known, CONFIG, NOW)
    assert [(b.row_ids, b.lead_ids, b.digest) for b in batches] == [
        ((1,), ("L1",), False),
        ((2,), ("L2",), False),
        ((3,), ("L3",), False),
    ]
    assert all((b.channel, b.kind, b.tier) == ("team", TIER, "urgent") for b in batches)


def test_more_than_digest_over_become_one_digest_most_urgent_first() -> None:
    rows = [row(i, f"L{i}") for i in (1, 2, 3, 4)]
    left = {"L1": 30 * H, "L2": 10 * H, "L3": 40 * H, "L4": 20 * H}
    known = leads_by_id(*(lead(k, left=v) for k, v in left.items()))
    [digest] = delivery_batches(rows, known, CONFIG, NOW)
    assert digest.digest is True
    assert digest.lead_ids == ("L2", "L4", "L1", "L3")
    assert sorted(digest.row_ids) == [1, 2, 3, 4]
    assert digest.more == 0


def test_digest_lists_at_most_digest_limit_and_counts_the_rest() -> None:
    rows = [row(i, f"L{i}") for i in range(1, 8)]
    known = leads_by_id(*(lead(f"L{i}", left=(10 - i) * H) for i in range(1, 8)))
    [digest] = delivery_batches(rows, known, CONFIG, NOW)
    assert digest.lead_ids == ("L7", "L6", "L5", "L4")
    assert digest.more == 3
    assert sorted(digest.row_ids) == list(range(1, 8))  # all are settled by the one message


def test_digests_are_per_channel_and_tier() -> None:
    urgent_team = [row(i, f"L{i}") for i in range(1, 5)]
    final_team = [row(10 + i, f"F{i}", tier="final") for i in range(1, 3)]
    urgent_managers = [row(20 + i, f"L{i}", channel="managers") for i in range(1, 3)]
    expired = [row(30 + i, f"X{i}", "managers", None, EXPIRED) for i in range(1, 5)]
    batches = delivery_batches(
        urgent_team + final_team + urgent_managers + expired, {}, CONFIG, NOW
    )
    shape = [(b.channel, b.kind, b.tier, b.digest, len(b.row_ids)) for b in batches]
    assert shape == [
        ("team", TIER, "urgent", True, 4),
        ("team", TIER, "final", False, 1),
        ("team", TIER, "final", False, 1),
        ("managers", TIER, "urgent", False, 1),
        ("managers", TIER, "urgent", False, 1),
        ("managers", EXPIRED, None, True, 4),
    ]


def test_pruned_leads_still_form_batches_and_sort_last() -> None:
    rows = [row(i, f"L{i}") for i in (1, 2, 3, 4)]
    known = leads_by_id(lead("L3", left=H), lead("L4", left=2 * H))  # L1, L2 pruned
    [digest] = delivery_batches(rows, known, CONFIG, NOW)
    assert digest.lead_ids == ("L3", "L4", "L1", "L2")
    single = delivery_batches(rows[:1], {}, CONFIG, NOW)
    assert [(b.row_ids, b.lead_ids) for b in single] == [((1,), ("L1",))]


def test_to_assignees_groups_by_the_leads_team() -> None:
    def assigned(ref_id: str, *emails: str) -> Lead:
        team = tuple(TeamMember(email=e) for e in emails)
        return lead(ref_id, left=H, referral=referral(ref_id, team=team))

    known = leads_by_id(
        *(assigned(f"A{i}", "ann@example.com", "bob@example.com") for i in range(4)),
        assigned("B0", "bob@example.com", "ann@example.com"),  # same set, other order
        assigned("C0", "carol@example.com"),
        assigned("N0"),  # no team: the URL's own recipients
        assigned("M0", "john.doe@microsoft.com"),  # only Microsoft's seller: not ours
        assigned("D0", "john.doe@microsoft.com", "dan@EXAMPLE.com"),  # ours only
        lead(
            "Q0",
            left=H,
            referral=referral("Q0", team=(TeamMember("q@x.org", notifications=False),)),
        ),
    )
    rows = [row(i, lead_id, "owners") for i, lead_id in enumerate(known)]
    batches = delivery_batches(rows, known, CONFIG, NOW)
    shape = [(b.recipients, b.digest, b.lead_ids, b.more, len(b.row_ids)) for b in batches]
    assert shape == [
        (("ann@example.com", "bob@example.com"), True, ("A0", "A1", "A2", "A3"), 1, 5),
        (("carol@example.com",), False, ("C0",), 0, 1),
        ((), False, ("N0",), 0, 1),
        ((), False, ("M0",), 0, 1),
        ((), False, ("Q0",), 0, 1),
        (("dan@EXAMPLE.com",), False, ("D0",), 0, 1),
    ]
    # other channels never carry recipients
    assert delivery_batches([row(1, "C0")], known, CONFIG, NOW)[0].recipients == ()


def test_quiet_channel_holds_alerts_except_bypass_quiet_tiers() -> None:
    rows = [
        row(1, "L1", "managers", "urgent"),
        row(2, "L2", "managers", "final"),  # bypass_quiet
        row(3, "L3", "managers", None, EXPIRED),
        row(4, "L4", "team", "urgent"),  # team has no quiet hours
    ]
    batches = delivery_batches(rows, {}, CONFIG, NIGHT)
    assert [b.row_ids for b in batches] == [(2,), (4,)]
    morning = utc("2026-05-05T06:00:00")
    assert [b.row_ids for b in delivery_batches(rows, {}, CONFIG, morning)] == [
        (1,),
        (2,),
        (3,),
        (4,),
    ]


def test_messages_about_no_lead_are_never_held_nor_digested() -> None:
    rows = [row(i, None, "managers", None, "ops") for i in range(1, 8)]
    batches = delivery_batches(rows, {}, CONFIG, NIGHT)
    assert [(b.row_ids, b.lead_ids, b.digest, b.kind) for b in batches] == [
        ((i,), (), False, "ops") for i in range(1, 8)
    ]


def test_a_held_tier_superseded_by_a_more_severe_one_rides_along() -> None:
    rows = [row(1, "L1", "managers", "urgent"), row(2, "L1", "managers", "final")]
    [batch] = delivery_batches(rows, {}, CONFIG, NIGHT)  # final bypasses the quiet night
    assert (batch.tier, batch.lead_ids, sorted(batch.row_ids)) == ("final", ("L1",), [1, 2])
    [batch] = delivery_batches(rows, {}, CONFIG, NOW)  # same by day: one message, not two
    assert (batch.tier, sorted(batch.row_ids)) == ("final", [1, 2])


def test_a_pending_notice_replaces_stale_tier_reminders() -> None:
    rows = [row(1, "L1", "managers", "urgent"), row(2, "L1", "managers", None, EXPIRED)]
    assert delivery_batches(rows, {}, CONFIG, NIGHT) == []  # both held
    [batch] = delivery_batches(rows, {}, CONFIG, utc("2026-05-05T06:00:00"))
    assert (batch.kind, batch.lead_ids, sorted(batch.row_ids)) == (EXPIRED, ("L1",), [1, 2])


def test_superseded_rows_count_once_towards_a_digest() -> None:
    rows = [row(i, f"L{i}") for i in (1, 2, 3)] + [row(9, "L1", tier="reminder")]
    batches = delivery_batches(rows, {}, CONFIG, NOW)
    assert [b.digest for b in batches] == [False, False, False]
    assert sorted(i for b in batches for i in b.row_ids) == [1, 2, 3, 9]


def test_rows_for_a_channel_removed_from_the_config_are_not_held_forever() -> None:
    # delivery then reports "unknown channel" and the outbox's failure rules take over
    batches = delivery_batches([row(1, "L1", "retired")], {}, CONFIG, NIGHT)
    assert [(b.channel, b.row_ids) for b in batches] == [("retired", (1,))]


def test_naive_instants_are_taken_as_utc() -> None:
    naive = NIGHT.replace(tzinfo=None)
    assert in_quiet_hours(AMS, naive) is True
    assert tier_sent(due_alerts([lead(left=H)], {}, CONFIG, NOW.replace(tzinfo=None)), "team")
