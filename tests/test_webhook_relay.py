"""The relay (webhooks.forward_to): every verified event passed on byte for byte with its
signature headers, from a queue in the state (SQLite and PostgreSQL) that survives a restart;
a forged event never. The end-to-end test runs the real daemon against the sandbox."""

from __future__ import annotations

import json
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from referral_watch.partner_center.webhooks.relay import target_label
from referral_watch.sandbox.certificates import GOOD
from referral_watch.state.relay_queue import RELAY_FOR, RelayQueue, backoff
from referral_watch.state.store import Store

from conftest import World, free_port, wait_until
from receivers import WebhookReceiver

NOW = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
TARGETS = ["https://crm.example.com/hook?code=secret", "https://billing.example.com/in"]
HEADERS = {"Authorization": "Signature abc=", "Content-Type": "application/json"}


# --- the queue ------------------------------------------------------------------------------


def test_an_event_is_queued_once_per_target_and_claimed_once(state_location: Path | str) -> None:
    body = b'{"EventName":"invoice-ready"}\x00\xff'  # any bytes come back as they went in
    with Store(state_location) as store:
        queue = RelayQueue(store)
        assert queue.add("k1", "invoice-ready", body, HEADERS, TARGETS, NOW) == 2
        assert queue.add("k1", "invoice-ready", body, HEADERS, TARGETS, NOW) == 0  # again
        items = queue.claim_due(NOW, TARGETS)
        assert [i.target for i in items] == TARGETS
        assert all(i.body == body and i.headers == HEADERS for i in items)
        assert queue.claim_due(NOW, TARGETS) == []  # claimed: not handed out twice
        with Store(state_location) as other:  # another replica that believes it is active
            assert RelayQueue(other).claim_due(NOW, TARGETS) == []
        queue.relayed(items[0], NOW)
        assert queue.failed(items[1], "answered 503", NOW) is False
        assert queue.claim_due(NOW, TARGETS) == []  # the retry is not due yet
        retry = NOW + timedelta(seconds=backoff(1))
        assert [i.attempts for i in queue.claim_due(retry, TARGETS)] == [1]
        summary = queue.summary(TARGETS)
        assert list(summary) == [TARGETS[1]]
        assert summary[TARGETS[1]] == (1, NOW, NOW)
        # a URL taken out of forward_to: its rows are dropped, not left waiting for ever
        assert queue.drop_other_targets(TARGETS[:1], NOW) == 1
        assert queue.summary(TARGETS) == {}


def test_a_row_failing_for_a_day_is_dropped(state_location: Path | str) -> None:
    with Store(state_location) as store:
        queue = RelayQueue(store)
        queue.add("k1", "referral-created", b"{}", HEADERS, TARGETS[:1], NOW)
        (item,) = queue.claim_due(NOW, TARGETS)
        assert queue.failed(item, "answered 500", NOW + RELAY_FOR) is True
        assert queue.summary(TARGETS) == {}
        assert queue.claim_due(NOW + 2 * RELAY_FOR, TARGETS) == []


