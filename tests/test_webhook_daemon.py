"""The daemon's side of webhooks, in process: the worker's batching, the lead cycle (fetch by id,
store, decide, deliver) against the sandbox, and the whole path through the web app."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from referral_watch import policy
from referral_watch.config.loader import load_config
from referral_watch.daemon import Daemon
from referral_watch.partner_center.webhooks.worker import WebhookWorker
from referral_watch.sandbox.certificates import GOOD
from referral_watch.sandbox.records import make_referral
from referral_watch.sandbox.webhooks import _event_body
from referral_watch.state.store import Store
from referral_watch.state.webhook_events import WebhookEvent
from referral_watch.web.app import build_app

from conftest import LOCAL, World, wait_until

# --- the worker's batching ----------------------------------------------------------------


class Queue:
    """What the worker sees of the state file: the lead ids waiting."""

    def __init__(self) -> None:
        self.waiting: list[str] = []
        self.batches: list[list[str]] = []
        self.lock = threading.Lock()

    def pending(self) -> list[str]:
        with self.lock:
            return list(self.waiting)

    def handle(self, ids: Sequence[str]) -> None:
        with self.lock:
            self.batches.append(list(ids))
            self.waiting = [i for i in self.waiting if i not in ids]

    def arrive(self, worker: WebhookWorker, lead_id: str) -> None:
        with self.lock:
            self.waiting.append(lead_id)
        worker.wake()


def test_a_lone_event_is_handled_at_once_and_a_burst_in_one_batch() -> None:
    queue, stop = Queue(), threading.Event()
    worker = WebhookWorker(queue.handle, queue.pending, digest_over=5, stop=stop)
    worker.start()
    try:
        queue.arrive(worker, "lone")
        wait_until(lambda: queue.batches == [["lone"]], what="the lone lead's batch")
        for n in range(60):  # a burst, faster than QUIET apart
            queue.arrive(worker, f"burst-{n}")
            time.sleep(0.005)
        wait_until(lambda: not queue.pending(), timeout=20, what="the burst handled")
        assert queue.batches[1:] == [[f"burst-{n}" for n in range(60)]]
    finally:
        stop.set()
        worker.stop()


def test_leads_trickling_in_are_sent_one_by_one_only_up_to_digest_over() -> None:
    """Events a little apart (past QUIET each): the first few are handled one by one, then
    the rest of the run waits for a pause and comes as one batch."""
    queue, stop = Queue(), threading.Event()
    worker = WebhookWorker(queue.handle, queue.pending, digest_over=2, stop=stop)
    worker.start()
    try:
        for n in range(6):
            queue.arrive(worker, f"lead-{n}")
            if n < 2:  # the first two go out one by one, each as soon as it came
                wait_until(lambda: not queue.pending(), what=f"lead-{n} handled alone")
            else:
                time.sleep(0.3)  # the next one comes a little later (longer than QUIET)
        wait_until(lambda: not queue.pending(), timeout=20, what="every lead handled")
        assert queue.batches[:2] == [["lead-0"], ["lead-1"]]
        assert sum(len(batch) for batch in queue.batches) == 6
        assert len(queue.batches) <= 4
    finally:
        stop.set()
        worker.stop()


# --- the lead cycle ------------------------------------------------------------------------


def daemon_for(world: World, extra: str = "") -> Daemon:
    world.extra = (
        '[server]\nlisten = "127.0.0.1:0"\n[webhooks]\ncertificate_hosts = ["127.0.0.1"]\n'
    )
    world.extra += extra
    return Daemon(load_config(world.write_config()))


def remember(world: World, *lead_ids: str) -> None:
    with Store(world.state_path) as store:
        for lead_id in lead_ids:
            store.add_webhook_event(
                WebhookEvent(f"key-{lead_id}", "referral-updated", lead_id, None),
                datetime.now(UTC),
            )


def test_the_lead_cycle_stores_new_resolves_answered_and_skips_what_the_filter_excludes(
    world: World,
) -> None:
    now = datetime.now(UTC)
    answered = make_referral(customer="Answered Co", created=now - timedelta(days=2))
    vanished = make_referral(customer="Vanished Co", created=now - timedelta(days=2))
    world.sandbox.add(answered, vanished)
    assert world.cli("run", "--once").code == 0
    assert len(world.team.wait_for(2)) == 2

    fresh = make_referral(customer="Fresh Lead", created=now - timedelta(minutes=3))
    outgoing = make_referral(customer="Our Own Referral", created=now, direction="Outgoing")
    world.sandbox.add(fresh, outgoing)
    world.sandbox.update(answered["id"], substatus="Accepted", status="Active")
    world.sandbox.remove(vanished["id"])
    ids = [fresh["id"], outgoing["id"], answered["id"], vanished["id"]]
    remember(world, *ids)

    daemon = daemon_for(world)
    result = daemon.handle_webhook_leads(ids)
    daemon.close()
    assert result is not None
    assert (result.new, result.resolved, result.fetched) == (1, 2, 3)
    titles = [request.json["title"] for request in world.team.wait_for(4)]
    assert any("Fresh Lead" in title for title in titles[2:])
    assert any("Answered Co" in title for title in titles[2:])  # on_resolved = ["team"]
    with Store(world.state_path) as store:
        assert not store.known(outgoing["id"])
        assert store.pending_webhook_leads() == []
    shown = world.cli("status", "--all", "--json").json()
    resolution = {lead["id"]: lead.get("resolution") for lead in shown}
    assert resolution[answered["id"]] == "accepted"
    assert resolution[vanished["id"]] == "gone"


def test_a_lead_that_cannot_be_fetched_is_left_to_the_poll(world: World) -> None:
    lead = make_referral(customer="Unlucky Co", created=datetime.now(UTC))
    world.sandbox.add(lead)
    world.sandbox.fail(500, on="item", times=10)
    remember(world, lead["id"])
    daemon = daemon_for(world)
    daemon.api_factory = _without_retry_waits(daemon.api_factory)
    result = daemon.handle_webhook_leads([lead["id"]])
    daemon.close()
    assert result is not None
    assert result.lookup_failures == 1
    assert world.team.bodies == []
    with Store(world.state_path) as store:
        assert store.pending_webhook_leads() == []  # not retried by itself: polling is
        assert not store.known(lead["id"])


def _without_retry_waits(factory: Callable[..., object]) -> Callable[..., object]:
    from referral_watch.partner_center.auth import token_provider
    from referral_watch.partner_center.client import PartnerCenter

    def build(config: object) -> object:
        return PartnerCenter(
            config.partner_center,  # type: ignore[attr-defined]
            token_provider(config),  # type: ignore[arg-type]
            max_retries=0,  # retries are stamina's, tested in test_partner_center
        )

    return build


# --- the whole path in process ---------------------------------------------------------------


def test_a_signed_event_through_the_web_app_alerts_and_shows_in_healthz(
    world: World, webhook_daemon: tuple[Daemon, TestClient]
) -> None:
    _, client = webhook_daemon
    lead = make_referral(customer="Via The App", created=datetime.now(UTC))
    world.sandbox.add(lead)
    body, headers = signed_event(world, "referral-created", lead["id"])
    assert client.post("/webhooks/partner-center", content=body, headers=headers).status_code == 200
    assert "Via The App" in world.team.wait_for(1)[0].json["title"]
    health = client.get("/healthz").json()
    assert health["last_webhook_event"] is not None
    metrics = client.get("/metrics").text
    assert (
        'referral_watch_webhook_events_total{event="referral-created",result="ok"} 1.0' in metrics
    )


def signed_event(world: World, event: str, lead_id: str) -> tuple[bytes, dict[str, str]]:
    """A referral event as Partner Center signs it (the sandbox's Microsoft certificates)."""
    side = world.sandbox.webhooks
    body = _event_body(event, lead_id, None)
    return body, {
        "Authorization": f"Signature {side.certificates.sign(body, GOOD)}",
        "X-MS-Certificate-Url": side.certificates.url(GOOD),
        "X-MS-Signature-Algorithm": "rsa-sha256",
    }


@pytest.fixture
def webhook_daemon(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Daemon, TestClient]]:
    """A daemon whose webhook endpoint trusts the sandbox's signing certificates, its worker
    running, and a client of its web app."""
    side = world.sandbox.webhooks
    tls = tmp_path / "tls.pem"
    tls.write_bytes(side.tls_roots_pem)
    roots = tmp_path / "roots.pem"
    roots.write_bytes(side.trust_roots_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls))
    daemon = daemon_for(world, f'trust_roots = "{roots}"\nissuer_hosts = ["{side.issuer_host}"]\n')
    daemon._start_webhooks()
    try:
        yield daemon, TestClient(build_app(daemon, routes=daemon.web_routes()), base_url=LOCAL)
    finally:
        daemon.stop.set()
        daemon.webhook_worker.stop()
        daemon.close()


