"""The answer page in-process (Starlette's TestClient), signed in with real MSAL against the fake
identity endpoint, answering the sandbox over real HTTP with the person's own token (SPEC 14)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from starlette.testclient import TestClient
from test_web_signin import entra, sign_in

from referral_watch.state.store import Store

from conftest import LOCAL, World
from fakeidp import FakeIdP

ACCEPT = [
    {"op": "replace", "path": "/status", "value": "Active"},
    {"op": "replace", "path": "/substatus", "value": "Accepted"},
]


@pytest.fixture
def idp(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeIdP]:
    with FakeIdP(username="alice@contoso.example") as fake:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(fake.ca_path))
        yield fake


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


def patches(world: World) -> list[Any]:
    return [r for r in world.sandbox.requests if r.method == "PATCH"]


def signed_in(world: World, idp: FakeIdP, **fields: Any) -> tuple[TestClient, str]:
    """A watched lead (told to `team` once), and a console client signed in as Alice whose
    delegated tokens the sandbox accepts (but not for answering unless she has the role)."""
    lead = world.add_lead(
        age=timedelta(days=10, hours=20), customer="Fabrikam Customer Inc", **fields
    )
    world.extra = '[server]\nlisten = "127.0.0.1:9"\n'
    assert world.cli("run", "--once").code == 0
    client = entra(world, idp)
    url = f"/leads/{lead}/answer?action=accept"
    landed = sign_in(client, idp, start=url)
    assert landed.headers["location"] == url  # the sign-in returns to the answer page
    world.sandbox.more_tokens.update(idp.issued_access_tokens)
    world.sandbox.requests.clear()
    return client, lead


def confirm(client: TestClient, lead: str, action: str = "accept", **form: str) -> Any:
    page = client.get(f"/leads/{lead}/answer?action={action}")
    assert page.status_code == 200, page.text
    data = {"csrf": csrf_of(page.text), "action": action, **form}
    return client.post(f"/leads/{lead}/answer", data=data, follow_redirects=False)


def test_the_page_shows_the_lead_and_asks_to_confirm(world: World, idp: FakeIdP) -> None:
    client, lead = signed_in(world, idp, notes="Wants 40 servers moved before year end.")
    page = client.get(f"/leads/{lead}/answer?action=accept")
    assert page.status_code == 200
    text = page.text
    assert "Accept this lead?" in text and "Fabrikam Customer Inc" in text
    assert "25,000 USD" in text
    assert "Wants 40 servers moved" in text
    assert 'data-deadline="' in text  # the time left ticks in the browser
    assert "team (reminder)" in text  # who else was told
    assert 'id="confirm"' in text
    assert world.sandbox.requests == []  # opening the link answers nothing


def test_confirming_accepts_with_the_persons_own_token(world: World, idp: FakeIdP) -> None:
    client, lead = signed_in(world, idp)
    etag = world.sandbox.get_record(lead)["eTag"]  # type: ignore[index]
    done = confirm(client, lead)
    assert done.status_code == 303 and done.headers["location"] == f"/leads/{lead}"
    [patch] = patches(world)
    assert patch.json() == ACCEPT
    assert patch.headers["If-Match"] == etag
    person = patch.headers["Authorization"].removeprefix("Bearer ")
    assert person in idp.issued_access_tokens and person != "sandbox-token"
    record = world.sandbox.get_record(lead)
    assert record["substatus"] == "Accepted"  # type: ignore[index]

    page = client.get(f"/leads/{lead}").text
    assert 'id="answers"' in page and "alice@contoso.example" in page
    assert 'id="answer-accept"' not in page  # answered: no more buttons
    [entry] = client.get("/api/leads?all=1").json()
    assert entry["resolution"] == "accepted"
    assert entry["answered_by"]["who"] == "alice@contoso.example"
    assert entry["answered_by"]["via"] == "console"

    def told() -> bool:
        return any("via referral-watch" in str(b["message"]) for b in world.team.bodies)

    world.team.wait_for(2)
    assert told()  # on_resolved heard at once, from the daemon's own delivery
    assert "Alice Example" in next(
        str(b["message"]) for b in world.team.bodies if "via referral-watch" in str(b["message"])
    )


def test_a_double_click_answers_once(world: World, idp: FakeIdP) -> None:
    client, lead = signed_in(world, idp)
    page = client.get(f"/leads/{lead}/answer?action=accept")
    form = {"csrf": csrf_of(page.text), "action": "accept"}
    first = client.post(f"/leads/{lead}/answer", data=form, follow_redirects=False)
    second = client.post(f"/leads/{lead}/answer", data=form, follow_redirects=False)
    assert first.status_code == second.status_code == 303
    assert len(patches(world)) == 1
    again = client.get(f"/leads/{lead}/answer?action=decline").text
    assert "already accepted by Alice Example (alice@contoso.example)" in again
    assert 'id="confirm"' not in again


def test_a_decline_needs_a_reason_and_sends_it(world: World, idp: FakeIdP) -> None:
    client, lead = signed_in(world, idp)
    refused = confirm(client, lead, "decline")
    assert refused.status_code == 400
    assert "Choose or write a reason" in refused.text
    assert patches(world) == []
    page = client.get(f"/leads/{lead}/answer?action=decline")
    assert "Outside our solution area" in page.text  # the common reasons
    typed = {"csrf": csrf_of(page.text), "action": "decline", "reason": "other"}
    done = client.post(
        f"/leads/{lead}/answer",
        data={**typed, "other": "We only serve the Benelux"},
        follow_redirects=False,
    )
    assert done.status_code == 303
    [patch] = patches(world)
    assert patch.json()[-1] == {
        "op": "add",
        "path": "/statusReason",
        "value": "We only serve the Benelux",
    }


def test_a_change_meanwhile_shows_the_fresh_state_and_answers_nothing(
    world: World, idp: FakeIdP
) -> None:
    client, lead = signed_in(world, idp)
    world.sandbox.before_patch = lambda ref_id: world.sandbox.update(
        ref_id, status="Closed", substatus="Declined", statusReason="by someone else"
    )
    shown = confirm(client, lead)
    assert shown.status_code == 409
    assert "changed in Partner Center meanwhile" in shown.text
    assert "Closed / Declined" in shown.text  # what it is now
    with Store(world.state_path) as store:
        assert store.lead(lead).resolution is None  # type: ignore[union-attr]
        assert [e.result for e in store.audit(lead)] == ["changed"]


def test_a_missing_role_says_so(world: World, idp: FakeIdP) -> None:
    client, lead = signed_in(world, idp)
    world.sandbox.without_role.update(idp.issued_access_tokens)
    shown = confirm(client, lead)
    assert shown.status_code == 403
    assert "lacks the Referral Admin or Referral User role" in shown.text
    assert world.sandbox.get_record(lead)["substatus"] == "Pending"  # type: ignore[index]


def test_without_a_partner_center_token_the_person_is_asked_to_consent(
    world: World, idp: FakeIdP
) -> None:
    client, lead = signed_in(world, idp)
    idp.revoke()  # the refresh token no longer works...
    cache = client.app.state.identity._app.token_cache  # type: ignore[attr-defined]
    for token in list(cache.search("AccessToken")):  # ...and the access token is gone
        cache.remove_at(token)
    shown = confirm(client, lead)
    assert shown.status_code == 403
    assert "Sign in again and allow it" in shown.text
    assert "/auth/login?next=" in shown.text
    assert patches(world) == []


def test_a_post_without_the_csrf_token_is_refused(world: World, idp: FakeIdP) -> None:
    client, lead = signed_in(world, idp)
    refused = client.post(f"/leads/{lead}/answer", data={"action": "accept"})
    assert refused.status_code == 403
    assert patches(world) == []


def test_answering_is_off_without_public_url_answer_or_a_sign_in(world: World) -> None:
    from referral_watch.config.loader import load_config
    from referral_watch.daemon import Daemon
    from referral_watch.web.app import build_app

    lead = world.add_lead(age=timedelta(days=1))
    world.extra = '[server]\nlisten = "127.0.0.1:9"\n'
    assert world.cli("run", "--once").code == 0
    world.extra = (
        '[server]\nlisten = "127.0.0.1:9464"\n[console]\nsign_in = "none"\nanswer = false\n'
    )
    off = TestClient(build_app(Daemon(load_config(world.write_config()))), base_url=LOCAL)
    assert off.get(f"/leads/{lead}/answer?action=accept").status_code == 404
    world.extra = '[server]\nlisten = "127.0.0.1:9464"\n[console]\nsign_in = "none"\n'
    local = TestClient(build_app(Daemon(load_config(world.write_config()))), base_url=LOCAL)
    page = local.get(f"/leads/{lead}/answer?action=accept")
    assert page.status_code == 200
    assert "needs a Microsoft sign-in" in page.text and 'id="confirm"' not in page.text
    csrf = csrf_of(local.get(f"/leads/{lead}").text)  # the lead page's forms carry it
    posted = local.post(f"/leads/{lead}/answer", data={"csrf": csrf, "action": "accept"})
    assert posted.status_code == 403
    assert patches(world) == []


@pytest.mark.parametrize("action", ["accept", "decline"])
def test_tier_alerts_link_to_the_answer_page(world: World, action: str) -> None:
    world.extra = (
        '[server]\nlisten = "127.0.0.1:9464"\npublic_url = "http://localhost:9464"\n'
        '[console]\nsign_in = "none"\n'
    )
    lead = world.add_lead(age=timedelta(hours=1))
    assert world.cli("run", "--once").code == 0
    [body] = world.team.bodies
    link = f"http://localhost:9464/leads/{lead}/answer?action={action}"
    assert link in str(body["message"])


def test_someone_no_longer_in_allowed_cannot_answer(world: World, idp: FakeIdP) -> None:
    from referral_watch.config.loader import load_config

    client, lead = signed_in(world, idp)
    page = client.get(f"/leads/{lead}/answer?action=accept")
    csrf = csrf_of(page.text)
    host = client.app.state.host  # type: ignore[attr-defined]
    world.write_config()
    text = world.config_path.read_text().replace('["contoso.example"]', '["fabrikam.example"]')
    world.config_path.write_text(text)
    host.config = load_config(world.config_path)  # as a reload (SIGHUP) would
    refused = client.post(f"/leads/{lead}/answer", data={"csrf": csrf, "action": "accept"})
    assert refused.status_code == 403
    assert "may not answer leads here" in refused.text
    assert patches(world) == []


@pytest.mark.parametrize("action", ["Decline", "ACCEPT", "delete", "", None, "accept "])
def test_a_tampered_action_is_refused_and_sends_nothing(
    world: World, idp: FakeIdP, action: str | None
) -> None:
    """An answer cannot be undone: only the exact words answer, nothing falls back to accept."""
    client, lead = signed_in(world, idp)
    page = client.get(f"/leads/{lead}/answer?action=accept")
    form = {"csrf": csrf_of(page.text), "reason": "other", "other": "tampered"}
    if action is not None:
        form["action"] = action
    refused = client.post(f"/leads/{lead}/answer", data=form, follow_redirects=False)
    assert refused.status_code == 400
    assert patches(world) == []
    assert world.sandbox.get_record(lead)["substatus"] == "Pending"  # type: ignore[index]


def test_a_link_in_capitals_shows_what_it_says_and_an_unknown_one_is_refused(
    world: World, idp: FakeIdP
) -> None:
    client, lead = signed_in(world, idp)
    page = client.get(f"/leads/{lead}/answer?action=DECLINE")
    assert page.status_code == 200
    assert "Decline this lead?" in page.text
    assert 'name="action" value="decline"' in page.text  # no hidden accept behind it
    assert 'value="accept"' not in page.text
    assert client.get(f"/leads/{lead}/answer?action=delete").status_code == 400
    assert client.get(f"/leads/{lead}/answer").status_code == 400
    assert patches(world) == []


def test_a_standby_replica_answers_nothing(world: World, idp: FakeIdP) -> None:
    """The active replica holds the shared state's lock; a standby sends no PATCH (SPEC 16)."""
    from types import SimpleNamespace

    client, lead = signed_in(world, idp)
    page = client.get(f"/leads/{lead}/answer?action=accept")
    host = client.app.state.host  # type: ignore[attr-defined]
    host.leadership = SimpleNamespace(active=False, error=None)  # another replica is active
    refused = client.post(
        f"/leads/{lead}/answer",
        data={"csrf": csrf_of(page.text), "action": "accept"},
        follow_redirects=False,
    )
    assert refused.status_code == 409 and "standby" in refused.text
    assert patches(world) == []
    with Store(world.state_path) as store:
        assert store.lead(lead).resolution is None  # type: ignore[union-attr]
        assert store.audit(lead) == []
