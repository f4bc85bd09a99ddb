"""`referral-watch webhooks register|show|test|unregister` against the sandbox's registration API,
with the exact bodies Partner Center documents and the registration audience's own token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from referral_watch.sandbox.webhooks import REGISTRATION_PATH

from conftest import World, free_port, wait_until
from fakeidp import FakeIdP

REGISTRATION_TOKEN = "sandbox-registration-token"


@pytest.fixture
def port(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    port = free_port()
    side = world.sandbox.webhooks
    tls = tmp_path / "tls-roots.pem"
    tls.write_bytes(side.tls_roots_pem)
    roots = tmp_path / "signing-roots.pem"
    roots.write_bytes(side.trust_roots_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls))
    monkeypatch.setenv("RW_REGISTRATION_TOKEN", REGISTRATION_TOKEN)
    base = world.sandbox.base_url.removesuffix("/v1.0")
    world.extra = f"""
[schedule]
interval = "1h"
jitter = "0s"

[server]
listen = "127.0.0.1:{port}"
public_url = "http://127.0.0.1:{port}"

[webhooks]
certificate_hosts = ["{side.certificate_host}"]
issuer_hosts = ["{side.issuer_host}"]
trust_roots = "{roots}"
registration_url = "{base}{REGISTRATION_PATH}"
registration_token_env = "RW_REGISTRATION_TOKEN"
"""
    return port


def registration_requests(world: World) -> list[tuple[str, str, object]]:
    return [
        (r.method, r.path, json.loads(r.body) if r.body else None)
        for r in world.sandbox.requests
        if r.path.startswith(REGISTRATION_PATH)
    ]


def test_register_show_and_unregister_with_the_documented_bodies(world: World, port: int) -> None:
    url = f"http://127.0.0.1:{port}/webhooks/partner-center"
    events = ["referral-created", "referral-updated", "test-created"]
    body = {"WebhookUrl": url, "WebhookEvents": events}

    first = world.cli("webhooks", "register")
    assert first.code == 0, first.err
    assert f"Registered {url} for referral-created, referral-updated, test-created" in first.out
    again = world.cli("webhooks", "register")
    assert again.code == 0
    assert f"Already registered: {url}" in again.out
    assert registration_requests(world) == [
        ("GET", REGISTRATION_PATH, None),
        ("POST", REGISTRATION_PATH, body),
        ("GET", REGISTRATION_PATH, None),  # nothing missing: nothing sent
    ]
    tokens = {r.headers.get("authorization") for r in world.sandbox.requests}
    assert tokens == {f"Bearer {REGISTRATION_TOKEN}"}  # the other audience's token only

    shown = world.cli("webhooks", "show")
    assert shown.code == 0
    assert f"URL:        {url}" in shown.out
    assert "Events:     referral-created, referral-updated, test-created" in shown.out
    assert "Ours:       yes" in shown.out
    assert "Note:" not in shown.out

    assert not world.state_path.exists()  # register, show: no state file made for nothing

    gone = world.cli("webhooks", "unregister")
    assert (gone.code, gone.out.strip()) == (0, "Unregistered.")
    assert registration_requests(world)[-1] == ("DELETE", REGISTRATION_PATH, None)
    assert "No webhook registration" in world.cli("webhooks", "show").out
    assert "There was no webhook registration." in world.cli("webhooks", "unregister").out


def test_a_token_for_the_referrals_audience_is_refused_clearly(
    world: World, port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RW_REGISTRATION_TOKEN", "sandbox-token")  # the Referrals API's token
    outcome = world.cli("webhooks", "show")
    assert outcome.code == 1
    assert "rejected the token (401)" in outcome.err
    assert "https://api.partnercenter.microsoft.com" in outcome.err
    assert "Traceback" not in outcome.err


def test_register_needs_a_public_url(world: World, port: int) -> None:
    world.extra = world.extra.replace(f'public_url = "http://127.0.0.1:{port}"\n', "")
    outcome = world.cli("webhooks", "register")
    assert outcome.code == 1
    assert "server.public_url is not set" in outcome.err


def test_webhooks_test_reports_each_step_and_sees_the_event_verified(
    world: World, port: int
) -> None:
    assert world.cli("webhooks", "register").code == 0
    with world.daemon():
        wait_for_health(port)
        outcome = world.cli("webhooks", "test")
    assert outcome.code == 0, outcome.out + outcome.err
    lines = outcome.out.splitlines()
    assert lines[0] == (
        f"1. Registered: http://127.0.0.1:{port}/webhooks/partner-center "
        "(referral-created, referral-updated, test-created)"
    )
    assert lines[1].startswith("2. Asked Partner Center for a test event (correlation id ")
    assert lines[2] == "3. Waiting up to 60s for it to arrive and verify ..."
    assert lines[-1].startswith("4. Arrived and verified at ")
    asked = [r for r in registration_requests(world) if r[0] == "POST"]
    assert asked[-1][1] == f"{REGISTRATION_PATH}/validationEvents"


def test_webhooks_test_registers_test_created_first_and_shows_what_our_endpoint_answered(
    world: World, port: int
) -> None:
    """Partner Center refuses a validation event unless test-created is registered (the
    sandbox enforces it), and reports the delivery as {"status": "completed", "results":
    [{"responseCode": "OK", ...}]}."""
    url = f"http://127.0.0.1:{port}/webhooks/partner-center"
    side = world.sandbox.webhooks
    side.register(url, ["referral-created", "referral-updated"])  # as 0.2 registered it
    with world.daemon():
        wait_for_health(port)
        outcome = world.cli("webhooks", "test")
    assert outcome.code == 0, outcome.out + outcome.err
    writes = [(m, b) for m, _, b in registration_requests(world) if m != "GET"]
    assert writes[0] == (
        "PUT",
        {
            "WebhookUrl": url,
            "WebhookEvents": ["referral-created", "referral-updated", "test-created"],
        },
    )
    assert writes[1] == ("POST", None)  # the validation event, after the PUT
    assert "   Partner Center: completed (our endpoint answered OK" in outcome.out
    assert outcome.out.splitlines()[-1].startswith("4. Arrived and verified at ")


def test_the_sandbox_refuses_a_validation_event_without_test_created(
    world: World, port: int
) -> None:
    import httpx

    side = world.sandbox.webhooks
    side.register(f"http://127.0.0.1:{port}/hook", ["referral-created"])
    base = world.sandbox.base_url.removesuffix("/v1.0")
    answer = httpx.post(
        f"{base}{REGISTRATION_PATH}/validationEvents",
        headers={"Authorization": f"Bearer {REGISTRATION_TOKEN}"},
    )
    assert answer.status_code == 400
    assert "test-created" in answer.json()["error"]["message"]
    assert side.deliveries == []


def test_webhooks_test_fails_when_nothing_listens(world: World, port: int) -> None:
    assert world.cli("webhooks", "register").code == 0
    outcome = world.cli("webhooks", "test")
    assert outcome.code == 1
    assert "Partner Center: failed" in outcome.out
    assert "4. FAILED" in outcome.out


def test_webhooks_commands_need_the_section(world: World) -> None:
    outcome = world.cli("webhooks", "show")
    assert outcome.code == 1
    assert "[webhooks] is not configured" in outcome.err


def wait_for_health(port: int) -> None:
    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    wait_until(healthy, what="the daemon's first poll")


def test_check_config_names_unreadable_trust_roots(world: World, port: int, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-roots.pem"
    world.extra = world.extra.replace(str(tmp_path / "signing-roots.pem"), str(missing))
    outcome = world.cli("check-config")
    assert outcome.code == 2
    assert f"webhooks.trust_roots: cannot read the trust roots {missing}" in outcome.err


def test_check_config_names_unreadable_intermediates(
    world: World, port: int, tmp_path: Path
) -> None:
    world.extra += 'intermediates = "not-pem.txt"\n'
    (world.config_path.parent / "not-pem.txt").write_text("hello\n")
    outcome = world.cli("check-config")
    assert outcome.code == 2
    assert "webhooks.intermediates: cannot read the intermediates" in outcome.err
    assert "no PEM certificates in it" in outcome.err


def test_with_msal_the_registration_token_is_asked_for_its_own_audience(
    world: World, port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeIdP() as idp:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(idp.ca_path))
        world.auth = (
            'method = "msal"\n'
            f'tenant_id = "{idp.tenant}"\n'
            'client_id = "00000000-0000-0000-0000-0000000000aa"\n'
            f'authority = "{idp.url}"\n'
        )
        world.sandbox.webhooks.registration_token = None  # any token; we check which one came
        world.write_config()
        login = subprocess.run(
            [sys.executable, "-m", "referral_watch", "--config", str(world.config_path), "login"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ},
        )
        assert login.returncode == 0, login.stderr
        outcome = world.cli("webhooks", "show")
        assert outcome.code == 0, outcome.err
        scopes = [r.form.get("scope", "") for r in idp.token_requests("refresh_token")]
        assert any("https://api.partnercenter.microsoft.com/.default" in s for s in scopes)
        sent = {r.headers.get("authorization") for r in world.sandbox.requests}
        assert len(sent) == 1
        token = sent.pop().removeprefix("Bearer ")
        assert token in idp.issued_access_tokens
        assert token != idp.issued_access_tokens[0]  # not the Referrals API's token from login
