"""End to end: who hears about which lead, and when (match, quiet hours, assignees, silences)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from referral_watch.config.loader import load_config
from referral_watch.cycle.runner import Cycle
from referral_watch.notify import Notifier
from referral_watch.partner_center.auth import EnvTokenProvider
from referral_watch.partner_center.client import PartnerCenter
from referral_watch.sandbox.records import format_time
from referral_watch.state.store import Store

from conftest import World
from receivers import SmtpReceiver, WebhookReceiver


def customers(receiver: WebhookReceiver) -> list[str]:
    return [str(body["title"]).rsplit(": ", 1)[-1] for body in receiver.bodies]


def test_a_benelux_channel_hears_only_matching_leads(world: World) -> None:
    with WebhookReceiver() as benelux:
        world.channels = {
            "benelux": f'{{ url = "{benelux.json_url}", '
            'match = { country = ["NL", "BE", "LU"], min_deal_value = 50000 } }'
        }
        world.tiers = world.tiers.replace('notify = ["team"]', 'notify = ["team", "benelux"]')
        world.add_lead(
            age=timedelta(hours=1),
            customer="Big Dutch",
            country="NL",
            deal_value=100000,
            currency="EUR",
        )
        world.add_lead(
            age=timedelta(hours=2),
            customer="Small Dutch",
            country="NL",
            deal_value=10000,
            currency="EUR",
        )
        world.add_lead(
            age=timedelta(hours=3), customer="Big American", country="US", deal_value=100000
        )
        world.add_lead(
            age=timedelta(hours=4), customer="Belgian No Value", country="BE", deal_value=None
        )
        assert world.cli("run", "--once").code == 0
        assert customers(benelux) == ["Big Dutch"]
        assert sorted(customers(world.team)) == [
            "Belgian No Value",
            "Big American",
            "Big Dutch",
            "Small Dutch",
        ]
        lead_id = world.cli("status", "--json").json()[0]["id"]
        explained = world.cli("status", "--explain", lead_id)
        assert explained.code == 0
        assert "channel benelux:" in explained.out


# Microsoft's own sample referral has only the Microsoft seller in its team (see
# shared/reference/partner-center-referrals.md, `team`).
MICROSOFT_SELLER = {"firstName": "John", "lastName": "Doe", "email": "john.doe@microsoft.com"}


def test_assignee_alerts_go_to_our_people_only_by_real_smtp(world: World) -> None:
    with SmtpReceiver() as smtp:
        url = smtp.mailto_url(to="sales@example.com")
        world.channels = {
            "owners": f'{{ url = "{url}", to_assignees = true, '
            'assignee_domains = ["contoso.example"] }'
        }
        world.tiers = world.tiers.replace('notify = ["team"]', 'notify = ["owners"]', 1)
        world.add_lead(
            age=timedelta(hours=1),
            customer="Assigned Co",
            team=[
                MICROSOFT_SELLER,
                {"firstName": "Jan", "lastName": "Bakker", "email": "jan@contoso.example"},
                {
                    "firstName": "Mia",
                    "lastName": "Jansen",
                    "email": "mia@contoso.example",
                    "contactPreference": {"disableNotifications": True},
                },
            ],
        )
        world.add_lead(
            age=timedelta(hours=2), customer="Contoso Customer Inc", team=[MICROSOFT_SELLER]
        )
        world.add_lead(age=timedelta(hours=3), customer="Nobody's Co", team=[])
        assert world.cli("run", "--once").code == 0
        mails = smtp.wait_for(3)
        by_subject = {mail.subject.rsplit(": ", 1)[-1]: mail for mail in mails}
        assert len(by_subject) == 3
        assigned = by_subject["Assigned Co"]
        assert assigned.rcpt_tos == ("jan@contoso.example",)
        assert "Jan Bakker" in assigned.text and "Mia Jansen" in assigned.text
        assert "John Doe" not in assigned.text  # "Assigned team" shows our people only
        # only Microsoft's seller in the team: our own list hears it, not Microsoft
        microsoft_only = by_subject["Contoso Customer Inc"]
        assert microsoft_only.rcpt_tos == ("sales@example.com",)
        assert "John Doe" not in microsoft_only.text
        assert "nobody assigned" in microsoft_only.text
        assert by_subject["Nobody's Co"].rcpt_tos == ("sales@example.com",)
        # every mail went to our domain: none reached the Microsoft seller
        assert all(
            r.endswith(("@contoso.example", "@example.com")) for m in mails for r in m.rcpt_tos
        )


def test_to_assignees_without_assignee_domains_is_a_config_error(world: World) -> None:
    world.channels = {
        "owners": '{ url = "mailto://127.0.0.1:9?to=a@example.com", to_assignees = true }'
    }
    checked = world.cli("check-config")
    assert checked.code == 2
    assert "channels.owners: to_assignees needs assignee_domains" in checked.err
    assert world.cli("run", "--once").code == 2


def test_a_silence_from_the_cli_holds_tier_reminders(world: World) -> None:
    lead = world.add_lead(age=timedelta(hours=1), customer="Quiet Please")
    assert world.cli("run", "--once").code == 0
    assert len(world.team.bodies) == 1  # "new"

    silenced = world.cli("silence", lead[:8], "--for", "2d", "--reason", "customer call Friday")
    assert silenced.code == 0, silenced.err
    assert lead in silenced.out
    status = world.cli("status", "--json").json()[0]
    assert status["silenced_until"] is not None
    assert status["silence_reason"] == "customer call Friday"
    assert "until" in world.cli("status").out

    # Partner Center now shows the lead as created 8 days ago: the "reminder" tier is due.
    world.sandbox.update(lead, createdDateTime=format_time(datetime.now(UTC) - timedelta(days=8)))
    assert world.cli("run", "--once").code == 0
    assert len(world.team.bodies) == 1  # held by the silence

    assert world.cli("unsilence", lead).code == 0
    assert world.cli("run", "--once").code == 0
    assert len(world.team.bodies) == 2
    assert "Quiet Please" in world.team.bodies[1]["title"]


def test_silencing_an_unknown_lead_exits_1(world: World) -> None:
    world.add_lead(age=timedelta(hours=1))
    world.cli("run", "--once")
    outcome = world.cli("silence", "no-such-lead", "--for", "1d")
    assert outcome.code == 1
    assert "no lead with id 'no-such-lead'" in outcome.err
    bad = world.cli("silence", "no-such-lead", "--for", "soon")
    assert bad.code == 2
    assert "units s m h d w" in bad.err


def quiet_at_night(url: str) -> str:
    return f'{{ url = "{url}", quiet_hours = "20:00-08:00", timezone = "Europe/Amsterdam" }}'


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def cycle_at(world: World, clock: Clock) -> int:
    """One real cycle (sandbox over HTTP, SQLite, Apprise) at the simulated time."""
    config = load_config(world.write_config())
    tokens = EnvTokenProvider("T", environ={"T": "sandbox-token"})
    with Store(config.state.path) as store, PartnerCenter(config.partner_center, tokens) as api:
        return Cycle(config, store, api, Notifier(config.channels), clock).run().held


def test_quiet_hours_hold_alerts_until_they_end(world: World, tmp_path: Path) -> None:
    # 21:30 in Amsterdam (CET, UTC+1) on a Tuesday: the managers channel is quiet until 08:00.
    evening = datetime(2026, 11, 24, 20, 30, tzinfo=UTC)
    clock = Clock(evening)
    world.channels = {"managers": quiet_at_night(world.managers.json_url)}
    world.add_lead(age=timedelta(days=12, hours=6), now=evening, customer="Night Owl Ltd")
    assert cycle_at(world, clock) == 1  # urgent: team now, managers held
    assert len(world.team.bodies) == 1
    assert world.managers.bodies == []

    clock.now = datetime(2026, 11, 25, 6, 59, tzinfo=UTC)  # 07:59 in Amsterdam: still quiet
    assert cycle_at(world, clock) == 1
    assert world.managers.bodies == []

    clock.now = datetime(2026, 11, 25, 7, 1, tzinfo=UTC)  # 08:01: quiet hours are over
    assert cycle_at(world, clock) == 0
    assert customers(world.managers) == ["Night Owl Ltd"]
    clock.now += timedelta(minutes=15)
    cycle_at(world, clock)
    assert len(world.managers.bodies) == 1  # delivered exactly once


def test_a_held_alert_overtaken_by_a_more_severe_tier_goes_out_once(world: World) -> None:
    night = datetime(2026, 11, 24, 22, 0, tzinfo=UTC)  # 23:00 in Amsterdam
    clock = Clock(night)
    world.channels = {"managers": quiet_at_night(world.managers.json_url)}
    # urgent now (18h left); final (12h) comes due before the quiet hours end
    world.add_lead(age=timedelta(days=13, hours=6), now=night, customer="Overtaken BV")
    cycle_at(world, clock)
    assert len(world.team.bodies) == 1  # the team has no quiet hours: urgent now
    clock.now = night + timedelta(hours=7, minutes=30)  # 06:30 local: final is due, still quiet
    cycle_at(world, clock)
    assert world.managers.bodies == []
    clock.now = night + timedelta(hours=9, minutes=5)  # 08:05 local
    cycle_at(world, clock)
    clock.now += timedelta(minutes=15)
    cycle_at(world, clock)
    # one message, the final one (8h 55m left), not the urgent one held overnight
    assert customers(world.managers) == ["Overtaken BV"]
    assert "8h 55m" in world.managers.bodies[0]["title"]


def test_bypass_quiet_tier_is_sent_during_quiet_hours(world: World) -> None:
    night = datetime(2026, 11, 24, 23, 0, tzinfo=UTC)
    clock = Clock(night)
    world.channels = {"managers": quiet_at_night(world.managers.json_url)}
    world.tiers = world.tiers.replace(
        'remaining = "12h"\nnotify = ["team", "managers"]',
        'remaining = "12h"\nnotify = ["team", "managers"]\nbypass_quiet = true',
    )
    world.add_lead(age=timedelta(days=13, hours=16), now=night, customer="Dies Before Breakfast")
    assert cycle_at(world, clock) == 0
    assert customers(world.managers) == ["Dies Before Breakfast"]


def test_a_message_failing_for_a_day_is_dropped_and_ops_told(world: World) -> None:
    start = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
    clock = Clock(start)
    with WebhookReceiver() as ops:
        world.channels = {"ops": ops.json_url}
        world.extra = '[operations]\nnotify = ["ops"]\n'
        world.add_lead(age=timedelta(days=12, hours=6), now=start, customer="Unlucky Co")
        world.managers.fail_next(100)  # the managers' channel refuses everything
        cycle_at(world, clock)
        clock.now += timedelta(hours=23)
        cycle_at(world, clock)
        assert ops.bodies == []  # not a day yet: still retried
        tries = len(world.managers.requests)
        clock.now += timedelta(hours=1, minutes=1)
        cycle_at(world, clock)
        assert len(world.managers.requests) == tries + 1  # the last try
        clock.now += timedelta(minutes=15)
        cycle_at(world, clock)  # the notice queued while delivering goes out with this cycle
        assert len(world.managers.requests) == tries + 1  # dropped: not tried again
        assert [b["title"] for b in ops.bodies] == ["referral-watch: a message was dropped"]
        assert "channel managers" in ops.bodies[0]["message"]
        assert len(world.team.bodies) == 1  # the other channel was never held up
