"""Answering a lead (SPEC 14): the sandbox's PATCH, and `referral-watch answer` end to end over
real HTTP (the sandbox as Partner Center, receivers as channels, a real state file)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import test_render
from test_render import NOW, make_lead

from referral_watch.model import EXPIRED, RESOLVED, TIER, AuditEntry
from referral_watch.render.messages import render_alert, render_digest
from referral_watch.sandbox.records import make_referral
from referral_watch.sandbox.server import Sandbox

from conftest import World

AUTH = {"Authorization": "Bearer sandbox-token"}
ACCEPT = [
    {"op": "replace", "path": "/status", "value": "Active"},
    {"op": "replace", "path": "/substatus", "value": "Accepted"},
]


def decline(reason: str) -> list[dict[str, Any]]:
    return [
        {"op": "replace", "path": "/status", "value": "Closed"},
        {"op": "replace", "path": "/substatus", "value": "Declined"},
        {"op": "add", "path": "/statusReason", "value": reason},
    ]


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    record = make_referral(id="lead-1", created=datetime.now(UTC) - timedelta(days=1))
    with Sandbox([record]) as running:
        yield running


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(headers=AUTH, timeout=5) as client:
        yield client


def item(sandbox: Sandbox, lead_id: str = "lead-1") -> str:
    return f"{sandbox.base_url}/engagements/referrals/{lead_id}"


# --- the sandbox's PATCH ------------------------------------------------------------------------


def test_sandbox_accept_answers_204_and_changes_the_etag(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    before = http.get(item(sandbox)).json()
    assert before["eTag"].startswith('"') and before["eTag"].endswith('"')  # a quoted string
    answer = http.patch(item(sandbox), json=ACCEPT, headers={"If-Match": before["eTag"]})
    assert answer.status_code == 204
    assert answer.content == b""
    after = http.get(item(sandbox)).json()
    assert (after["status"], after["substatus"]) == ("Active", "Accepted")
    assert after["eTag"] != before["eTag"]
    assert after["eTag"] == answer.headers["ETag"]
    assert "acceptedDateTime" in after
    recorded = sandbox.requests[-2]
    assert recorded.method == "PATCH"
    assert recorded.json() == ACCEPT
    assert recorded.headers["If-Match"] == before["eTag"]


def test_sandbox_returns_the_record_when_asked_to(sandbox: Sandbox, http: httpx.Client) -> None:
    answer = http.patch(
        item(sandbox), json=decline("No capacity"), headers={"Prefer": "return=representation"}
    )
    assert answer.status_code == 200
    body = answer.json()
    assert (body["status"], body["substatus"], body["statusReason"]) == (
        "Closed",
        "Declined",
        "No capacity",
    )


def test_sandbox_412_when_the_etag_is_not_current(sandbox: Sandbox, http: httpx.Client) -> None:
    stale = http.get(item(sandbox)).json()["eTag"]
    sandbox.update("lead-1", name="renamed meanwhile")  # every update is a new version
    answer = http.patch(item(sandbox), json=ACCEPT, headers={"If-Match": stale})
    assert answer.status_code == 412
    assert answer.json()["error"]["code"] == "preconditionFailed"
    assert sandbox.get_record("lead-1")["substatus"] == "Pending"  # type: ignore[index]


def test_sandbox_403_for_a_token_without_the_referral_role(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    sandbox.without_role.add("sandbox-token")
    assert http.get(item(sandbox)).status_code == 200  # may read, may not answer
    answer = http.patch(item(sandbox), json=ACCEPT)
    assert answer.status_code == 403
    assert "Referral Admin" in answer.json()["error"]["message"]
    assert sandbox.get_record("lead-1")["substatus"] == "Pending"  # type: ignore[index]


def test_sandbox_accepts_more_tokens_and_rejects_unknown_ones(sandbox: Sandbox) -> None:
    sandbox.more_tokens.add("person-token")
    person = httpx.patch(
        item(sandbox), json=ACCEPT, headers={"Authorization": "Bearer person-token"}
    )
    assert person.status_code == 204
    stranger = httpx.patch(item(sandbox), json=ACCEPT, headers={"Authorization": "Bearer x"})
    assert stranger.status_code == 401


@pytest.mark.parametrize(
    ("operations", "why"),
    [
        ([{"op": "remove", "path": "/status"}], "not supported"),
        ([{"op": "replace", "path": "/status", "value": "Active"}], "Substatus Pending"),
        (decline("")[:2], "statusReason"),
        ([{"op": "replace", "path": "/substatus", "value": "Won"}], "not valid with status New"),
        ({"op": "replace"}, "JSON Patch array"),
        ([{"op": "replace", "path": "/nope/deeper", "value": 1}], "does not exist"),
    ],
)
def test_sandbox_refuses_bad_patches_with_400(
    sandbox: Sandbox, http: httpx.Client, operations: Any, why: str
) -> None:
    answer = http.patch(item(sandbox), json=operations)
    assert answer.status_code == 400
    assert why in answer.json()["error"]["message"]


def test_sandbox_transitions_follow_the_documented_rules(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    assert http.patch(item(sandbox), json=ACCEPT).status_code == 204
    back = [
        {"op": "replace", "path": "/status", "value": "New"},
        {"op": "replace", "path": "/substatus", "value": "Pending"},
    ]
    assert http.patch(item(sandbox), json=back).status_code == 400  # Active does not go back
    won = [
        {"op": "replace", "path": "/status", "value": "Closed"},
        {"op": "replace", "path": "/substatus", "value": "Won"},
    ]
    assert http.patch(item(sandbox), json=won).status_code == 204
    assert http.patch(item(sandbox), json=ACCEPT).status_code == 400  # Closed is final
    assert http.patch(item(sandbox, "nobody"), json=ACCEPT).status_code == 404


# --- referral-watch answer, end to end -------------------------------------------------------


def patches(world: World) -> list[Any]:
    return [r for r in world.sandbox.requests if r.method == "PATCH"]


def watched_lead(world: World, **fields: Any) -> str:
    lead = world.add_lead(age=timedelta(days=10), customer="Fabrikam Customer Inc", **fields)
    assert world.cli("run", "--once").code == 0
    world.sandbox.requests.clear()
    return lead


def test_accept_from_the_command_line(world: World) -> None:
    lead = watched_lead(world)
    etag = world.sandbox.get_record(lead)["eTag"]  # type: ignore[index]
    result = world.cli("answer", lead[:8], "accept")
    assert result.code == 0, result.err
    assert "accepted in Partner Center" in result.out
    [patch] = patches(world)
    assert patch.json() == ACCEPT
    assert patch.headers["If-Match"] == etag
    assert patch.headers["Authorization"] == "Bearer sandbox-token"
    record = world.sandbox.get_record(lead)
    assert (record["status"], record["substatus"]) == ("Active", "Accepted")  # type: ignore[index]

    [entry] = world.cli("status", "--json", "--all").json()
    assert entry["resolution"] == "accepted"
    assert entry["answered_by"]["via"] == "command"
    assert entry["answered_by"]["answer"] == "accepted"
    assert world.cli("status", "--json").json() == []  # no longer watched: reminders stop

    told = [body for body in world.team.bodies if "Lead accepted" in str(body["title"])]
    assert len(told) == 1  # on_resolved heard at once, not at the next poll
    assert "via referral-watch" in str(told[0]["message"])
    assert "before the deadline" in str(told[0]["message"])

    world.cli("run", "--once")
    assert len(world.team.bodies) == 2  # the new-lead alert and the one resolved notice


def test_decline_sends_the_reason(world: World) -> None:
    lead = watched_lead(world)
    result = world.cli("answer", lead, "decline", "--reason", "Outside our region")
    assert result.code == 0, result.err
    [patch] = patches(world)
    assert patch.json() == decline("Outside our region")
    record = world.sandbox.get_record(lead)
    assert record["statusReason"] == "Outside our region"  # type: ignore[index]
    [entry] = world.cli("status", "--json", "--all").json()
    assert entry["resolution"] == "declined"
    assert entry["answered_by"]["reason"] == "Outside our region"


def test_decline_without_a_reason_is_refused_before_any_call(world: World) -> None:
    lead = watched_lead(world)
    result = world.cli("answer", lead, "decline")
    assert result.code == 1
    assert "needs a reason" in result.err
    assert world.sandbox.requests == []
    assert world.cli("status", "--json").json()[0]["resolution"] is None


def test_a_change_meanwhile_answers_nothing_and_says_so(world: World) -> None:
    lead = watched_lead(world)
    # Someone edits the referral in Partner Center between our read and our PATCH.
    world.sandbox.before_patch = lambda ref_id: world.sandbox.update(ref_id, name="edited")
    result = world.cli("answer", lead, "accept")
    assert result.code == 1
    assert "changed in Partner Center meanwhile" in result.out
    assert world.sandbox.get_record(lead)["substatus"] == "Pending"  # type: ignore[index]
    assert world.cli("status", "--json").json()[0]["resolution"] is None  # still watched
    explained = world.cli("status", "--explain", lead)
    assert "accept by" in explained.out and ": changed" in explained.out


def test_a_missing_role_answers_nothing_and_names_the_role(world: World) -> None:
    lead = watched_lead(world)
    world.sandbox.without_role.add("sandbox-token")
    result = world.cli("answer", lead, "accept")
    assert result.code == 1
    assert "Referral Admin or Referral User role" in result.out
    assert "sandbox-token" not in result.out + result.err
    assert world.cli("status", "--json").json()[0]["resolution"] is None
    assert ": refused" in world.cli("status", "--explain", lead).out


def test_a_second_answer_says_who_answered_and_calls_nothing(world: World) -> None:
    lead = watched_lead(world)
    assert world.cli("answer", lead, "accept").code == 0
    world.sandbox.requests.clear()
    again = world.cli("answer", lead, "accept")
    assert again.code == 0
    assert "already accepted by" in again.out
    assert world.sandbox.requests == []
    other = world.cli("answer", lead, "decline", "--reason", "changed my mind")
    assert other.code == 1
    assert "already accepted by" in other.out


def test_a_lead_answered_in_partner_center_meanwhile_is_not_answered_again(
    world: World,
) -> None:
    lead = watched_lead(world)
    world.sandbox.update(lead, status="Closed", substatus="Declined", statusReason="x")
    result = world.cli("answer", lead, "accept")
    assert result.code == 1
    assert "Partner Center shows it as Declined" in result.out
    assert patches(world) == []


def test_an_unknown_id_is_exit_1(world: World) -> None:
    watched_lead(world)
    result = world.cli("answer", "ffffffff-0000", "accept")
    assert result.code == 1
    assert "no lead with id" in result.err


# --- the on_resolved wording ---------------------------------------------------------------


def answered_lead(result: str = "accepted", reason: str = "") -> Any:
    lead = make_lead(remaining=timedelta(days=3, hours=4, minutes=10), resolution=result)
    entry = AuditEntry(
        lead.id, NOW, "ann@contoso.com", "Ann de Vries", "console", result[:-2], result, reason
    )
    return replace(lead, answered=entry, resolved_at=NOW)


@pytest.mark.parametrize(
    ("style_name", "expected"),
    [
        ("EN", "Accepted by Ann de Vries via referral-watch, 3d 4h before the deadline."),
        ("NL", "Geaccepteerd door Ann de Vries via referral-watch, 3d 4u voor de deadline."),
        ("TEAMS", "Accepted by Ann de Vries via referral-watch, 3d 4h before the deadline."),
        ("SLACK", "Accepted by Ann de Vries via referral-watch, 3d 4h before the deadline."),
    ],
)
def test_the_resolved_notice_names_who_answered_and_how_early(
    style_name: str, expected: str
) -> None:
    style = getattr(test_render, style_name)
    message = render_alert(answered_lead(), RESOLVED, None, test_render.NOW, style)
    assert expected in message.body
    if style.max_length:
        assert len(message.title) + len(message.body) <= style.max_length


def test_a_decline_notice_carries_the_reason() -> None:
    lead = answered_lead("declined", "Outside our region")
    message = render_alert(lead, RESOLVED, None, test_render.NOW, test_render.EN)
    assert "Declined by Ann de Vries via referral-watch" in message.body
    assert "**Reason:** Outside our region" in message.body


def test_a_lead_answered_elsewhere_keeps_the_plain_notice() -> None:
    lead = test_render.make_lead(resolution="accepted")
    message = render_alert(lead, RESOLVED, None, test_render.NOW, test_render.EN)
    assert "via referral-watch" not in message.body
    assert "was answered in Partner Center (accepted)" in message.body


# --- Accept / Decline links in alerts ------------------------------------------------------

BASE = "https://leads.contoso.example"


def answer_links(lead_id: str) -> tuple[str, str]:
    return (
        f"{BASE}/leads/{lead_id}/answer?action=accept",
        f"{BASE}/leads/{lead_id}/answer?action=decline",
    )


@pytest.mark.parametrize("style_name", ["EN", "NL", "SLACK", "TEAMS"])
def test_every_tier_alert_carries_accept_and_decline_links(style_name: str) -> None:
    style = replace(getattr(test_render, style_name), answer_base=BASE)
    lead = make_lead()
    message = render_alert(lead, TIER, None, NOW, style)
    accept, decline = answer_links(lead.id)
    words = ("Accepteren", "Afwijzen") if style_name == "NL" else ("Accept", "Decline")
    assert f"[{words[0]}]({accept})" in message.body
    assert f"[{words[1]}]({decline})" in message.body
    # next to the Partner Center link, on the same line
    [line] = [text for text in message.body.splitlines() if accept in text]
    assert "partner.microsoft.com" in line
    if style.max_length:
        assert len(message.title) + len(message.body) <= style.max_length


def test_links_stay_off_when_answering_is_off_and_on_notices() -> None:
    lead = make_lead()
    assert "/answer?action=" not in render_alert(lead, TIER, None, NOW, test_render.EN).body
    on = replace(test_render.EN, answer_base=BASE)
    assert "/answer?action=" not in render_alert(lead, EXPIRED, None, NOW, on).body
    assert "/answer?action=" not in render_alert(answered_lead(), RESOLVED, None, NOW, on).body


def test_a_long_teams_alert_keeps_its_links_within_the_card_limit() -> None:
    lead = make_lead(
        customer="Northwind " * 30,
        notes="word " * 400,
        team=[
            {"firstName": f"Person{n}", "lastName": "Long-Surname", "email": f"p{n}@x.example"}
            for n in range(20)
        ],
    )
    style = replace(test_render.TEAMS, answer_base=BASE + "/a/rather/long/path/prefix")
    message = render_alert(lead, TIER, None, NOW, style)
    assert len(message.title) + len(message.body) <= style.max_length  # type: ignore[operator]
    assert "/answer?action=accept" in message.body
    assert "/answer?action=decline" in message.body


def test_digests_carry_the_links_per_lead_where_space_allows() -> None:
    leads = [make_lead(ref_id=f"8a7b6c5d-0000-4000-8000-00000000000{n}") for n in range(3)]
    on = replace(test_render.SLACK, answer_base=BASE)
    body = render_digest(leads, TIER, None, 0, NOW, on).body
    for lead in leads:
        accept, decline = answer_links(lead.id)
        assert f"[accept]({accept})" in body and f"[decline]({decline})" in body
    teams = replace(test_render.TEAMS, answer_base=BASE)
    assert "/answer?action=" not in render_digest(leads, TIER, None, 0, NOW, teams).body


def test_the_teams_card_with_the_links_stays_within_the_workflow_limits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Intercepted at requests' transport, as in test_notify: what Apprise really posts."""
    from test_notify import TEAMS_SHORT, FakeService, notifier

    teams = FakeService(status=202, content=b"").install(monkeypatch)
    lead = make_lead(customer="Contoso " * 40, notes="x" * 2000)
    style = replace(test_render.TEAMS, answer_base=BASE)
    message = render_alert(lead, TIER, None, NOW, style)
    assert notifier(TEAMS_SHORT).send("team", message).ok
    (request,) = teams.sent
    card = request.payload["attachments"][0]["content"]
    text = next(block["text"] for block in card["body"] if block.get("id") == "body")
    accept, decline = answer_links(lead.id)
    assert accept in text and decline in text  # not cut off by Apprise's 1,000-character cap
    assert len(request.body) < 28 * 1024  # Power Automate's limit for a card message


