"""Entra ID errors an operator can fix become one line naming the fix: missing admin consent
(AADSTS65001), a permission the app registration lacks (AADSTS650057), a multi-factor sign-in
required (AADSTS50076) or not set up yet (AADSTS50079). Real MSAL against the local identity
endpoint (tests/fakeidp.py), at `login` and wherever a token refresh fails (a poll, and the
operations alert that reports it; the webhook registration's own audience)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from test_e2e_msal import login_subprocess, msal_world

from referral_watch.sandbox.webhooks import REGISTRATION_PATH

from conftest import World
from fakeidp import FakeIdP
from receivers import WebhookReceiver

PARTNER_API = "4990cffe-04e8-4e8b-808a-1175604b879f"
PARTNER_CENTER_API = "fa3d9a0c-3fb0-42cc-9193-47c7ecd2edbd"
CLIENT_ID = "00000000-0000-0000-0000-0000000000aa"  # as msal_world configures it

# Entra ID's own wording (Microsoft's error code reference), as the token endpoint sends it.
CONSENT = (
    "invalid_grant",
    f"AADSTS65001: The user or administrator has not consented to use the application with ID "
    f"'{CLIENT_ID}' named 'referral-watch'. Send an interactive authorization request for this "
    "user and resource.",
    65001,
)
PERMISSION = (
    "invalid_client",
    "AADSTS650057: Invalid resource. The client has requested access to a resource which isn't "
    "listed in the requested permissions in the client's application registration.",
    650057,
)
MFA = (
    "interaction_required",
    "AADSTS50076: Due to a configuration change made by your administrator, or because you "
    "moved to a new location, you must use multi-factor authentication to access 'x'.",
    50076,
)
MFA_ENROLL = (
    "interaction_required",
    "AADSTS50079: Due to a configuration change made by your administrator, or because you "
    "moved to a new location, you must enroll in multi-factor authentication to access 'x'.",
    50079,
)


@pytest.fixture
def idp(world: World, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeIdP]:
    with FakeIdP() as fake:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(fake.ca_path))
        msal_world(world, fake)
        yield fake


login = login_subprocess


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("error", "fix"),
    [
        (CONSENT, ["AADSTS65001", "admin consent", f'"Microsoft Partner" (app id {PARTNER_API}']),
        (PERMISSION, ["AADSTS650057", "user_impersonation", PARTNER_API, "Microsoft Dev Center"]),
        (MFA, ["AADSTS50076", "multi-factor", "MFA prompt", "since 2026-04-01"]),
        (MFA_ENROLL, ["AADSTS50079", "https://aka.ms/mfasetup", "since 2026-04-01"]),
    ],
    ids=["consent", "permission", "mfa", "mfa-enroll"],
)
def test_login_names_the_fix_in_one_line(
    world: World, idp: FakeIdP, error: tuple[str, str, int], fix: list[str]
) -> None:
    idp.token_error = error
    outcome = login(world)
    assert outcome.returncode == 1
    lines = error_lines(outcome.stderr)
    assert len(lines) == 1, outcome.stderr
    for words in fix:
        assert words in lines[0]
    assert "Traceback" not in outcome.stderr
    assert idp.token_requests()  # MSAL really asked


def test_a_refresh_demanding_mfa_names_the_fix_in_the_poll_and_the_ops_alert(
    world: World, idp: FakeIdP
) -> None:
    with WebhookReceiver() as ops:
        world.channels = {"ops": ops.json_url}
        world.extra = '[operations]\nnotify = ["ops"]\nafter_failures = 1\nrepeat = "6h"\n'
        idp.access_token_lifetime = 1  # the poll must refresh
        assert login(world).returncode == 0
        idp.token_error = MFA  # e.g. Partner Center's MFA rule now applies to this account
        world.add_lead(age=timedelta(hours=1))
        polled = world.cli("run", "--once")
    assert polled.code == 1
    assert "AADSTS50076" in polled.out
    assert "run `referral-watch login` and complete the MFA prompt" in polled.out
    assert "Traceback" not in polled.out + polled.err
    assert len(ops.bodies) == 1
    assert "complete the MFA prompt" in ops.bodies[0]["message"]


def test_the_registration_token_names_the_partner_center_api(
    world: World, idp: FakeIdP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The webhook registration's token is for another API: its missing permission names that
    one ("Microsoft Partner Center"), not the Referrals API's."""
    base = world.sandbox.base_url.removesuffix("/v1.0")
    world.extra = f"""
[server]
listen = "127.0.0.1:9"
public_url = "https://leads.contoso.example"

[webhooks]
registration_url = "{base}{REGISTRATION_PATH}"
"""
    assert login(world).returncode == 0
    idp.token_error = PERMISSION
    outcome = world.cli("webhooks", "show")
    assert outcome.code == 1
    assert f'"Microsoft Partner Center" (app id {PARTNER_CENTER_API})' in outcome.err
    assert "AADSTS650057" in outcome.err
    assert PARTNER_API not in outcome.err
