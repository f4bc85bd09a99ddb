"""The console's Microsoft sign-in in-process: the real MSAL library against the fake identity
endpoint over TLS (authorization code flow with PKCE), allowed users, sessions, sign-out."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from starlette.testclient import TestClient

from referral_watch.config.loader import load_config
from referral_watch.daemon import Daemon
from referral_watch.web.app import build_app
from referral_watch.web.signin import PARTNER_CENTER_SCOPE, allowed

from conftest import World
from fakeidp import FakeIdP

SESSION_SECRET = "0123456789abcdef" * 4


@pytest.fixture
def idp(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeIdP]:
    with FakeIdP(username="alice@contoso.example") as fake:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(fake.ca_path))
        yield fake


def entra(
    world: World, idp: FakeIdP, allowed_users: str = '["contoso.example"]', extra: str = ""
) -> TestClient:
    world.extra = (
        extra
        + f"""
[server]
listen = "127.0.0.1:9464"
public_url = "https://leads.contoso.example"
[console]
sign_in = "entra"
tenant_id = "{idp.tenant}"
client_id = "22222222-0000-0000-0000-000000000001"
client_secret = "console-secret"
authority = "{idp.url}"
allowed = {allowed_users}
session_secret = "{SESSION_SECRET}"
"""
    )
    daemon = Daemon(load_config(world.write_config()))
    return TestClient(build_app(daemon), base_url="https://leads.contoso.example")


def sign_in(client: TestClient, idp: FakeIdP, start: str = "/") -> requests.Response:
    """Follow the redirects a browser would: the app, the identity endpoint, back."""
    to_login = client.get(start, follow_redirects=False)
    assert to_login.status_code == 303
    to_idp = client.get(to_login.headers["location"], follow_redirects=False)
    assert to_idp.status_code == 303
    authorize = to_idp.headers["location"]
    back = idp.session().get(authorize, allow_redirects=False)
    assert back.status_code == 302, back.text
    callback = urlsplit(back.headers["location"])
    assert callback.netloc == "leads.contoso.example" and callback.path == "/auth/callback"
    return client.get(f"{callback.path}?{callback.query}", follow_redirects=False)


def test_an_anonymous_visit_goes_to_the_authority_with_pkce(world: World, idp: FakeIdP) -> None:
    client = entra(world, idp)
    first = client.get("/leads/abc?x=1", follow_redirects=False)
    assert first.status_code == 303
    assert first.headers["location"] == "/auth/login?next=%2Fleads%2Fabc%3Fx%3D1"
    to_idp = client.get(first.headers["location"], follow_redirects=False)
    target = urlsplit(to_idp.headers["location"])
    assert f"{target.scheme}://{target.netloc}" == idp.url
    assert target.path.endswith("/oauth2/v2.0/authorize")
    query = {k: v[0] for k, v in parse_qs(target.query).items()}
    assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) >= 43
    assert query["redirect_uri"] == "https://leads.contoso.example/auth/callback"
    assert PARTNER_CENTER_SCOPE in query["scope"].split()
    assert "code_verifier" not in to_idp.headers.get("set-cookie", "")


def test_sign_in_lands_on_the_page_asked_for_and_the_cookie_holds_no_token(
    world: World, idp: FakeIdP
) -> None:
    lead = world.add_lead(age=timedelta(days=1), customer="Signed In Co")
    world.extra = '[server]\nlisten = "127.0.0.1:9"\n'
    world.cli("run", "--once")
    client = entra(world, idp)
    landed = sign_in(client, idp, start=f"/leads/{lead}")
    assert landed.status_code == 303 and landed.headers["location"] == f"/leads/{lead}"
    cookie = landed.headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=lax" in cookie.lower()
    assert "secure" in cookie.lower()  # public_url is https
    payload = cookie.split("=", 1)[1].split(";")[0].split(".")[0]
    stored = base64.b64decode(payload + "=" * (-len(payload) % 4)).decode()
    assert "alice@contoso.example" in stored  # the cookie is what we think it is
    for token in idp.issued_access_tokens + idp.issued_refresh_tokens:
        assert token not in stored
    page = client.get(f"/leads/{lead}")
    assert page.status_code == 200 and "Signed In Co" in page.text
    assert "Alice Example" in page.text
    # the code was redeemed with the PKCE verifier matching the challenge
    [redeemed] = idp.token_requests("authorization_code")
    challenge = idp.authorize_requests[-1]["code_challenge"]
    verifier = redeemed.form["code_verifier"].encode()
    digest = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=").decode()
    assert digest == challenge
    assert client.get("/api/leads").status_code == 200


def test_the_persons_token_cache_stays_on_the_server(world: World, idp: FakeIdP) -> None:
    client = entra(world, idp)
    sign_in(client, idp)
    sessions = client.app.state.sessions  # type: ignore[attr-defined]
    [(session, (_, account))] = sessions._accounts.items()
    identity = client.app.state.identity  # type: ignore[attr-defined]
    cache = identity._app.token_cache  # the process's one MSAL cache, in memory
    tokens = [t for t in cache.search("AccessToken") if t["home_account_id"] == account]
    assert tokens and tokens[0]["secret"] == idp.issued_access_tokens[-1]
    assert session not in idp.issued_access_tokens


def test_someone_outside_allowed_gets_403(world: World, idp: FakeIdP) -> None:
    client = entra(world, idp, allowed_users='["fabrikam.example", "bob@contoso.example"]')
    refused = sign_in(client, idp)
    assert refused.status_code == 403
    assert "alice@contoso.example may not use this console" in refused.text
    assert client.get("/", follow_redirects=False).status_code == 303  # still signed out


def test_a_callback_without_a_flow_or_with_a_wrong_state_signs_nobody_in(
    world: World, idp: FakeIdP
) -> None:
    client = entra(world, idp)
    again = client.get("/auth/callback?code=x&state=y", follow_redirects=False)
    assert again.status_code == 303 and again.headers["location"] == "/auth/login"
    client.get("/auth/login", follow_redirects=False)
    forged = client.get("/auth/callback?code=x&state=not-the-one", follow_redirects=False)
    assert forged.status_code == 400
    assert client.get("/", follow_redirects=False).status_code == 303


def test_posts_need_a_session_and_the_csrf_token(world: World, idp: FakeIdP) -> None:
    lead = world.add_lead(age=timedelta(days=1), customer="Post Co")
    world.extra = '[server]\nlisten = "127.0.0.1:9"\n'
    world.cli("run", "--once")
    client = entra(world, idp)
    anonymous = client.post(f"/leads/{lead}/silence", data={"duration": "1d"})
    assert anonymous.status_code == 401
    sign_in(client, idp)
    no_token = client.post(f"/leads/{lead}/silence", data={"duration": "1d"})
    assert no_token.status_code == 403
    assert world.cli("status", "--json").json()[0]["silenced_until"] is None


def test_sign_out_ends_the_session(world: World, idp: FakeIdP) -> None:
    world.extra = '[server]\nlisten = "127.0.0.1:9"\n'
    world.cli("run", "--once")
    client = entra(world, idp)
    sign_in(client, idp)
    page = client.get("/")
    assert page.status_code == 200
    import re

    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token
    kept = dict(client.cookies)
    assert client.post("/auth/logout", data={"csrf": token.group(1)}).status_code == 200
    assert client.get("/", follow_redirects=False).status_code == 303
    # the old cookie does not work either: the server forgot the session
    replay = TestClient(client.app, base_url="https://leads.contoso.example", cookies=kept)
    assert replay.get("/", follow_redirects=False).status_code == 303


def test_health_and_metrics_need_no_sign_in(world: World, idp: FakeIdP) -> None:
    client = entra(world, idp)
    assert client.get("/healthz").status_code == 503
    assert client.get("/livez").status_code == 200  # the kubelet's liveness probe
    assert client.get("/metrics").status_code == 200
    assert client.get("/static/console.css").status_code == 200


@pytest.mark.parametrize(
    ("email", "ok"),
    [
        ("alice@contoso.example", True),
        ("ALICE@Contoso.Example", True),
        ("bob@fabrikam.example", True),
        ("eve@fabrikam.example.evil", False),
        ("eve@evilcontoso.example", False),
        ("carol@sub.contoso.example", False),
        ("", False),
        ("contoso.example", False),
    ],
)
def test_allowed_matches_domains_and_addresses(email: str, ok: bool) -> None:
    assert allowed(email, ["contoso.example", "bob@fabrikam.example"]) is ok


def test_entra_needs_its_keys(world: World, idp: FakeIdP) -> None:
    world.extra = '[server]\nlisten = "127.0.0.1:9464"\n[console]\nsign_in = "entra"\n'
    outcome = world.cli("check-config")
    assert outcome.code == 2
    assert "tenant_id, client_id, client_secret, session_secret" in outcome.err


@pytest.mark.parametrize(
    "claims",
    [
        {"tid": "99999999-0000-0000-0000-000000000000"},  # another organization's account
        {"preferred_username": None, "email": "alice@contoso.example"},  # email is unverified
    ],
)
def test_a_token_from_another_tenant_or_naming_only_an_email_gets_403(
    world: World, idp: FakeIdP, claims: dict[str, str | None]
) -> None:
    client = entra(world, idp)
    idp.id_claims = claims
    refused = sign_in(client, idp)
    assert refused.status_code == 403
    assert client.get("/api/leads").status_code == 401  # nobody signed in
    assert client.app.state.sessions._accounts == {}  # type: ignore[attr-defined]


def test_upn_names_the_person_when_preferred_username_is_absent(world: World, idp: FakeIdP) -> None:
    client = entra(world, idp)
    idp.id_claims = {"preferred_username": None, "upn": "alice@contoso.example"}
    assert sign_in(client, idp).status_code == 303
    assert client.get("/api/leads").status_code != 401  # past the sign-in gate


def test_sign_ins_share_one_msal_app_and_keep_a_bounded_number_of_flows(
    world: World, idp: FakeIdP, monkeypatch: pytest.MonkeyPatch
) -> None:
    from referral_watch.web import identity, signin

    monkeypatch.setattr(signin, "MAX_FLOWS", 20)
    monkeypatch.setattr(identity, "LOGIN_BURST", 1000)
    client = entra(world, idp)
    first = TestClient(client.app, base_url="https://leads.contoso.example")
    assert first.get("/auth/login", follow_redirects=False).status_code == 303
    for _ in range(100):
        assert client.get("/auth/login", follow_redirects=False).status_code == 303
    assert len(client.app.state.sessions._flows) == 20  # type: ignore[attr-defined]
    assert sign_in(client, idp).status_code == 303  # the newest sign-in completes
    # the oldest pending flow was dropped: its browser is sent to sign in again
    back = idp.session().get(
        first.get("/auth/login", follow_redirects=False).headers["location"],
        allow_redirects=False,
    )
    assert back.status_code == 302
    assert len(idp.discovery_requests()) == 1  # one MSAL application for all of them


def test_one_address_may_not_start_sign_ins_without_limit(
    world: World, idp: FakeIdP, monkeypatch: pytest.MonkeyPatch
) -> None:
    from referral_watch.web import identity

    monkeypatch.setattr(identity, "LOGIN_BURST", 5)
    client = entra(world, idp)
    answers = [client.get("/auth/login", follow_redirects=False) for _ in range(6)]
    assert [a.status_code for a in answers] == [303] * 5 + [429]
    assert int(answers[-1].headers["retry-after"]) >= 1
    assert len(client.app.state.sessions._flows) == 5  # type: ignore[attr-defined]
