"""Sign-in end to end: the real CLI and the real MSAL library against a local identity endpoint
over TLS, then polls that carry MSAL's token to the sandbox Partner Center."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta

import pytest

from conftest import World
from fakeidp import FakeIdP
from receivers import WebhookReceiver


@pytest.fixture
def idp(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeIdP]:
    with FakeIdP() as fake:
        # MSAL's own requests session trusts this CA, as an operator's would trust a proxy's.
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(fake.ca_path))
        yield fake


def msal_world(world: World, idp: FakeIdP) -> None:
    world.auth = (
        'method = "msal"\n'
        f'tenant_id = "{idp.tenant}"\n'
        'client_id = "00000000-0000-0000-0000-0000000000aa"\n'
        f'authority = "{idp.url}"\n'
    )
    world.sandbox.token = None  # accept any bearer token; the test checks which one came


def login_subprocess(world: World) -> subprocess.CompletedProcess[str]:
    world.write_config()
    return subprocess.run(
        [sys.executable, "-m", "referral_watch", "--config", str(world.config_path), "login"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )


def bearer_tokens(world: World) -> list[str]:
    return [
        r.headers.get("authorization", "").removeprefix("Bearer ") for r in world.sandbox.requests
    ]


def test_login_then_polls_refresh_and_send_msals_token(world: World, idp: FakeIdP) -> None:
    msal_world(world, idp)
    idp.access_token_lifetime = 1  # so the poll must use the refresh token
    signed_in = login_subprocess(world)
    assert signed_in.returncode == 0, signed_in.stderr
    assert "enter the code" in signed_in.stdout  # Microsoft's own message, shown as is
    assert f"Signed in as {idp.username}" in signed_in.stdout
    cache = world.state_path.parent / "msal-cache.json"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert len(idp.issued_access_tokens) == 1

    world.add_lead(age=timedelta(hours=1), customer="Signed In Co")
    polled = world.cli("run", "--once")
    assert polled.code == 0, polled.err
    assert len(idp.issued_access_tokens) >= 2  # refreshed silently, no operator involved
    assert bearer_tokens(world)
    assert set(bearer_tokens(world)) <= set(idp.issued_access_tokens[1:])
    assert len(world.team.bodies) == 1
    secrets = idp.issued_access_tokens + idp.issued_refresh_tokens
    for token in secrets:
        assert token not in signed_in.stdout + signed_in.stderr + polled.out + polled.err
        assert token.encode() not in world.state_path.read_bytes()

    assert world.cli("logout").out.startswith(f"Signed out {idp.username}")
    again = world.cli("run", "--once")
    assert again.code == 1
    assert "run `referral-watch login`" in again.out


def test_a_revoked_sign_in_says_run_login_and_tells_ops_once(world: World, idp: FakeIdP) -> None:
    msal_world(world, idp)
    with WebhookReceiver() as ops:
        world.channels = {"ops": ops.json_url}
        world.extra = '[operations]\nnotify = ["ops"]\nafter_failures = 2\nrepeat = "6h"\n'
        idp.access_token_lifetime = 1  # the cached access token is useless at once
        assert login_subprocess(world).returncode == 0
        idp.revoke()  # e.g. a password reset: the refresh token dies
        outcomes = [world.cli("run", "--once") for _ in range(4)]
        assert all(outcome.code == 1 for outcome in outcomes)
        assert "run `referral-watch login`" in outcomes[0].out
        assert "Traceback" not in outcomes[0].out + outcomes[0].err
        assert len(ops.bodies) == 1
        assert "referral-watch login" in ops.bodies[0]["message"]


def test_prometheus_sees_that_someone_must_sign_in_until_someone_does(
    world: World, idp: FakeIdP
) -> None:
    """referral_watch_sign_in_needed (deploy/prometheus/rules.yaml's ReferralWatchSignInExpired):
    1 while polls fail for want of a sign-in, 0 again after `referral-watch login`."""
    from referral_watch.config.loader import load_config
    from referral_watch.daemon import Daemon

    msal_world(world, idp)
    world.add_lead(age=timedelta(days=1), customer="Waiting Co")

    def gauge_after_a_cycle() -> str:
        daemon = Daemon(load_config(world.write_config()))
        try:
            daemon.cycle()
            text = daemon.metrics.render().decode()
        finally:
            daemon.close()
        [line] = [x for x in text.splitlines() if x.startswith("referral_watch_sign_in_needed ")]
        return line.split()[1]

    assert gauge_after_a_cycle() == "1.0"  # never signed in: the poll failed, login is needed
    assert login_subprocess(world).returncode == 0
    assert gauge_after_a_cycle() == "0.0"
    assert world.team.wait_for(1)


def test_claim_without_as_makes_the_signed_in_account_the_owner(world: World, idp: FakeIdP) -> None:
    """`referral-watch claim ID` without --as: the account `login` signed in (its username and
    name, read from the token cache without a network call)."""
    msal_world(world, idp)
    world.channels = {"owners": "mailto://127.0.0.1:9?from=rw@example.com&to=sales@example.com"}
    world.extra = '[claims]\nowner_channel = "owners"\n'
    assert login_subprocess(world).returncode == 0
    lead = world.add_lead(age=timedelta(hours=1), customer="Mine Ltd")
    assert world.cli("run", "--once").code == 0
    taken = world.cli("claim", lead)
    assert taken.code == 0, taken.err
    claimed_by = world.cli("status", "--json").json()[0]["claimed_by"]
    assert claimed_by["email"] == idp.username
    assert claimed_by["name"] == idp.name
