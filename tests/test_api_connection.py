"""The API's connections (partner_center/connection.py): a poll's pages on one kept-alive
connection, TLS verified as httpx would verify it, a connection the server closed while idle
replaced without a failed request, and a proxy named in the environment used."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import stamina
import trustme

from referral_watch.config import PartnerCenterConfig
from referral_watch.errors import ApiError
from referral_watch.partner_center.client import PartnerCenter
from referral_watch.sandbox.records import make_referral
from referral_watch.sandbox.server import Sandbox

NOW = datetime.now(UTC)
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


class Tokens:
    def get_token(self, force_refresh: bool = False) -> str:
        return "sandbox-token"


def lead(n: int) -> dict[str, Any]:
    return make_referral(id=f"lead-{n:03d}", created=NOW - timedelta(minutes=n))


def client(base_url: str) -> PartnerCenter:
    return PartnerCenter(PartnerCenterConfig(base_url=base_url, page_size=100), Tokens())


def lead_ids(api: PartnerCenter) -> list[str]:
    return [record["id"] for page in api.pages() for record in page.records]


@pytest.fixture(autouse=True)
def no_proxy_and_no_waiting(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """No proxy from the machine's environment; stamina retries without waiting, and the
    retries it makes are listed."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    retried: list[Any] = []
    stamina.instrumentation.set_on_retry_hooks([lambda details: retried.append(details)])
    with stamina.set_testing(True, attempts=3):
        yield retried
    stamina.instrumentation.set_on_retry_hooks(None)


def connections_to(sandbox: Sandbox) -> list[Any]:
    """The connections the sandbox accepts from now on (their client addresses)."""
    accepted: list[Any] = []
    server: Any = sandbox._server
    handle = server.process_request

    def counted(request: Any, address: Any) -> None:
        accepted.append(address)
        handle(request, address)

    server.process_request = counted
    return accepted


def test_a_poll_over_tls_reads_every_page_on_one_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_proxy_and_no_waiting: list[Any]
) -> None:
    with Sandbox([lead(n) for n in range(250)], tls=True) as sandbox:
        ca = tmp_path / "ca.pem"
        ca.write_bytes(sandbox.tls_ca_pem)
        monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # as httpx reads it
        accepted = connections_to(sandbox)
        with client(sandbox.base_url) as api:
            assert len(lead_ids(api)) == 250  # three pages
            assert len(lead_ids(api)) == 250  # and a second poll
        assert len(accepted) == 1  # one TLS handshake for six requests
        assert no_proxy_and_no_waiting == []


def test_a_certificate_nobody_trusts_fails_the_poll_saying_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stranger = tmp_path / "other-ca.pem"
    stranger.write_bytes(trustme.CA().cert_pem.bytes())
    monkeypatch.setenv("SSL_CERT_FILE", str(stranger))
    with Sandbox([lead(1)], tls=True) as sandbox, client(sandbox.base_url) as api:
        with pytest.raises(ApiError, match="certificate verify failed"):
            lead_ids(api)
        assert not [r for r in sandbox.requests if r.path.endswith("/referrals")]


def test_a_cookie_partner_center_sets_is_never_sent_back() -> None:
    with Sandbox([lead(1)]) as sandbox, client(sandbox.base_url) as api:
        sticky = {"Set-Cookie": "ARRAffinity=sticky; Path=/"}
        sandbox.fail(0, on="item", body=json.dumps(lead(1)).encode(), headers=sticky)
        assert api.current("lead-001") is not None  # (the answering path's read)
        assert api.current("lead-001") is not None
        assert lead_ids(api) == ["lead-001"]
    assert len(sandbox.requests) == 3
    assert [r.headers.get("Cookie") for r in sandbox.requests] == [None, None, None]


class _ClosingServer(ThreadingHTTPServer):
    """Answers every request as keep-alive, then closes the connection anyway (what a load
    balancer does to a connection idle for too long)."""

    daemon_threads = True
    block_on_close = False


class _Closing(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    served: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.served.append(self.path)
        body = json.dumps(lead(len(self.served))).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True  # without saying "Connection: close"

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def closing_server() -> Iterator[str]:
    server = _ClosingServer(("127.0.0.1", 0), _Closing)
    _Closing.served = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1.0"
    server.shutdown()
    server.server_close()
    thread.join()


def test_a_connection_the_server_closed_while_idle_is_replaced_not_failed(
    closing_server: str, no_proxy_and_no_waiting: list[Any]
) -> None:
    with client(closing_server) as api:
        first = api.get("lead-001")
        second = api.get("lead-002")
    assert first is not None and second is not None
    assert len(_Closing.served) == 2  # each asked once
    assert no_proxy_and_no_waiting == []  # and nothing waited for a retry


class _Proxy(BaseHTTPRequestHandler):
    """An HTTP proxy that answers for the API itself: it records the absolute URLs asked for."""

    protocol_version = "HTTP/1.1"
    asked: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.asked.append(self.path)
        body = b'{"value": []}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_proxy_named_in_the_environment_carries_the_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    _Proxy.asked = []
    thread = threading.Thread(target=proxy.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_address[1]}")
        with socket.socket() as unused:  # an API address nothing listens on: only the proxy
            unused.bind(("127.0.0.1", 0))
            api_url = f"http://127.0.0.1:{unused.getsockname()[1]}/v1.0"
            with client(api_url) as api:
                assert lead_ids(api) == []
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join()
    assert len(_Proxy.asked) == 1
    assert _Proxy.asked[0].startswith(f"{api_url}/engagements/referrals?")
