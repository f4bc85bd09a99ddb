"""The real daemon as a subprocess against the sandbox and local receivers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from conftest import NotifySocket, World, free_port, wait_until
from receivers import WebhookReceiver

pytestmark = pytest.mark.slow


def fast(world: World, **server: str) -> None:
    world.extra = '[schedule]\ninterval = "1s"\njitter = "0s"\n'
    if server:
        world.extra += f'[server]\nlisten = "{server["listen"]}"\n'


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_daemon_alerts_new_leads_each_cycle_and_stops_on_sigterm(world: World) -> None:
    fast(world)
    world.add_lead(age=timedelta(hours=1), customer="First Inc")
    with world.daemon() as process:
        world.team.wait_for(1, timeout=15)
        world.add_lead(age=timedelta(hours=1), customer="Second Inc")
        world.team.wait_for(2, timeout=15)
        assert "Second Inc" in world.team.bodies[1]["title"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    assert len(world.team.bodies) == 2


def test_a_second_instance_exits_3(world: World) -> None:
    fast(world)
    with world.daemon() as first:
        first.wait_for_log("daemon.started")  # it holds the state lock
        second = subprocess.run(
            [sys.executable, "-m", "referral_watch", "--config", str(world.config_path), "run"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 3
        assert "another referral-watch process" in second.stderr
        assert "Traceback" not in second.stderr
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=10) == 0


def test_healthz_and_metrics_answer(world: World) -> None:
    port = free_port()
    fast(world, listen=f"127.0.0.1:{port}")
    world.add_lead(age=timedelta(days=13), customer="Metric Co")
    with world.daemon() as process:
        world.team.wait_for(1)
        wait_until(lambda: get(f"http://127.0.0.1:{port}/healthz")[0] == 200, what="/healthz 200")
        status, body = get(f"http://127.0.0.1:{port}/healthz")
        assert json.loads(body)["status"] == "ok"
        status, body = get(f"http://127.0.0.1:{port}/metrics")
        text = body.decode()
        assert status == 200
        assert 'referral_watch_polls_total{result="ok"}' in text
        assert "referral_watch_watched_leads 1.0" in text
        assert 'referral_watch_deliveries_total{channel="team",result="ok"}' in text
        urgent = next(
            line
            for line in text.splitlines()
            if line.startswith("referral_watch_most_urgent_remaining_seconds ")
        )
        assert 0 < float(urgent.split()[1]) <= 86400
        names = [
            line.split("{")[0].split()[0]
            for line in text.splitlines()
            if line and not line.startswith("#")
        ]
        assert all(name.startswith("referral_watch_") for name in names)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    check = world.cli("status", "--check")
    assert check.code == 0


def test_status_check_fails_when_no_poll_succeeded(world: World) -> None:
    world.sandbox.token = "another-token"
    world.cli("run", "--once")
    outcome = world.cli("status", "--check")
    assert outcome.code == 1
    assert "never" in outcome.err


def test_kill_9_and_restart_neither_loses_nor_repeats(world: World) -> None:
    fast(world)
    world.add_lead(age=timedelta(hours=1), customer="Before Kill")
    with world.daemon() as process:
        world.team.wait_for(1)
        # Kill once the delivery is recorded: a kill in the instant between the channel's
        # answer and that record repeats that one message, which the contract allows.
        wait_until(
            lambda: world.cli("status", "--json").json()[0]["tiers_sent"] == ["new"],
            what="the delivery to be recorded",
        )
        process.kill()  # SIGKILL: no chance to clean up
        process.wait(timeout=10)
    world.add_lead(age=timedelta(hours=1), customer="While Down")
    with world.daemon() as process:
        world.team.wait_for(2)
        cycles = len(process.events("cycle.done"))
        process.wait_for_log("cycle.done", cycles + 2)  # a couple more cycles: nothing repeats
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    assert sorted(body["title"].split(": ")[-1] for body in world.team.bodies) == [
        "Before Kill",
        "While Down",
    ]


def test_a_wrong_token_gives_one_ops_alert_and_one_recovery(world: World) -> None:
    fast(world)
    with WebhookReceiver() as ops:
        world.channels = {"ops": ops.json_url}
        world.extra += '[operations]\nnotify = ["ops"]\nafter_failures = 2\nrepeat = "1h"\n'
        world.sandbox.token = "the-right-one-is-elsewhere"
        with world.daemon() as process:
            ops.wait_for(1, timeout=20)
            failures_seen = len([r for r in world.sandbox.requests if r.path.endswith("referrals")])
            wait_until(
                lambda: (
                    len([r for r in world.sandbox.requests if r.path.endswith("referrals")])
                    >= failures_seen + 3
                ),
                what="more failing polls",
            )
            assert len(ops.bodies) == 1
            assert "401" in ops.bodies[0]["message"] or "401" in ops.bodies[0]["title"]
            world.sandbox.token = "sandbox-token"
            ops.wait_for(2, timeout=20)
            cycles = len(process.events("cycle.done"))
            process.wait_for_log("cycle.done", cycles + 3)  # good cycles: no more ops messages
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
        assert len(ops.bodies) == 2
        assert "works again" in ops.bodies[1]["title"]


def test_sighup_reloads_the_config_and_keeps_the_old_one_when_the_new_is_bad(
    world: World,
) -> None:
    fast(world)
    with WebhookReceiver() as extra, world.daemon() as process:
        world.add_lead(age=timedelta(hours=1), customer="Before Reload")
        world.team.wait_for(1)
        # a new channel for the "new" tier, picked up on SIGHUP without a restart
        world.channels = {"extra": extra.json_url}
        world.tiers = world.tiers.replace('notify = ["team"]', 'notify = ["team", "extra"]', 1)
        world.write_config()
        process.send_signal(signal.SIGHUP)
        process.wait_for_log("config.reloaded")
        world.add_lead(age=timedelta(hours=1), customer="After Reload")
        extra.wait_for(2)  # the new channel hears about both waiting leads
        assert sorted(b["title"].rsplit(": ", 1)[-1] for b in extra.bodies) == [
            "After Reload",
            "Before Reload",
        ]

        world.config_path.write_text("[policy\nbroken = ")
        process.send_signal(signal.SIGHUP)
        process.wait_for_log("config.reload_failed")
        world.add_lead(age=timedelta(hours=1), customer="After Bad Reload")
        extra.wait_for(3)  # still running, with the last good config
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        _, err = process.communicate(timeout=5)
    assert "config.reload_failed" in err
    assert "config.reloaded" in err


def test_a_cycle_that_crashes_is_logged_and_the_next_one_runs(world: World) -> None:
    """The loop survives a bug in one cycle (in-process: the scheduler's job function)."""
    from referral_watch.config.loader import load_config
    from referral_watch.daemon import Daemon
    from referral_watch.notify import Notifier
    from referral_watch.partner_center.auth import EnvTokenProvider
    from referral_watch.partner_center.client import PartnerCenter

    world.add_lead(age=timedelta(hours=1), customer="Survivor Ltd")
    config = load_config(world.write_config())
    calls = {"n": 0}

    def flaky_api(cfg: object) -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug while building the client")
        tokens = EnvTokenProvider("T", environ={"T": "sandbox-token"})
        return PartnerCenter(config.partner_center, tokens)

    daemon = Daemon(config, api_factory=flaky_api, sender_factory=lambda c: Notifier(c.channels))
    assert daemon.cycle() is None  # crashed, logged, not raised
    result = daemon.cycle()
    daemon.close()
    assert result is not None and result.ok
    assert "Survivor Ltd" in world.team.bodies[0]["title"]
    metrics = daemon.metrics.render().decode()
    assert 'referral_watch_polls_total{result="error"} 1.0' in metrics
    assert 'referral_watch_polls_total{result="ok"} 1.0' in metrics


def urgent_metric(metrics: bytes) -> float:
    line = next(
        line
        for line in metrics.decode().splitlines()
        if line.startswith("referral_watch_most_urgent_remaining_seconds ")
    )
    return float(line.split()[1])


def test_most_urgent_remaining_is_infinite_while_no_lead_waits(world: World) -> None:
    """Issue 13.3: not 0 before the first lead (the README's `< 6 * 3600` rule would fire),
    not the last lead's value forever once every lead is answered."""
    from referral_watch.config.loader import load_config
    from referral_watch.daemon import Daemon

    daemon = Daemon(load_config(world.write_config()))
    assert urgent_metric(daemon.metrics.render()) == float("inf")  # before any cycle
    assert daemon.cycle() is not None
    assert urgent_metric(daemon.metrics.render()) == float("inf")  # polled: nothing waits
    lead = world.add_lead(age=timedelta(days=13), customer="Urgent Co")
    daemon.cycle()
    assert 0 < urgent_metric(daemon.metrics.render()) <= 86400
    world.sandbox.update(lead, substatus="Accepted", status="Active")
    daemon.cycle()
    daemon.close()
    assert urgent_metric(daemon.metrics.render()) == float("inf")  # answered: nothing waits


def test_sigterm_during_a_slow_poll_ends_the_daemon_at_once(world: World) -> None:
    """Issue 20.6: Partner Center hangs mid-poll (each attempt until the read timeout, then
    retried: half a minute and more). SIGTERM must not wait for that: systemd would wait, then
    kill. The poll is left behind, which loses nothing (it never committed)."""
    fast(world)
    world.add_lead(age=timedelta(hours=1), customer="Still Here")
    world.sandbox.fail(503, hang=True, times=1000)
    with world.daemon() as process:
        process.wait_for_log("daemon.started")
        wait_until(
            lambda: any(r.path.endswith("/referrals") for r in world.sandbox.requests),
            what="the poll to be under way",
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0  # not after the poll's half minute
        _, err = process.communicate(timeout=5)
    assert "daemon.stopping" in err and "left_behind" in err
    world.sandbox.clear_faults()
    assert world.cli("run", "--once").code == 0  # the state is whole: the lead is announced
    assert [b["title"].rsplit(": ", 1)[-1] for b in world.team.bodies] == ["Still Here"]


def test_the_watchdog_vouches_only_for_work_that_moves(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watchdog job pings while nothing runs and while the work makes progress (a page,
    a send), and holds back once the work has been stuck longer than its limit."""
    from referral_watch.config.loader import load_config
    from referral_watch.daemon import Daemon

    notify = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    daemon = Daemon(load_config(world.write_config()))
    daemon.progress.stuck_after = 0.3

    class Api:
        def pages(self) -> Iterator[str]:
            yield from ("page 1", "page 2")

    api = daemon.progress.watched(Api())
    try:
        daemon.watchdog()  # idle: the scheduler loop runs this job, so all is well
        notify.wait_for("WATCHDOG=1")
        with daemon.progress.working():
            daemon.watchdog()  # just started
            assert notify.count("WATCHDOG=1") == 2
            wait_until(lambda: daemon.progress.stuck_for() is not None, what="a stuck cycle")
            daemon.watchdog()
            daemon.watchdog()
            assert notify.count("WATCHDOG=1") == 2  # held back while stuck
            assert list(api.pages()) == ["page 1", "page 2"]  # a page arrives: progress again
            daemon.watchdog()
            assert notify.count("WATCHDOG=1") == 3
    finally:
        notify.close()


def test_a_stop_waits_for_a_send_in_flight_but_not_for_a_poll() -> None:
    import threading

    from referral_watch.watchdog import Progress

    progress = Progress(stuck_after=60)
    release = threading.Event()

    class SlowChannel:
        def send(self, channel: str, message: str) -> str:
            release.wait(10)
            return f"{message} to {channel}"

    sender = progress.watched(SlowChannel(), sends=True)
    results: list[str] = []

    def deliver() -> None:
        with progress.working():
            results.append(sender.send("team", "hello"))

    worker = threading.Thread(target=deliver)
    worker.start()
    wait_until(lambda: progress.sending, what="the send to begin")
    threading.Timer(0.5, release.set).start()  # the channel answers after the grace time
    assert progress.wait_idle(grace=0.1, send_cap=10) is True  # waited for the send
    worker.join(5)
    assert results == ["hello to team"]

    stuck = threading.Event()

    def poll() -> None:
        with progress.working():
            stuck.wait(10)

    poller = threading.Thread(target=poll)
    poller.start()
    wait_until(lambda: progress.lock.locked(), what="the poll to begin")
    assert progress.wait_idle(grace=0.1, send_cap=10) is False  # a poll is left behind
    stuck.set()
    poller.join(5)


def test_a_wedged_cycle_stops_the_watchdog_pings_until_it_moves_again(
    world: World, tmp_path: Path
) -> None:
    """Issue 20.6, the real daemon under a stand-in for systemd: the cycle hangs on a step no
    poll deadline covers (the dead-man's switch answers only after 12 s). Past twice
    poll_timeout without progress the WATCHDOG=1 pings stop (systemd would restart the
    service); they resume when the cycle moves again."""
    fast(world)
    world.partner_center = 'poll_timeout = "2s"'  # wedged after 4 s without progress
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}  # a ping every 0.5 s
    with WebhookReceiver(path="/ping", delay=12) as pings:
        world.extra += f'[heartbeat]\nurl = "{pings.url}"\ntimeout = "1m"\n'
        try:
            with world.daemon(env=env) as process:
                notify.wait_for("READY=1")
                process.wait_for_log("watchdog.withheld")
                before = notify.count("WATCHDOG=1")
                assert before >= 1  # it pinged while the work moved
                process.wait_for_log("watchdog.withheld", 3)  # the job ran twice more...
                assert notify.count("WATCHDOG=1") == before  # ...and did not ping
                assert pings.requests == []  # and the cycle is still stuck
                pings.wait_for(1, timeout=20)  # the switch answers: the cycle ends
                wait_until(lambda: notify.count("WATCHDOG=1") > before, what="pings again")
                process.send_signal(signal.SIGTERM)
                assert process.wait(timeout=10) == 0
        finally:
            notify.close()