def handled(world: World) -> bool:
    with Store(world.state_path) as store:
        return store.pending_webhook_leads() == [] and store.last_webhook_event() is not None


def test_a_signed_update_whose_record_has_substatus_none_keeps_the_lead_watched(
    world: World, webhook_daemon: tuple[Daemon, TestClient]
) -> None:
    """Issue 26: "None" is no answer on the webhook path too (as on the poll's by-id lookup,
    issue 13): the lead stays watched instead of being resolved as answered "none"."""
    _, client = webhook_daemon
    lead = world.add_lead(age=timedelta(hours=2), customer="Unclear Inc")
    assert world.cli("run", "--once").code == 0
    assert len(world.team.wait_for(1)) == 1
    world.sandbox.update(lead, substatus="None")
    body, headers = signed_event(world, "referral-updated", lead)
    response = client.post("/webhooks/partner-center", content=body, headers=headers)
    assert response.status_code == 200
    wait_until(lambda: handled(world), what="the event handled")
    (shown,) = world.cli("status", "--json", "--all").json()
    assert shown["resolution"] is None  # still watched: "None" is no answer
    assert len(world.team.bodies) == 1  # and no "resolved" notice went out


def test_a_lead_the_policy_fails_on_in_a_webhook_batch_is_set_aside_alone(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 26: the webhook path decides lead by lead when a batch fails, as the poll does:
    the lead the policy cannot decide for is set aside, the others are alerted."""
    now = datetime.now(UTC)
    good = make_referral(customer="Good Co", created=now - timedelta(minutes=5))
    poison = make_referral(customer="Poison Co", created=now - timedelta(minutes=5))
    world.sandbox.add(good, poison)
    remember(world, good["id"], poison["id"])
    real = policy.due_alerts

    def fails_on_poison(leads: Sequence[Any], *args: Any, **kwargs: Any) -> Any:
        if any(lead.id == poison["id"] for lead in leads):
            raise ValueError("a lead the policy cannot decide for")
        return real(leads, *args, **kwargs)

    monkeypatch.setattr(policy, "due_alerts", fails_on_poison)
    daemon = daemon_for(world)
    result = daemon.handle_webhook_leads([good["id"], poison["id"]])
    daemon.close()
    assert result is not None
    assert result.quarantined == 1
    titles = [request.json["title"] for request in world.team.wait_for(1)]
    assert any("Good Co" in title for title in titles)
    assert not any("Poison Co" in body["title"] for body in world.team.bodies)
    shown = world.cli("status", "--json").json()
    assert {lead["customer"] for lead in shown} >= {"Good Co"}
    with Store(world.state_path) as store:
        (aside,) = store.quarantined()
    assert (aside.lead_id, aside.stage) == (poison["id"], "decide")