# --- the client's answer calls ---------------------------------------------------------------


def client(sandbox: Sandbox) -> Any:
    from referral_watch.config import PartnerCenterConfig
    from referral_watch.partner_center.auth import EnvTokenProvider
    from referral_watch.partner_center.client import PartnerCenter

    config = PartnerCenterConfig(base_url=sandbox.base_url, timeout="5s")  # type: ignore[arg-type]
    tokens = EnvTokenProvider("T", environ={"T": "sandbox-token"})
    return PartnerCenter(config, tokens)


def test_the_client_patches_with_the_given_token_only(sandbox: Sandbox) -> None:
    sandbox.more_tokens.add("person-token")
    with client(sandbox) as api:
        record = api.current("lead-1", token="person-token")
        patched = api.patch("lead-1", ACCEPT, etag=record["eTag"], token="person-token")
    assert patched.record["substatus"] == "Accepted"
    assert patched.request_id
    assert {r.headers["Authorization"] for r in sandbox.requests} == {"Bearer person-token"}


def test_the_client_translates_refusals_without_repeating_the_token(sandbox: Sandbox) -> None:
    from referral_watch.partner_center.client import AnswerError

    with client(sandbox) as api:
        with pytest.raises(AnswerError) as gone:
            api.patch("nobody", ACCEPT, etag=None)
        assert gone.value.status == 404 and "not known to Partner Center" in str(gone.value)
        assert api.current("nobody") is None
        with pytest.raises(AnswerError) as rejected:
            api.patch("lead-1", ACCEPT, etag=None, token="stolen-looking-token")
        assert rejected.value.status == 401
        assert "stolen-looking-token" not in str(rejected.value)
    assert sandbox.get_record("lead-1")["substatus"] == "Pending"  # type: ignore[index]


def test_a_running_daemon_tells_on_resolved_itself(world: World) -> None:
    from referral_watch.state.lock import InstanceLock

    lead = watched_lead(world)
    with InstanceLock(world.state_path.with_name("state.db.lock")):  # as `run` holds it
        result = world.cli("answer", lead, "accept")
    assert result.code == 0, result.err
    assert "running daemon tells on_resolved at its next cycle" in result.out
    assert len(world.team.bodies) == 1  # only the new-lead alert so far
    world.cli("run", "--once")
    assert any("via referral-watch" in str(b["message"]) for b in world.team.bodies)
