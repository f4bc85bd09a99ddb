"""10,000 anonymous /auth/login requests against the real daemon (issue 25 item 4): its memory
stays flat and the identity provider sees one OpenID discovery request, not one per request."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import World, free_port, wait_until
from fakeidp import FakeIdP


@pytest.fixture
def idp() -> Iterator[FakeIdP]:
    with FakeIdP(username="alice@contoso.example") as fake:
        yield fake


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def logins(port: int, count: int) -> dict[int, int]:
    """``count`` GET /auth/login on one kept-alive connection; status -> how many."""
    seen: dict[int, int] = {}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for _ in range(count):
            connection.request("GET", "/auth/login")
            response = connection.getresponse()
            response.read()
            seen[response.status] = seen.get(response.status, 0) + 1
    finally:
        connection.close()
    return seen


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ten_thousand_anonymous_sign_ins_cost_no_memory_and_one_discovery(
    world: World, idp: FakeIdP
) -> None:
    port = free_port()
    world.extra = f"""
[server]
listen = "127.0.0.1:{port}"
[console]
tenant_id = "{idp.tenant}"
client_id = "22222222-0000-0000-0000-000000000001"
client_secret = "console-secret"
authority = "{idp.url}"
allowed = ["contoso.example"]
session_secret = "{"0123456789abcdef" * 4}"
"""
    with world.daemon(env={"REQUESTS_CA_BUNDLE": str(idp.ca_path)}) as daemon:
        wait_until(lambda: _listening(port), what="the web server")
        warm = logins(port, 500)
        assert warm.get(303, 0) >= 1  # sign-ins start (then the address is limited)
        before = rss_kib(daemon.process.pid)
        flood = logins(port, 10_000)
        after = rss_kib(daemon.process.pid)
    assert set(flood) <= {303, 429}
    assert len(idp.discovery_requests()) == 1
    assert after - before < 4 * 1024, f"grew {after - before} KiB over 10,000 sign-in starts"


def _listening(port: int) -> bool:
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        connection.request("GET", "/healthz")
        connection.getresponse().read()
        connection.close()
        return True
    except OSError:
        return False
