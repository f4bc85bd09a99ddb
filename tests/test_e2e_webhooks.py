"""Webhooks end to end: the real daemon (`referral-watch run`, a subprocess, polling only hourly)
receives the sandbox's signed events over real HTTP and alerts within seconds."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from referral_watch.sandbox.certificates import GOOD, ISSUER_PATH
from referral_watch.sandbox.records import make_referral
from referral_watch.sandbox.wire import ITEM_PREFIX

from conftest import World, free_port, wait_until

pytestmark = pytest.mark.slow

PATH = "/webhooks/partner-center"


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except urllib.error.URLError:
        return 0, b""  # not listening (yet)


class Hooked:
    """A World whose daemon listens for webhooks, and whose sandbox is registered to send them."""

    def __init__(
        self,
        world: World,
        tmp: Path,
        monkeypatch: pytest.MonkeyPatch,
        *,
        system_trust: bool = False,
        ms_header: bool = False,
    ) -> None:
        self.world = world
        self.port = free_port()
        side = world.sandbox.webhooks
        tls = tmp / "tls-roots.pem"
        tls.write_bytes(side.tls_roots_pem)
        roots = tmp / "signing-roots.pem"
        roots.write_bytes(side.trust_roots_pem)
        monkeypatch.setenv("SSL_CERT_FILE", str(tls))  # the daemon downloads over that TLS
        # system_trust: no trust_roots, so the system store decides, and SSL_CERT_FILE holds
        # only the root: the issuing CA must come from the certificate's AIA URL.
        trust = "" if system_trust else f'trust_roots = "{roots}"'
        world.extra = f"""
[schedule]
interval = "1h"
jitter = "0s"

[server]
listen = "127.0.0.1:{self.port}"
public_url = "http://127.0.0.1:{self.port}"

