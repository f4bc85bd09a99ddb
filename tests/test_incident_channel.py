"""The structured channel for incident tools (referral-watch+https://): PagerDuty Events API v2
events with one dedup key per lead, a trigger per tier alert and a resolve when the lead is
answered, checked on a real loopback receiver."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from conftest import World
from receivers import WebhookReceiver

KEY = "R0ut1ngKeyOfTheService"


def test_incident_events_trigger_and_resolve_with_one_dedup_key(world: World) -> None:
    with WebhookReceiver("/v2/enqueue") as pager:
        world.channels = {
            "managers": f"referral-watch+http://127.0.0.1:{pager.port}/v2/enqueue?routing_key={KEY}"
        }
        world.policy = 'on_expired = ["managers"]\non_resolved = ["team", "managers"]\n'
        lead = world.add_lead(age=timedelta(days=12, hours=12), customer="Incident Customer BV")

        assert world.cli("check-config").code == 0
        shown = world.cli("run", "--once", "--dry-run")
        assert f"managers -> referral-watch+http://127.0.0.1:{pager.port}/v2/enqueue" in shown.out
        assert KEY not in shown.out  # the routing key is a secret
        assert pager.requests == []

        ran = world.cli("run", "--once")
        assert ran.code == 0, ran.out + ran.err
        (request,) = pager.wait_for(1)
        assert request.method == "POST" and request.path == "/v2/enqueue"  # no key in the URL
        assert request.headers["content-type"] == "application/json"
        event = request.json
        assert event["routing_key"] == KEY
        assert event["event_action"] == "trigger"
        assert event["dedup_key"] == f"referral-watch/{lead}"
        payload = event["payload"]
        assert payload["source"] == "referral-watch"
        assert payload["severity"] == "warning"  # urgent: between the first and the last tier
        assert payload["group"] == "urgent" and payload["class"] == "tier"
        assert "Incident Customer BV" in payload["summary"]
        details = payload["custom_details"]
        assert details["lead_id"] == lead and details["tier"] == "urgent"
        deadline = datetime.fromisoformat(details["deadline"].replace("Z", "+00:00"))
        assert timedelta(hours=35) < deadline - datetime.now(UTC) < timedelta(hours=37)
        assert 35 * 3600 < details["remaining_seconds"] < 37 * 3600
        assert details["deal_value"] == 25000 and details["currency"] == "USD"
        assert event["links"][0]["href"].startswith("https://partner.microsoft.com/")

        # Answered in Partner Center: the next poll resolves the same incident.
        world.sandbox.update(lead, status="Active", substatus="Accepted")
        assert world.cli("run", "--once").code == 0
        requests = pager.wait_for(2)
        resolve = requests[1].json
        assert resolve["event_action"] == "resolve"
        assert resolve["dedup_key"] == f"referral-watch/{lead}"
        assert resolve["payload"]["custom_details"]["resolution"] == "accepted"
        assert resolve["payload"]["severity"] == "info"


def test_a_refusing_incident_endpoint_keeps_the_message_for_the_next_cycle(world: World) -> None:
    with WebhookReceiver("/enqueue") as pager:
        world.channels = {"managers": f"referral-watch+http://127.0.0.1:{pager.port}/enqueue"}
        world.add_lead(age=timedelta(days=12, hours=12))
        pager.fail_next(1, status=503)
        failed = world.cli("run", "--once")
        assert failed.code == 1
        assert "the incident endpoint answered HTTP 503" in failed.out
        assert world.cli("run", "--once").code == 0  # retried from the outbox
        assert [r.json["event_action"] for r in pager.wait_for(2)] == ["trigger", "trigger"]
        assert "routing_key" not in pager.requests[0].json  # none in the URL: none sent
