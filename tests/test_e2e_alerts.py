"""End to end over real HTTP: the sandbox as Partner Center, local webhook receivers as the
team and managers channels, a real state file, and the CLI as an operator runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

from test_e2e_claims import cli_at

from conftest import World


def titles(receiver: object) -> list[str]:
    return [str(body["title"]) for body in receiver.bodies]  # type: ignore[attr-defined]


def messages(receiver: object) -> list[str]:
    return [str(body["message"]) for body in receiver.bodies]  # type: ignore[attr-defined]


def test_a_new_lead_is_announced_once(world: World) -> None:
    lead = world.add_lead(age=timedelta(hours=1), customer="Fabrikam Customer Inc")
    first = world.cli("run", "--once")
    assert first.code == 0, first.err
    assert "1 new" in first.out
    assert len(world.team.bodies) == 1
    assert "Fabrikam Customer Inc" in titles(world.team)[0]
    assert lead in messages(world.team)[0]
    assert world.managers.bodies == []

    again = world.cli("run", "--once")
    assert again.code == 0
    assert len(world.team.bodies) == 1  # nothing twice

    status = world.cli("status", "--json").json()
    assert [entry["id"] for entry in status] == [lead]
    assert status[0]["tiers_sent"] == ["new"]
    assert status[0]["resolution"] is None
    assert 13 * 86400 < status[0]["remaining_seconds"] < 14 * 86400


def test_a_lead_first_seen_late_gets_only_the_most_severe_tier(world: World) -> None:
    world.add_lead(age=timedelta(days=13, hours=20), customer="Late Corp")
    result = world.cli("run", "--once")
    assert result.code == 0, result.err
    assert len(world.team.bodies) == 1
    assert len(world.managers.bodies) == 1
    assert "Late Corp" in titles(world.managers)[0]
    status = world.cli("status", "--json").json()
    assert status[0]["tiers_sent"] == ["final"]


def test_an_answered_lead_is_resolved_and_announced(world: World) -> None:
    lead = world.add_lead(age=timedelta(days=1), customer="Answered Ltd")
    assert world.cli("run", "--once").code == 0
    world.sandbox.update(lead, substatus="Accepted", status="Active")
    result = world.cli("run", "--once")
    assert result.code == 0, result.err
    assert "1 resolved" in result.out
    assert len(world.team.bodies) == 2
    assert "Answered Ltd" in titles(world.team)[1]
    assert world.cli("status", "--json").json() == []
    resolved = world.cli("status", "--json", "--all").json()
    assert resolved[0]["resolution"] == "accepted"
    world.cli("run", "--once")
    assert len(world.team.bodies) == 2  # told once


def test_a_lead_that_vanishes_is_gone(world: World) -> None:
    lead = world.add_lead(age=timedelta(days=1))
    world.cli("run", "--once")
    world.sandbox.remove(lead)
    assert world.cli("run", "--once").code == 0
    assert world.cli("status", "--json", "--all").json()[0]["resolution"] == "gone"


def test_an_expired_lead_is_announced_once_and_tiers_stop(world: World) -> None:
    world.add_lead(age=timedelta(days=14, hours=1), customer="Too Late BV")
    assert world.cli("run", "--once").code == 0
    assert len(world.managers.bodies) == 1
    assert "Too Late BV" in titles(world.managers)[0]
    assert world.team.bodies == []  # no tier reminder for a lead already past its deadline
    world.cli("run", "--once")
    assert len(world.managers.bodies) == 1
    status = world.cli("status", "--json").json()
    assert status[0]["remaining_seconds"] < 0


def test_twelve_new_leads_arrive_as_one_digest(world: World) -> None:
    for n in range(12):
        world.add_lead(age=timedelta(hours=n + 1), customer=f"Customer {n:02d}")
    result = world.cli("run", "--once")
    assert result.code == 0, result.err
    assert len(world.team.bodies) == 1
    digest = messages(world.team)[0]
    assert sum(f"Customer {n:02d}" in digest for n in range(12)) >= 6
    assert "12" in titles(world.team)[0]
    status = world.cli("status", "--json").json()
    assert all(entry["tiers_sent"] == ["new"] for entry in status)


def test_a_failing_channel_is_retried_without_duplicating_the_others(world: World) -> None:
    world.add_lead(age=timedelta(days=12, hours=6), customer="Retry Inc")  # urgent: both
    world.managers.fail_next(1)
    first = world.cli("run", "--once")
    assert first.code == 1
    assert "managers" in first.out
    assert len(world.team.bodies) == 1
    assert len(world.managers.requests) == 1  # tried, refused

    second = world.cli("run", "--once")
    assert second.code == 0, second.out
    assert len(world.team.bodies) == 1  # not again
    assert len(world.managers.requests) == 2  # retried, accepted
    assert "Retry Inc" in titles(world.managers)[-1]


def test_a_malformed_record_is_skipped_and_the_others_alerted(world: World) -> None:
    world.add_lead(age=timedelta(hours=2), customer="Good Lead")
    world.sandbox.add(
        {
            "id": "broken-1",
            "createdDateTime": "yesterday",
            "substatus": "Pending",
            "direction": "Incoming",
        }
    )
    result = world.cli("run", "--once")
    assert result.code == 0, result.err
    assert "1 malformed" in result.out
    assert "broken-1" in result.err  # the log names it
    assert len(world.team.bodies) == 1


def test_a_failed_poll_changes_nothing_and_exits_1(world: World) -> None:
    world.add_lead(age=timedelta(hours=2))
    world.sandbox.fail(500, times=10)
    result = world.cli("run", "--once")
    assert result.code == 1
    assert "Poll failed" in result.out
    assert "Traceback" not in result.out + result.err
    assert world.team.bodies == []
    assert world.cli("status", "--json").json() == []


def test_a_wrong_token_is_reported_clearly(world: World, monkeypatch: object) -> None:
    world.sandbox.token = "another-token"
    result = world.cli("run", "--once")
    assert result.code == 1
    assert "401" in result.out
    # the env method is renewed by whoever sets the variable, not by `login`
    assert "put a fresh token in the environment variable RW_TEST_TOKEN" in result.out
    assert "referral-watch login" not in result.out
    assert "sandbox-token" not in result.out + result.err


def test_crash_between_decision_and_delivery_loses_nothing(world: World) -> None:
    world.add_lead(age=timedelta(hours=3), customer="Crash Test Ltd")
    world.write_config()
    # A real process that dies (os._exit, like kill -9) right after deciding, before delivering.
    code = (
        "import os, sys\n"
        "from referral_watch import cli\n"
        "from referral_watch.cycle.delivery import Delivery\n"
        "Delivery.deliver = lambda self, result, only=None: os._exit(9)\n"
        f"cli.main(['--config', {str(world.config_path)!r}, 'run', '--once'])\n"
    )
    env = {**os.environ}
    died = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert died.returncode == 9, died.stderr
    assert world.team.bodies == []

    after = world.cli("run", "--once")
    assert after.code == 0, after.err
    assert len(world.team.bodies) == 1
    assert "Crash Test Ltd" in titles(world.team)[0]
    world.cli("run", "--once")
    assert len(world.team.bodies) == 1


def test_a_lead_opened_but_not_answered_stays_watched(world: World) -> None:
    lead = world.add_lead(age=timedelta(days=1), customer="Opened Only")
    world.cli("run", "--once")
    world.sandbox.update(lead, substatus="Received")  # leaves the default filter, still New
    assert world.cli("run", "--once").code == 0
    status = world.cli("status", "--json").json()
    assert [entry["id"] for entry in status] == [lead]
    assert status[0]["resolution"] is None
    assert len(world.team.bodies) == 1  # no "resolved" notice: nobody answered it


def test_run_refuses_a_channel_url_apprise_does_not_understand(world: World) -> None:
    world.channels = {"legacy": "msteams://abc/def/ghi"}
    world.add_lead(age=timedelta(hours=1))
    outcome = world.cli("run", "--once")
    assert outcome.code == 2
    assert "channels.legacy.url" in outcome.err
    assert "Workflow" in outcome.err  # says how to move to a Teams workflow
    assert world.team.bodies == []  # nothing polled or sent with a broken config


def test_one_channel_in_dutch_and_another_in_english_for_the_same_lead(world: World) -> None:
    world.channels = {
        "team": f'{{ url = "{world.team.json_url}", locale = "nl-NL", '
        'timezone = "Europe/Amsterdam" }'
    }
    world.tiers = world.tiers.replace('notify = ["team"]', 'notify = ["team", "managers"]', 1)
    world.extra = '[messages]\nlocale = "en-US"\ntimezone = "America/Los_Angeles"\n'
    world.add_lead(age=timedelta(hours=1), customer="Tweetalig BV", deal_value=25000)
    assert world.cli("run", "--once").code == 0
    dutch, english = world.team.bodies[0], world.managers.bodies[0]
    assert "Tweetalig BV" in dutch["title"] and "Tweetalig BV" in english["title"]
    assert "25.000 USD" in dutch["message"]
    assert "25,000 USD" in english["message"]
    assert "Lead expires in" in english["title"]
    assert "Lead expires in" not in dutch["title"]
    assert "CET" in dutch["message"]
    assert "PST" in english["message"]


def test_the_heartbeat_is_pinged_after_a_good_cycle_only(world: World) -> None:
    from receivers import WebhookReceiver

    with WebhookReceiver(path="/ping/abc") as pings:
        world.extra = f'[heartbeat]\nurl = "{pings.url}"\n'
        assert world.cli("run", "--once").code == 0
        assert [r.path for r in pings.requests] == ["/ping/abc"]
        world.sandbox.fail(500, times=20)  # not retried: fails at once
        assert world.cli("run", "--once").code == 1
        assert len(pings.requests) == 1  # a failed poll does not ping


def test_a_failed_poll_pings_the_fail_url_and_a_refused_ping_is_logged(world: World) -> None:
    """Issue 13.10: healthchecks.io's /fail at once when a poll fails; a ping the service
    refuses is logged with its HTTP status (and never with the URL, which holds the key)."""
    from receivers import WebhookReceiver

    with WebhookReceiver(path="/ping/abc") as pings:
        world.extra = f'[heartbeat]\nurl = "{pings.url}"\nfail_url = "{pings.url}/fail"\n'
        assert world.cli("run", "--once").code == 0
        world.sandbox.fail(500, times=20)
        assert world.cli("run", "--once").code == 1
        assert [r.path for r in pings.requests] == ["/ping/abc", "/ping/abc/fail"]

        world.sandbox.clear_faults()
        pings.fail_next(1, status=404)  # the check was deleted on the service's side
        outcome = world.cli("run", "--once")
        assert outcome.code == 0  # the poll itself was fine
        refused = [json.loads(line) for line in outcome.err.splitlines() if "heartbeat" in line]
        assert [(e["event"], e["ping"], e["status"]) for e in refused] == [
            ("heartbeat.refused", "success", 404)
        ]
        assert "/ping/abc" not in outcome.err


def test_check_config_reports_a_bad_report_schedule(world: World) -> None:
    world.extra = '[[reports]]\nname = "weekly"\nschedule = "0 25 * * mon"\nnotify = ["managers"]\n'
    outcome = world.cli("check-config")
    assert outcome.code == 2
    assert "reports[0].schedule" in outcome.err


def test_resolved_leads_are_forgotten_after_keep_resolved_at_most_hourly(world: World) -> None:
    world.state = 'keep_resolved = "1s"'
    lead = world.add_lead(age=timedelta(days=1), customer="Old News")
    keeper = world.add_lead(age=timedelta(days=1), customer="Still Waiting")
    world.cli("run", "--once")  # prunes (nothing to forget yet)
    world.sandbox.update(lead, substatus="Declined", status="Closed")
    world.cli("run", "--once")
    time.sleep(1.1)  # keep_resolved has passed for the answered lead

    def remaining() -> list[str]:
        return [entry["id"] for entry in world.cli("status", "--json", "--all").json()]

    # the state is pruned at most once an hour: a cycle within the hour still keeps it
    assert world.cli("run", "--once").code == 0
    assert sorted(remaining()) == sorted([lead, keeper])
    # the first cycle an hour later forgets the answered lead, never the waiting one
    later = cli_at(world, datetime.now(UTC) + timedelta(minutes=61), "run", "--once")
    assert later.returncode == 0, later.stderr
    assert remaining() == [keeper]


def test_channels_are_delivered_to_side_by_side(world: World) -> None:
    """Two channels whose servers each answer only once the other has been reached: this
    passes only if the deliveries overlap (sequential sending would break the barrier)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    barrier = threading.Barrier(2, timeout=10)
    arrived: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            arrived.append(self.path)
            try:
                barrier.wait()
                status = 200
            except threading.BrokenBarrierError:
                status = 500
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    servers = [ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        world.channels = {
            name: f"json://127.0.0.1:{server.server_address[1]}/{name}"
            for name, server in zip(("team", "managers"), servers, strict=True)
        }
        world.add_lead(age=timedelta(days=12, hours=6), customer="Both At Once")  # urgent
        outcome = world.cli("run", "--once")
        assert outcome.code == 0, outcome.out
        assert sorted(arrived) == ["/managers", "/team"]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def test_test_notify_sends_a_marked_message_to_each_channel(world: World) -> None:
    sent = world.cli("test-notify")
    assert sent.code == 0, sent.out
    assert "team: delivered" in sent.out and "managers: delivered" in sent.out
    for receiver in (world.team, world.managers):
        assert receiver.bodies[0]["title"].startswith("TEST")

    world.managers.fail_next(1)
    one = world.cli("test-notify", "--channel", "managers")
    assert one.code == 1
    assert "managers: FAILED" in one.out
    assert len(world.team.bodies) == 1  # only the named channel

    unknown = world.cli("test-notify", "--channel", "pager")
    assert unknown.code == 1
    assert "unknown channel(s) pager" in unknown.err


def test_test_notify_checks_urls_as_check_config_and_run_do(world: World) -> None:
    """A URL Apprise cannot use is a config problem (exit 2, naming the key) before anything
    is sent, not a "FAILED" delivery after the other channels got their test message."""
    world.channels = {"pager": "https://example.com/not-an-apprise-url"}
    checked = world.cli("check-config")
    assert checked.code == 2 and "channels.pager.url" in checked.err
    sent = world.cli("test-notify")
    assert sent.code == 2
    assert "channels.pager.url" in sent.err
    assert world.team.bodies == [] and world.managers.bodies == []


def test_explain_says_which_channels_hear_about_leads_at_all(world: World) -> None:
    world.channels = {"ops": world.team.json_url}
    world.extra = '[operations]\nnotify = ["ops"]\n'
    lead = world.add_lead(age=timedelta(days=1))
    assert world.cli("run", "--once").code == 0
    explained = world.cli("status", "--explain", lead[:8])
    assert explained.code == 0, explained.err
    lines = explained.out.splitlines()
    assert (
        "  channel team: hears this lead "
        "(tier new, tier reminder, tier urgent, tier final, resolved notice)"
    ) in lines
    assert "  channel managers: hears this lead (tier urgent, tier final, expired notice)" in lines
    assert (
        "  channel ops: no lead alerts: no tier, on_expired or on_resolved sends here "
        "(only operations alerts)"
    ) in lines


def test_status_table_shows_the_most_urgent_first(world: World) -> None:
    world.add_lead(age=timedelta(days=1), customer="Relaxed Inc", deal_value=1000)
    world.add_lead(age=timedelta(days=13), customer="Hurry Ltd", deal_value=99000)
    assert world.cli("run", "--once").code == 0
    table = world.cli("status").out.splitlines()
    assert table[0].split()[:3] == ["ID", "CUSTOMER", "VALUE"]
    assert table[1].split(maxsplit=1)[1].startswith("Hurry Ltd") and "99,000 USD" in table[1]
    assert table[2].split(maxsplit=1)[1].startswith("Relaxed Inc")
    assert "2 lead(s) waiting for an answer" in "\n".join(table)
    assert "Last poll" in table[-1] and "ok" in table[-1]


def test_status_shows_short_ids_that_every_id_command_accepts(world: World) -> None:
    """The shortest unique prefix, at least 8 characters: two leads sharing their first ten
    characters show eleven; silence, unsilence and --explain take what the table shows."""
    twins = ["0a9d3c1e-5b7f-4c3e-9d2a-1f6e8b4c7a21", "0a9d3c1e-5c00-4000-8000-000000000002"]
    for number, lead_id in enumerate(twins):
        world.add_lead(age=timedelta(days=1 + number), id=lead_id, customer=f"Twin {number}")
    loner = world.add_lead(age=timedelta(days=5), id="f00dcafe-0000-4000-8000-00000000000f")
    assert world.cli("run", "--once").code == 0
    rows = world.cli("status").out.splitlines()[1:4]
    shown = {" ".join(row.split()[1:3]): row.split()[0] for row in rows}
    assert shown == {
        "Twin 0": "0a9d3c1e-5b",
        "Twin 1": "0a9d3c1e-5c",
        "Fabrikam Customer": "f00dcafe",
    }
    assert loner.startswith(shown["Fabrikam Customer"])

    for customer in ("Twin 0", "Fabrikam Customer"):
        short = shown[customer]
        explained = world.cli("status", "--explain", short)
        assert explained.code == 0, explained.err
        assert explained.out.startswith(customer)
    silenced = world.cli("silence", shown["Twin 1"], "--for", "1d")
    assert silenced.code == 0, silenced.err
    assert twins[1] in silenced.out
    assert world.cli("unsilence", shown["Twin 1"]).code == 0

    ambiguous = world.cli("silence", "0a9d3c1e", "--for", "1d")
    assert ambiguous.code == 1 and "matches 2 leads" in ambiguous.err
    unknown = world.cli("unsilence", "deadbeef")
    assert unknown.code == 1
    assert "`referral-watch status --all` shows every lead's id" in unknown.err
    # ... and --all really does show ids, resolved leads included
    world.sandbox.update(loner, status="Closed", substatus="Declined")
    assert world.cli("run", "--once").code == 0
    everything = world.cli("status", "--all").out
    assert "f00dcafe" in everything and "declined" in everything


def test_status_before_the_first_poll_says_what_to_run(world: World) -> None:
    table = world.cli("status")
    assert table.code == 0
    assert "No poll yet: run `referral-watch run --once`." in table.out
    assert world.cli("status", "--json").json() == []
    assert not world.state_path.exists()  # looking does not create the state file
