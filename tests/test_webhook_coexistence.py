"""`webhooks register|show|unregister|test` against a registration API that, as Partner Center,
keeps ONE registration per company and already holds another integration's (a CRM co-sell
connector with billing events): a second sandbox over TLS (certificate from a local trustme CA,
trusted through SSL_CERT_FILE), on loopback. The replaced registration is remembered in the
state, SQLite and PostgreSQL alike."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from referral_watch.sandbox.server import Sandbox
from referral_watch.sandbox.webhooks import REGISTRATION_PATH

from conftest import World, free_port

REGISTRATION_TOKEN = "coexistence-registration-token"
CONNECTOR = {
    "WebhookUrl": "https://crm.fabrikam.example/api/partnercenter/events",
    "WebhookEvents": ["referral-created", "related-referral-created", "invoice-ready"],
    "SignatureTokenToMsSignatureHeader": True,
}


@pytest.fixture
def registrar() -> Iterator[Sandbox]:
    """The registration API over https, holding the connector's registration."""
    with Sandbox(
        registration_token=REGISTRATION_TOKEN, held_registration=copy.deepcopy(CONNECTOR), tls=True
    ) as running:
        yield running


@pytest.fixture(params=["sqlite", "postgresql"])
def port(
    request: pytest.FixtureRequest,
    world: World,
    registrar: Sandbox,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> int:
    if request.param == "postgresql":
        world.state_url = str(request.getfixturevalue("pg_url"))
    port = free_port()
    tls = tmp_path / "tls-roots.pem"
    tls.write_bytes(registrar.tls_ca_pem + world.sandbox.webhooks.tls_roots_pem)
    roots = tmp_path / "signing-roots.pem"
    roots.write_bytes(world.sandbox.webhooks.trust_roots_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls))
    monkeypatch.setenv("RW_REGISTRATION_TOKEN", REGISTRATION_TOKEN)
    base = registrar.base_url.removesuffix("/v1.0")
    assert base.startswith("https://127.0.0.1:")
    world.extra = f"""
[server]
listen = "127.0.0.1:{port}"
public_url = "http://127.0.0.1:{port}"

[webhooks]
certificate_hosts = ["{world.sandbox.webhooks.certificate_host}"]
trust_roots = "{roots}"
registration_url = "{base}{REGISTRATION_PATH}"
registration_token_env = "RW_REGISTRATION_TOKEN"
"""
    return port


def held(registrar: Sandbox) -> dict[str, Any] | None:
    return copy.deepcopy(registrar.webhooks.registration)


def writes(registrar: Sandbox) -> list[tuple[str, Any]]:
    return [
        (r.method, json.loads(r.body) if r.body else None)
        for r in registrar.requests
        if r.method != "GET"
    ]


def test_register_refuses_naming_the_integration_that_holds_the_registration(
    world: World, registrar: Sandbox, port: int
) -> None:
    before = held(registrar)
    outcome = world.cli("webhooks", "register")
    assert outcome.code == 1
    assert CONNECTOR["WebhookUrl"] in outcome.err
    assert "referral-created, related-referral-created, invoice-ready" in outcome.err
    assert "--replace" in outcome.err
    assert "webhooks.forward_to" in outcome.err
    assert "Traceback" not in outcome.err
    assert held(registrar) == before  # untouched
    assert writes(registrar) == []

    shown = world.cli("webhooks", "show")
    assert shown.code == 0
    assert f"URL:        {CONNECTOR['WebhookUrl']}" in shown.out
    assert "Ours:       no" in shown.out
    assert f"this config would register http://127.0.0.1:{port}/webhooks/partner-center" in (
        shown.out
    )


def test_replace_keeps_its_events_and_unregister_puts_it_back_exactly(
    world: World, registrar: Sandbox, port: int
) -> None:
    ours = f"http://127.0.0.1:{port}/webhooks/partner-center"
    original = held(registrar)
    assert original is not None

    taken = world.cli("webhooks", "register", "--replace")
    assert taken.code == 0, taken.err
    now = held(registrar)
    assert now is not None
    assert now["WebhookUrl"] == ours
    assert now["WebhookEvents"] == [
        "referral-created",
        "related-referral-created",
        "invoice-ready",  # the connector's events, all kept
        "referral-updated",
        "test-created",  # and ours added
    ]
    assert f"Replaced {CONNECTOR['WebhookUrl']}" in taken.out
    assert "webhooks unregister` puts it back" in taken.out

    shown = world.cli("webhooks", "show")
    assert "Ours:       yes" in shown.out
    assert f"Replaced:   {CONNECTOR['WebhookUrl']}" in shown.out

    again = world.cli("webhooks", "register")  # ours now: nothing to refuse, nothing to send
    assert again.code == 0, again.err
    assert "Already registered" in again.out

    back = world.cli("webhooks", "unregister")
    assert back.code == 0, back.err
    assert f"Put back the registration it replaced: {CONNECTOR['WebhookUrl']}" in back.out
    assert held(registrar) == original  # URL, events in order, header choice, subscriber id
    assert writes(registrar)[-1] == ("PUT", CONNECTOR)  # put back, never deleted

    # Forgotten once put back: the next unregister finds the registration not ours.
    refused = world.cli("webhooks", "unregister")
    assert refused.code == 1
    assert "left alone" in refused.err
    assert held(registrar) == original


def test_the_replaced_registration_is_kept_in_the_state(
    world: World, registrar: Sandbox, port: int
) -> None:
    from referral_watch.partner_center.webhooks.registration import REPLACED_META
    from referral_watch.state.store import Store

    assert world.cli("webhooks", "register", "--replace").code == 0
    location = world.state_url or world.state_path
    with Store(location) as store:
        kept = store.get_meta(REPLACED_META)
    assert kept is not None
    assert json.loads(kept) == original_with_id(registrar, kept)


def original_with_id(registrar: Sandbox, kept: str) -> dict[str, Any]:
    """The connector's registration as the API answered it (with its SubscriberId)."""
    subscriber = json.loads(kept).get("SubscriberId")
    assert isinstance(subscriber, str) and subscriber
    assert subscriber == (registrar.webhooks.registration or {}).get("SubscriberId")
    return {**CONNECTOR, "SubscriberId": subscriber}


def test_a_403_names_the_roles_that_may_register(
    world: World, registrar: Sandbox, port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    registrar.webhooks.without_role.add("referral-admin-only")
    monkeypatch.setenv("RW_REGISTRATION_TOKEN", "referral-admin-only")
    outcome = world.cli("webhooks", "register", "--replace")
    assert outcome.code == 1
    for role in ("Global Admin", "Billing Admin", "Admin agent", "Sales agent", "Helpdesk agent"):
        assert role in outcome.err
    assert "Referral Admin alone cannot" in outcome.err
    assert "Traceback" not in outcome.err
    assert writes(registrar) == []