[webhooks]
path = "{PATH}"
certificate_hosts = ["{side.certificate_host}"]
issuer_hosts = ["{side.issuer_host}"]
{trust}
"""
        side.register(f"http://127.0.0.1:{self.port}{PATH}", ms_header=ms_header)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthz(self) -> dict[str, Any]:
        status, body = get(f"{self.base}/healthz")
        assert status == 200, body
        return dict(json.loads(body))

    def metric(self, line_start: str) -> float:
        _, body = get(f"{self.base}/metrics")
        for line in body.decode().splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def lookups(self, lead_id: str) -> int:
        """How often the daemon fetched this referral by id."""
        path = f"{ITEM_PREFIX}{lead_id}"
        return sum(r.method == "GET" and r.path == path for r in self.world.sandbox.requests)

    def started(self) -> None:
        """Wait for the first poll (there is no other for an hour)."""
        wait_until(lambda: get(f"{self.base}/healthz")[0] == 200, what="the first poll")

    def statuses(self, lead_id: str) -> list[int | None]:
        return [d.status for d in self.world.sandbox.webhooks.deliveries if d.lead_id == lead_id]

    def new_lead(self, customer: str) -> str:
        return self.world.add_lead(age=timedelta(minutes=5), customer=customer)


@pytest.fixture
def hooked(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Hooked:
    return Hooked(world, tmp_path, monkeypatch)


@pytest.mark.parametrize("ms_header", [False, True], ids=["authorization", "x-ms-signature"])
def test_a_leaf_whose_issuer_is_only_in_its_aia_verifies_with_the_system_store(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ms_header: bool
) -> None:
    """As Partner Center serves it: the leaf alone, its issuing CA only at its AIA URL, the
    system store (SSL_CERT_FILE) holding only the root. Either signature header form."""
    hooked = Hooked(world, tmp_path, monkeypatch, system_trust=True, ms_header=ms_header)
    side = world.sandbox.webhooks
    with world.daemon() as daemon:
        hooked.started()
        first = hooked.new_lead("Chained Through AIA")
        world.team.wait_for(1, timeout=30)  # generous: seconds, not the hourly poll
        assert "Chained Through AIA" in titles(world)[0]
        assert hooked.statuses(first) == [200]

        side.fault("foreign_issuer")  # its issuer only at an AIA URL on localhost: not listed
        foreign = hooked.new_lead("Foreign Issuer Host")
        side.fault("no_algorithm")
        unnamed = hooked.new_lead("No Algorithm Header")
        second = hooked.new_lead("Second Through AIA")
        world.team.wait_for(2, timeout=30)
        assert side.wait_idle()
        assert hooked.statuses(foreign) == [401]
        assert hooked.statuses(unnamed) == [401]
        assert hooked.statuses(second) == [200]
        assert hooked.lookups(foreign) == hooked.lookups(unnamed) == 0
        wait_until(lambda: len(daemon.events("webhook.rejected")) == 2, what="two log lines")
    reasons = " ".join(line["reason"] for line in daemon.events("webhook.rejected"))
    assert "not in webhooks.issuer_hosts" in reasons
    assert "no X-MS-Signature-Algorithm header" in reasons
    fetched = side.certificates.fetched
    # the issuer was fetched once, from the listed host; localhost's URL was never asked for
    # (both names reach the same server, which records every request)
    assert fetched.count(ISSUER_PATH) == 1
    assert fetched.count(f"/cert/{GOOD}.cer") == 1


def titles(world: World) -> list[str]:
    return [str(body["title"]) for body in world.team.bodies]


def test_a_new_lead_is_alerted_within_seconds_and_a_replay_acts_once(hooked: Hooked) -> None:
    world = hooked.world
    world.add_lead(age=timedelta(days=1), customer="Known Before Start")
    # The sandbox retries its event for that lead while nothing listens: let it give up first,
    # or a late retry reaches the daemon and the first event this test sends is not the first.
    assert world.sandbox.webhooks.wait_idle()
    with world.daemon():
        hooked.started()
        world.team.wait_for(1)  # the first poll's alert
        assert hooked.healthz()["last_webhook_event"] is None

        lead = hooked.new_lead("Instant Lead Inc")
        world.team.wait_for(2, timeout=3.0)  # the deadline: seconds, not the hourly poll
        assert "Instant Lead Inc" in titles(world)[1]
        assert hooked.lookups(lead) == 1

        world.sandbox.webhooks.fault("replay")
        again = hooked.new_lead("Replayed Co")
        world.team.wait_for(3, timeout=5.0)
        wait_until(lambda: len(hooked.statuses(again)) == 2, what="the replayed delivery")
        assert hooked.statuses(again) == [200, 200]
        assert (
            hooked.metric(
                'referral_watch_webhook_events_total{event="referral-created",result="duplicate"}'
            )
            == 1
        )
        assert hooked.lookups(again) == 1
        assert sum("Replayed Co" in title for title in titles(world)) == 1

        assert hooked.healthz()["last_webhook_event"] is not None
        check = world.cli("status", "--check")
        assert check.code == 0
        assert "last webhook event 20" in check.out


def test_forged_events_get_401_and_cause_no_lookup_and_no_alert(hooked: Hooked) -> None:
    world = hooked.world
    faults = ["bad_signature", "foreign_host", "untrusted_chain", "expired", "wrong_issuer"]
    with world.daemon() as daemon:
        hooked.started()
        forged = []
        for fault in faults:
            world.sandbox.webhooks.fault(fault)
            forged.append((fault, hooked.new_lead(f"Forged {fault}")))
        world.sandbox.webhooks.fault("oversize")
        oversize = hooked.new_lead("Oversized Ltd")
        genuine = hooked.new_lead("Genuine Corp")
        world.team.wait_for(1, timeout=10)  # the genuine one, sent after all the others
        assert world.sandbox.webhooks.wait_idle()
        for fault, lead in forged:
            assert hooked.statuses(lead) == [401], fault
            assert hooked.lookups(lead) == 0, fault
        assert hooked.statuses(oversize) == [413]
        assert hooked.lookups(oversize) == 0
        assert titles(world) == [t for t in titles(world) if "Genuine Corp" in t]
        assert hooked.lookups(genuine) == 1
        events = 'referral_watch_webhook_events_total{event="unverified",result='
        assert hooked.metric(events + '"bad_signature"}') == 1
        assert hooked.metric(events + '"untrusted_certificate"}') == 4
        wait_until(lambda: len(daemon.events("webhook.rejected")) == 6, what="six log lines")
    reasons = [line["reason"] for line in daemon.events("webhook.rejected")]
    for expected in (
        "the signature does not match the body",
        "is not in webhooks.certificate_hosts",
        "does not chain to a trusted root",
        "is not valid now",
        "not Microsoft Corporation",
        "body over 65536 bytes",
    ):
        assert any(expected in reason for reason in reasons), expected
    assert world.sandbox.webhooks.certificates.fetched.count("/cert/untrusted.cer") == 1


def test_a_burst_of_200_leads_gives_one_digest_per_channel_and_tier(hooked: Hooked) -> None:
    world = hooked.world
    world.tiers = world.tiers.replace('notify = ["team"]', 'notify = ["team", "managers"]', 1)
    with world.daemon():
        hooked.started()
        ids = world.sandbox.burst(200)
        world.team.wait_for(1, timeout=30)
        world.managers.wait_for(1, timeout=30)
        assert world.sandbox.webhooks.wait_idle()
        wait_until(lambda: all(hooked.lookups(i) == 1 for i in ids), what="every lead fetched")
        # nothing more is coming: every lead was fetched once and its alert recorded
        for receiver in (world.team, world.managers):
            assert len(receiver.bodies) == 1, [b["title"] for b in receiver.bodies]
            assert "200" in receiver.bodies[0]["title"]


def test_an_update_that_answers_the_lead_resolves_it_at_once(hooked: Hooked) -> None:
    world = hooked.world
    lead = make_referral(customer="Answered Elsewhere", created=world_now() - timedelta(days=1))
    world.sandbox.add(lead)
    with world.daemon():
        hooked.started()
        world.team.wait_for(1)
        world.sandbox.update(lead["id"], substatus="Accepted", status="Active")
        world.team.wait_for(2, timeout=5.0)  # on_resolved = ["team"]
        assert "Answered Elsewhere" in titles(world)[1]


def world_now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


@pytest.fixture(autouse=True)
def _no_leftover(hooked: Hooked) -> Iterator[None]:
    yield
    hooked.world.sandbox.webhooks.wait_idle(timeout=5)
