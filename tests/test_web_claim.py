"""The claim page and the console's claim buttons in-process (Starlette's TestClient), signed in
with real MSAL against the fake identity endpoint, on a real state file (SPEC 17, 13/14)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from starlette.testclient import TestClient
from test_web_answer import csrf_of
from test_web_signin import entra, sign_in

from referral_watch.state.store import Store

from conftest import LOCAL, World
from fakeidp import FakeIdP
from receivers import SmtpReceiver

ALICE = "alice@contoso.example"
BOB = "bob@contoso.com"


@pytest.fixture
def idp(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeIdP]:
    with FakeIdP(username=ALICE) as fake:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(fake.ca_path))
        yield fake


@pytest.fixture
def owners(world: World) -> Iterator[SmtpReceiver]:
    with SmtpReceiver() as smtp:
        world.channels["owners"] = smtp.mailto_url(to="sales@example.com")
        yield smtp


CLAIMS = '[claims]\nowner_channel = "owners"\nlapse_after = "2d"\n'


def signed_in(world: World, idp: FakeIdP, **fields: Any) -> tuple[TestClient, str]:
    """A watched lead (the team told once) and a console client signed in as Alice, who
    arrived through the Take-it link."""
    lead = world.add_lead(age=timedelta(days=1), customer="Fabrikam Customer Inc", **fields)
    world.extra = CLAIMS
    assert world.cli("run", "--once").code == 0
    client = entra(world, idp, extra=CLAIMS)
    url = f"/leads/{lead}/claim"
    landed = sign_in(client, idp, start=url)
    assert landed.headers["location"] == url  # the sign-in returns to the claim page
    return client, lead


def claimed_by(world: World) -> Any:
    return world.cli("status", "--json").json()[0]["claimed_by"]


def confirm(client: TestClient, lead: str, **form: str) -> Any:
    page = client.get(f"/leads/{lead}/claim")
    assert page.status_code == 200, page.text
    data = {"csrf": csrf_of(page.text), "via": "alert", **form}
    return client.post(f"/leads/{lead}/claim", data=data, follow_redirects=False)


def test_the_page_shows_the_lead_and_asks_to_confirm(
    world: World, idp: FakeIdP, owners: SmtpReceiver
) -> None:
    client, lead = signed_in(world, idp, notes="Wants 40 servers moved.")
    page = client.get(f"/leads/{lead}/claim")
    assert page.status_code == 200
    assert "Take this lead?" in page.text and "Fabrikam Customer Inc" in page.text
    assert "Wants 40 servers moved." in page.text and "nobody yet" in page.text
    assert 'id="confirm"' in page.text
    assert claimed_by(world) is None  # opening the link takes nothing


def test_confirming_makes_the_person_who_clicked_the_owner_and_the_team_hears_it(
    world: World, idp: FakeIdP, owners: SmtpReceiver
) -> None:
    client, lead = signed_in(world, idp)
    done = confirm(client, lead, note="calling them today")
    assert done.status_code == 303 and done.headers["location"] == f"/leads/{lead}"
    owner = claimed_by(world)
    assert owner["email"] == ALICE and owner["via"] == "alert"
    assert owner["name"] == "Alice Example"
    page = client.get(f"/leads/{lead}").text
    assert "Taken by Alice Example since" in page
    assert 'id="unclaim"' in page and 'id="take-it"' not in page  # hers: she can give it up
    world.team.wait_for(2)  # the page asked the daemon to decide and deliver at once
    assert any("taken by Alice Example" in str(body["title"]) for body in world.team.bodies)
    with Store(world.state_path) as store:
        [entry] = [e for e in store.audit(lead) if e.action == "claim"]
    assert entry.who == ALICE and entry.via == "alert" and entry.reason == "calling them today"


def test_a_lead_someone_else_holds_asks_to_confirm_the_take_over(
    world: World, idp: FakeIdP, owners: SmtpReceiver
) -> None:
    client, lead = signed_in(world, idp)
    assert world.cli("claim", lead, "--as", BOB).code == 0
    page = client.get(f"/leads/{lead}/claim").text
    assert "Take this lead over?" in page
    assert f"{BOB} since" in page  # who holds it, and since when
    assert "Take it over from" in page and 'name="take_over" value="1"' in page
    refused = confirm(client, lead, take_over="0")
    assert refused.status_code == 409 and "holds this lead now; nothing changed" in refused.text
    assert claimed_by(world)["email"] == BOB
    done = confirm(client, lead, take_over="1")
    assert done.status_code == 303
    assert claimed_by(world)["email"] == ALICE
    with Store(world.state_path) as store:
        assert [e.action for e in store.audit(lead)] == ["claim", "take-over"]


def test_only_the_owner_gives_a_lead_up(world: World, idp: FakeIdP, owners: SmtpReceiver) -> None:
    client, lead = signed_in(world, idp)
    assert world.cli("claim", lead, "--as", BOB).code == 0
    csrf = csrf_of(client.get(f"/leads/{lead}").text)
    refused = client.post(f"/leads/{lead}/unclaim", data={"csrf": csrf}, follow_redirects=False)
    assert refused.status_code == 403 and BOB in refused.text
    assert confirm(client, lead, take_over="1").status_code == 303
    given = client.post(f"/leads/{lead}/unclaim", data={"csrf": csrf}, follow_redirects=False)
    assert given.status_code == 303
    assert claimed_by(world) is None
    assert 'id="take-it"' in client.get(f"/leads/{lead}").text


def test_a_post_without_the_csrf_token_takes_nothing(
    world: World, idp: FakeIdP, owners: SmtpReceiver
) -> None:
    client, lead = signed_in(world, idp)
    refused = client.post(f"/leads/{lead}/claim", data={"via": "alert"})
    assert refused.status_code == 403
    assert claimed_by(world) is None


def test_the_console_shows_owners_and_leads_long_unclaimed_with_their_buttons(
    world: World, idp: FakeIdP, owners: SmtpReceiver
) -> None:
    client, lead = signed_in(world, idp)
    old = world.add_lead(age=timedelta(days=4, hours=2), customer="Northwind Traders")
    assert world.cli("run", "--once").code == 0
    assert world.cli("claim", lead, "--as", BOB).code == 0
    index = client.get("/").text
    assert "Owner" in index
    assert f'<span class="owner" title="{BOB}">{BOB}</span>' in index  # the owner...
    assert '<span class="owner-since">for ' in index  # ...and for how long
    assert 'class="unclaimed">unclaimed for 4d 2h' in index  # amber, with no owner
    assert f'action="/leads/{old}/claim"' in index  # Take it: one click from the list
    assert f'href="/leads/{lead}/claim?via=console"' in index  # Take over: the page confirms
    page = client.get(f"/leads/{old}/claim?via=console")
    posted = client.post(
        f"/leads/{old}/claim",
        data={"csrf": csrf_of(page.text), "via": "console"},
        follow_redirects=False,
    )
    assert posted.status_code == 303
    held = {e["customer"]: e["claimed_by"] for e in world.cli("status", "--json").json()}
    assert held["Northwind Traders"]["via"] == "console"
    assert held["Northwind Traders"]["email"] == ALICE


def test_without_claims_or_a_sign_in_there_is_no_claiming(world: World) -> None:
    from referral_watch.config.loader import load_config
    from referral_watch.daemon import Daemon
    from referral_watch.web.app import build_app

    lead = world.add_lead(age=timedelta(days=1))
    world.extra = '[server]\nlisten = "127.0.0.1:9"\n'
    assert world.cli("run", "--once").code == 0
    world.extra = '[server]\nlisten = "127.0.0.1:9464"\n[console]\nsign_in = "none"\n'
    off = TestClient(build_app(Daemon(load_config(world.write_config()))), base_url=LOCAL)
    assert off.get(f"/leads/{lead}/claim").status_code == 404
    assert "Owner" not in off.get("/").text
    world.extra = (
        '[server]\nlisten = "127.0.0.1:9464"\n[console]\nsign_in = "none"\n'
        '[claims]\nowner_channel = "owners"\n'
    )
    world.channels["owners"] = "mailto://u:p@localhost?to=sales@example.com"
    local = TestClient(build_app(Daemon(load_config(world.write_config()))), base_url=LOCAL)
    page = local.get(f"/leads/{lead}/claim")
    assert page.status_code == 200
    assert "needs a Microsoft sign-in" in page.text and 'id="confirm"' not in page.text
    csrf = csrf_of(local.get(f"/leads/{lead}").text)
    posted = local.post(f"/leads/{lead}/claim", data={"csrf": csrf, "via": "alert"})
    assert posted.status_code == 403