def test_retries_start_within_seconds_and_back_off() -> None:
    assert [backoff(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert backoff(40) == 600


def test_a_target_shows_without_its_secrets() -> None:
    assert target_label("https://u:p@crm.example.com:8443/hook?code=s#x") == (
        "https://crm.example.com:8443/hook"
    )


# --- the real daemon ----------------------------------------------------------------------


def test_every_verified_event_reaches_a_flaky_target_once_byte_for_byte(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A downstream receiver that fails the first attempts and is down across a daemon
    restart still gets every verified event once (a referral's and a billing one), with the
    body bytes and signature headers Partner Center sent; a forged event never."""
    side = world.sandbox.webhooks
    tls = tmp_path / "tls-roots.pem"
    tls.write_bytes(side.tls_roots_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls))
    port = free_port()
    downstream = WebhookReceiver("/partner-center", port=free_port())
    downstream.start()
    world.extra = f"""
[schedule]
interval = "1h"
jitter = "0s"

[server]
listen = "127.0.0.1:{port}"

[webhooks]
certificate_hosts = ["{side.certificate_host}"]
issuer_hosts = ["{side.issuer_host}"]
forward_to = ["{downstream.url}?code=s3cret"]
"""
    side.register(
        f"http://127.0.0.1:{port}/webhooks/partner-center",
        ["referral-created", "referral-updated", "invoice-ready"],
    )
    try:
        with world.daemon() as daemon:
            daemon.wait_for_log("daemon.started")
            wait_until(lambda: _listening(port), what="the daemon's web server")
            downstream.fail_next(2, status=503)
            first = world.add_lead(age=timedelta(minutes=1), customer="Relayed First")
            wait_until(lambda: len(_ok(downstream)) == 1, timeout=60, what="the first relay")
            assert len(downstream.requests) == 3  # 503, 503, then 200: retried within seconds

            downstream.stop()  # the target goes down, and stays down across the restart
            second = world.add_lead(age=timedelta(minutes=1), customer="Relayed Second")
            side.changed("invoice-ready", ["G012345678"])
            assert side.wait_idle()  # so the fault hits the next event only
            side.fault("bad_signature")
            world.add_lead(age=timedelta(minutes=1), customer="Forged Event Co")
            assert side.wait_idle()
            wait_until(lambda: len(daemon.events("relay.failed")) >= 4, timeout=30, what="retries")
            daemon.process.send_signal(signal.SIGTERM)  # a restart, the events still queued
            assert daemon.process.wait(timeout=30) == 0
        with world.daemon() as again:
            again.wait_for_log("daemon.started")
            downstream.start()
            wait_until(lambda: len(_ok(downstream)) == 3, timeout=90, what="the queued relays")
            wait_until(lambda: not _waiting(port), timeout=30, what="an empty queue")
            assert again.poll() is None
    finally:
        downstream.stop()

    delivered = {d.body: d for d in side.deliveries if d.status == 200}
    forged = [d.body for d in side.deliveries if d.fault == "bad_signature"]
    received = _ok(downstream)
    assert sorted(r.body for r in received) == sorted(delivered)  # each verified event once
    assert not any(r.body in forged for r in downstream.requests)
    names = [json.loads(r.body)["EventName"] for r in received]
    assert sorted(names) == ["invoice-ready", "referral-created", "referral-created"]
    ids = [json.loads(r.body)["ResourceUri"].rsplit("/", 1)[1] for r in received]
    assert first in ids and second in ids
    for request in received:
        assert request.path == "/partner-center?code=s3cret"
        assert request.headers["authorization"] == (
            f"Signature {side.certificates.sign(request.body, GOOD)}"
        )
        assert request.headers["x-ms-certificate-url"] == side.certificates.url(GOOD)
        assert request.headers["x-ms-signature-algorithm"] == "rsa-sha256"
        assert request.headers["content-type"] == "application/json; charset=utf-8"


def _ok(downstream: WebhookReceiver) -> list:  # type: ignore[type-arg]
    """The requests the downstream answered 200 (the first two got 503)."""
    failed = 2
    return downstream.requests[failed:] if len(downstream.requests) > failed else []


def _listening(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2):
            return True
    except OSError:
        return False


def _waiting(port: int) -> bool:
    """Whether /metrics shows an event waiting to be relayed."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return any(
        line.startswith("referral_watch_relay_waiting{") and not line.endswith(" 0.0")
        for line in text.splitlines()
    )


def test_a_relay_that_keeps_failing_shows_in_healthz_and_is_dropped_after_a_day(
    world: World,
) -> None:
    """A target refusing for two intervals makes the daemon unhealthy, as stuck deliveries
    do, naming the relay; after a day the event is dropped and operations hear it."""
    from referral_watch.config.loader import load_config
    from referral_watch.daemon import Daemon

    dead = f"http://127.0.0.1:{free_port()}/nobody-listens"
    world.extra = (
        '[operations]\nnotify = ["managers"]\n'
        '[server]\nlisten = "127.0.0.1:0"\n[webhooks]\n'
        f'certificate_hosts = ["127.0.0.1"]\nforward_to = ["{dead}"]\n'
    )
    moment = [datetime.now(UTC)]
    daemon = Daemon(load_config(world.write_config()), clock=lambda: moment[0])
    daemon._start_webhooks()
    try:
        with Store(daemon.config.state.location) as store:
            RelayQueue(store).add("k", "referral-created", b"{}", HEADERS, [dead], moment[0])
        daemon.relay.wake()
        wait_until(lambda: daemon.relay.stuck_since is not None, what="a failed relay")
        daemon.last_success = moment[0]
        assert daemon.health()[0] is True  # failing for less than two intervals
        moment[0] += 2 * daemon.config.schedule.interval
        daemon.last_success = moment[0]  # polls are fine
        ok, body = daemon.health()
        assert not ok
        assert body["status"] == "stuck"
        assert body["reason"].startswith("webhook relay stuck since")
        assert body["relay_stuck_since"] is not None

        moment[0] += RELAY_FOR
        daemon.relay.wake()
        (told,) = world.managers.wait_for(1, timeout=20)
        assert "dropped" in told.json["title"]
        assert "could not be relayed to http://127.0.0.1:" in told.json["message"]
        wait_until(lambda: daemon.relay.stuck_since is None, what="the queue emptied")
    finally:
        daemon.stop.set()
        daemon.relay.join()
        daemon.webhook_worker.stop()
