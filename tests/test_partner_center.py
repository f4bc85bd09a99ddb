"""The Partner Center client over real HTTP against the sandbox (MockTransport where noted)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
import stamina

from referral_watch import __version__
from referral_watch.config import PartnerCenterConfig
from referral_watch.errors import ApiError, AuthError
from referral_watch.partner_center.client import REQUEST_TIME_CAP, Page, PartnerCenter
from referral_watch.partner_center.responses import RetryHook
from referral_watch.sandbox.records import make_referral
from referral_watch.sandbox.server import Sandbox

NOW = datetime(2024, 5, 6, 12, 0, tzinfo=UTC)
TOKEN = "sandbox-token"


class Tokens:
    """A token provider handing out the given tokens; force_refresh moves to the next one."""

    def __init__(self, *tokens: str) -> None:
        self.tokens = list(tokens or [TOKEN])
        self.calls: list[bool] = []

    def get_token(self, *, force_refresh: bool = False) -> str:
        self.calls.append(force_refresh)
        if force_refresh and len(self.tokens) > 1:
            self.tokens.pop(0)
        return self.tokens[0]


def lead(n: int, **fields: Any) -> dict[str, Any]:
    return make_referral(id=f"lead-{n:03d}", created=NOW - timedelta(minutes=n), **fields)


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox() as running:
        yield running


Connect = Callable[..., PartnerCenter]


@pytest.fixture(autouse=True)
def no_waiting() -> Iterator[None]:
    """stamina's test mode: every retry happens, none waits (our attempts still count)."""
    with stamina.set_testing(True, attempts=100, cap=True):
        yield


@pytest.fixture
def retries() -> Iterator[list[Any]]:
    """The failures each retry was scheduled for (stamina's instrumentation), in order."""
    seen: list[Any] = []
    stamina.instrumentation.set_on_retry_hooks([lambda details: seen.append(details.caused_by)])
    yield seen
    stamina.instrumentation.set_on_retry_hooks(None)


@pytest.fixture
def connect(sandbox: Sandbox) -> Iterator[Connect]:
    """connect(tokens=..., **config) -> a PartnerCenter on the sandbox."""
    clients: list[PartnerCenter] = []

    def make(tokens: Tokens | None = None, max_retries: int = 4, **config: Any) -> PartnerCenter:
        settings = PartnerCenterConfig(**{"base_url": sandbox.base_url, **config})
        client = PartnerCenter(settings, tokens or Tokens(), max_retries=max_retries)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def poll(client: PartnerCenter) -> list[Page]:
    return list(client.pages())


def ids(pages: list[Page]) -> list[str]:
    return [record["id"] for page in pages for record in page.records]


def list_requests(sandbox: Sandbox) -> list[Any]:
    return [r for r in sandbox.requests if r.path.endswith("/referrals")]


# --- paging, filter, order, headers ------------------------------------------------------------


def test_every_page_is_read_once_newest_first(sandbox: Sandbox, connect: Connect) -> None:
    sandbox.add(*(lead(n) for n in reversed(range(250))))  # stored oldest first
    pages = poll(connect(page_size=100))
    assert [(p.number, len(p.records)) for p in pages] == [(0, 100), (1, 100), (2, 50)]
    assert ids(pages) == [f"lead-{n:03d}" for n in range(250)]
    assert all(p.request_id for p in pages)
    first, *rest = list_requests(sandbox)
    assert len(rest) == 2
    assert first.path == "/v1.0/engagements/referrals"
    assert first.query == {
        "$filter": "direction eq 'Incoming' and substatus eq 'Pending'",
        "$orderby": "createdDateTime desc",
        "$top": "100",
    }
    assert all(r.path == "/v1.0/referrals" and list(r.query) == ["$skiptoken"] for r in rest)


def test_the_default_filter_leaves_out_outgoing_and_answered_referrals(
    sandbox: Sandbox, connect: Connect
) -> None:
    sandbox.add(
        lead(1),
        lead(2, direction="Outgoing"),
        lead(3, substatus="Accepted", status="Active"),
        lead(4, substatus="Expired", status="Closed"),
        lead(5),
    )
    assert ids(poll(connect())) == ["lead-001", "lead-005"]


def test_a_configured_filter_with_a_lambda_is_honoured(sandbox: Sandbox, connect: Connect) -> None:
    sandbox.add(
        lead(1, team=[{"email": "ann@contoso.example"}]),
        lead(2, team=[{"email": "bob@contoso.example"}]),
        lead(3, team=[{"email": "ann@contoso.example"}], country="NL"),
    )
    client = connect(
        filter="team/any(t:t/email eq 'ann@contoso.example') and "
        "customerProfile/address/country eq 'US'"
    )
    assert ids(poll(client)) == ["lead-001"]


def test_an_empty_result_is_one_empty_page(connect: Connect) -> None:
    pages = poll(connect())
    assert [(p.number, p.records) for p in pages] == [(0, [])]


def test_one_correlation_id_per_poll_and_a_fresh_request_id_per_request(
    sandbox: Sandbox, connect: Connect
) -> None:
    sandbox.add(*(lead(n) for n in range(30)))
    client = connect(page_size=10)
    poll(client)
    poll(client)
    requests = list_requests(sandbox)
    assert len(requests) == 6
    correlations = [r.headers["MS-CorrelationId"] for r in requests]
    assert len(set(correlations[:3])) == 1 and len(set(correlations[3:])) == 1
    assert correlations[0] != correlations[3]
    assert len({r.headers["MS-RequestId"] for r in requests}) == 6
    for request in requests:
        assert request.headers["Authorization"] == f"Bearer {TOKEN}"
        assert request.headers["Accept"] == "application/json"
        assert request.headers["User-Agent"] == f"referral-watch/{__version__}"


# --- get -----------------------------------------------------------------------------------------


def test_get_returns_the_record_in_any_status_or_none_when_gone(
    sandbox: Sandbox, connect: Connect
) -> None:
    sandbox.add(lead(1, substatus="Declined", status="Closed"))
    client = connect()
    record = client.get("lead-001")
    assert record is not None
    assert (record["id"], record["substatus"]) == ("lead-001", "Declined")
    assert client.get("no-such-lead") is None
    sandbox.remove("lead-001")
    assert client.get("lead-001") is None
    assert sandbox.requests[-1].path == "/v1.0/engagements/referrals/lead-001"


def test_get_quotes_the_id_into_one_path_segment(sandbox: Sandbox, connect: Connect) -> None:
    assert connect().get("a/b c") is None
    assert sandbox.requests[-1].path == "/v1.0/engagements/referrals/a%2Fb%20c"


def test_get_retries_and_reports_errors_like_the_list(sandbox: Sandbox, connect: Connect) -> None:
    sandbox.add(lead(1))
    sandbox.fail(503, on="item", retry_after=3)
    assert connect().get("lead-001") is not None
    sandbox.fail(500, on="item")
    with pytest.raises(ApiError, match="500"):
        connect().get("lead-001")
    sandbox.fail(0, on="item", body=b"[1, 2]")
    with pytest.raises(ApiError, match="unreadable"):
        connect().get("lead-001")


# --- retries -------------------------------------------------------------------------------------


def test_retry_after_is_honoured(sandbox: Sandbox, connect: Connect, retries: list[Any]) -> None:
    sandbox.add(lead(1))
    sandbox.fail(429, retry_after=7)
    assert ids(poll(connect())) == ["lead-001"]
    assert [failure.retry_after for failure in retries] == [7]
    assert RetryHook(time.monotonic(), 180)(retries[0]) == 7  # the wait stamina is given


def test_retry_after_is_capped_at_two_minutes(
    sandbox: Sandbox, connect: Connect, retries: list[Any]
) -> None:
    sandbox.fail(503, retry_after=3600)
    poll(connect())
    assert [failure.retry_after for failure in retries] == [120]


def test_a_retry_after_beyond_the_request_time_cap_fails_at_once(
    sandbox: Sandbox, connect: Connect, retries: list[Any]
) -> None:
    sandbox.fail(503, retry_after=100, times=2)
    hook = RetryHook(time.monotonic() - 90, REQUEST_TIME_CAP)  # 90 s already spent
    with pytest.raises(ApiError, match="did not answer after 1 attempt: 503"):
        for _ in _retry_after_hook(connect(), hook):
            pass
    assert retries == []


def _retry_after_hook(client: PartnerCenter, hook: RetryHook) -> Iterator[Page]:
    import referral_watch.partner_center.reading as module

    real = module.RetryHook
    module.RetryHook = lambda started, budget: hook  # type: ignore[assignment, misc]
    try:
        yield from client.pages()
    finally:
        module.RetryHook = real  # type: ignore[misc]


@pytest.mark.parametrize("status", [502, 503, 504])
def test_a_transient_5xx_is_retried_then_the_poll_goes_on(
    sandbox: Sandbox, connect: Connect, retries: list[Any], status: int
) -> None:
    sandbox.add(*(lead(n) for n in range(3)))
    sandbox.fail(status, times=2, page=1)
    pages = poll(connect(page_size=1))
    assert ids(pages) == ["lead-000", "lead-001", "lead-002"]
    assert [failure.status for failure in retries] == [status, status]


def test_a_5xx_on_every_attempt_fails_the_poll_as_retryable(
    sandbox: Sandbox, connect: Connect, retries: list[Any]
) -> None:
    sandbox.fail(503, times=100)
    with pytest.raises(ApiError) as caught:
        poll(connect())
    error = caught.value
    assert error.retryable and error.status == 503
    assert "did not answer after 5 attempts: 503" in str(error)
    assert f"{sandbox.base_url}/engagements/referrals" in str(error)  # names where
    assert len(list_requests(sandbox)) == 5
    assert len(retries) == 4


def test_the_first_backoff_waits_a_second_or_two(sandbox: Sandbox, connect: Connect) -> None:
    """Outside stamina's test mode: the real wait before the first retry (SPEC 0: from 1 s,
    with jitter)."""
    waits: list[float] = []
    stamina.instrumentation.set_on_retry_hooks([lambda details: waits.append(details.wait_for)])
    sandbox.add(lead(1))
    sandbox.fail(502)
    try:
        with stamina.set_testing(False):
            assert ids(poll(connect())) == ["lead-001"]
    finally:
        stamina.instrumentation.set_on_retry_hooks(None)
    (wait,) = waits
    assert 1 <= wait <= 2


def test_a_truncated_answer_is_retried(
    sandbox: Sandbox, connect: Connect, retries: list[Any]
) -> None:
    sandbox.add(lead(1))
    sandbox.fail(200, truncate=True, body=b'{"value": []}')
    assert ids(poll(connect())) == ["lead-001"]
    assert len(retries) == 1


def test_a_timeout_is_retried_and_then_reported(sandbox: Sandbox, connect: Connect) -> None:
    sandbox.fail(503, hang=True)
    with pytest.raises(ApiError, match="after 1 attempt: timed out") as caught:
        poll(connect(timeout="1s", max_retries=0))
    assert caught.value.retryable


def _unused_port() -> int:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_unreachable_api_fails_retryable_naming_the_url(retries: list[Any]) -> None:
    base = f"http://127.0.0.1:{_unused_port()}/v1.0"
    client = PartnerCenter(PartnerCenterConfig(base_url=base), Tokens(), max_retries=2)
    with client, pytest.raises(ApiError, match="after 3 attempts: connection failed") as caught:
        poll(client)
    assert caught.value.retryable
    assert f"Partner Center at {base}/engagements/referrals did not answer" in str(caught.value)
    assert len(retries) == 2


def test_connection_refused_gives_up_after_a_few_seconds(retries: list[Any]) -> None:
    """Real waits: SPEC 0's retries for a connection error, stopped once they took
    CONNECT_RETRY_TIME (3 s), not the four retries (15 s and more) of a server error."""
    base = f"http://127.0.0.1:{_unused_port()}/v1.0"
    client = PartnerCenter(PartnerCenterConfig(base_url=base), Tokens())
    with client, stamina.set_testing(False), pytest.raises(ApiError) as caught:
        poll(client)
    assert 1 <= len(retries) <= 2  # not 4
    assert base in str(caught.value)


# --- auth ----------------------------------------------------------------------------------------


def test_401_refreshes_the_token_once_and_carries_on(sandbox: Sandbox, connect: Connect) -> None:
    sandbox.add(lead(1))
    sandbox.token = "fresh-token"  # the cached one was revoked
    tokens = Tokens("revoked-token", "fresh-token")
    assert ids(poll(connect(tokens=tokens))) == ["lead-001"]
    assert tokens.calls == [False, True]
    assert [r.headers["Authorization"] for r in sandbox.requests] == [
        "Bearer revoked-token",
        "Bearer fresh-token",
    ]


def test_401_after_a_refresh_asks_for_login(sandbox: Sandbox, connect: Connect) -> None:
    tokens = Tokens("bad-token-1", "bad-token-2")
    with pytest.raises(AuthError) as caught:
        poll(connect(tokens=tokens))
    error = caught.value
    assert error.needs_login
    assert "rejected the token (401 unauthenticated)" in str(error)
    assert "referral-watch login" in str(error)
    assert "bad-token" not in str(error)
    assert tokens.calls == [False, True]
    assert len(sandbox.requests) == 2


def test_a_provider_that_cannot_refresh_surfaces_its_auth_error(
    sandbox: Sandbox, connect: Connect
) -> None:
    class Expired(Tokens):
        def get_token(self, *, force_refresh: bool = False) -> str:
            if force_refresh:
                raise AuthError("sign-in expired: run `referral-watch login`", needs_login=True)
            return "stale"

    with pytest.raises(AuthError, match="sign-in expired"):
        poll(connect(tokens=Expired()))


def test_403_says_which_role_is_missing(sandbox: Sandbox, connect: Connect) -> None:
    sandbox.fail(403)
    with pytest.raises(AuthError) as caught:
        poll(connect())
    assert not caught.value.needs_login
    assert "Referral Admin" in str(caught.value)
    assert TOKEN not in str(caught.value)


def test_403_insufficient_claims_needs_a_new_sign_in(sandbox: Sandbox, connect: Connect) -> None:
    body = {"error": {"code": "insufficient_claims", "message": "Conditional Access policy"}}
    sandbox.fail(403, body=json.dumps(body).encode())
    with pytest.raises(AuthError, match="Conditional Access") as caught:
        poll(connect())
    assert caught.value.needs_login


# --- errors and unreadable pages -----------------------------------------------------------------


def test_a_bad_filter_reports_the_servers_code_and_message(connect: Connect) -> None:
    with pytest.raises(ApiError) as caught:
        poll(connect(filter="direction eq 'Incoming"))
    error = caught.value
    assert (error.status, error.code, error.retryable) == (400, "invalidRequest", False)
    assert "Partner Center answered 400 (page 1): invalidRequest: Invalid filter" in str(error)


@pytest.mark.parametrize(
    "body",
    [b'{"value": [{"id": ', b"<html>gateway</html>", b'{"items": []}', b'{"value": {}}', b"[]"],
)
def test_an_unreadable_page_fails_the_poll(
    sandbox: Sandbox, connect: Connect, retries: list[Any], body: bytes
) -> None:
    sandbox.fail(0, body=body)
    with pytest.raises(ApiError, match=r"unreadable page \(page 1\)"):
        poll(connect())
    assert retries == []


def test_a_failure_on_a_later_page_ends_the_poll_after_the_pages_before(
    sandbox: Sandbox, connect: Connect
) -> None:
    sandbox.add(*(lead(n) for n in range(3)))
    # a nextLink that 404s (as seen on a sibling API), and so does its query on the list path
    sandbox.fail(404, page=1, times=2)
    pages = connect(page_size=1).pages()
    assert ids([next(pages)]) == ["lead-000"]
    with pytest.raises(ApiError, match=r"answered 404 \(page 2\): itemNotFound") as caught:
        next(pages)
    assert caught.value.status == 404
    assert "base_url" not in str(caught.value)  # the base URL answered page 1: not to blame
    assert "next-page link" in str(caught.value)


def test_a_documented_next_link_that_404s_is_read_on_the_list_path_for_the_rest_of_the_poll(
    connect: Connect, capsys: pytest.CaptureFixture[str]
) -> None:
    """SPEC 12: Microsoft's sample nextLink is /v1.0/referrals?$skiptoken=...; where that path
    404s, the same query on the list path, once, and then that path for every later page."""
    with Sandbox(documented_next_path=False) as strict:
        strict.add(*(lead(n) for n in range(4)))
        client = connect(page_size=1, base_url=strict.base_url)
        assert ids(poll(client)) == ["lead-000", "lead-001", "lead-002", "lead-003"]
        paths = [r.path for r in strict.requests]
    assert paths == [
        "/v1.0/engagements/referrals",
        "/v1.0/referrals",  # the documented nextLink: 404
        "/v1.0/engagements/referrals",  # its query on the list path
        "/v1.0/engagements/referrals",  # later pages go there at once
        "/v1.0/engagements/referrals",
    ]
    assert capsys.readouterr().out.count("api.next_link_moved") == 1  # logged once


# --- token safety (SPEC 12) ----------------------------------------------------------------------


def test_a_next_link_to_another_host_never_gets_the_token(
    sandbox: Sandbox, connect: Connect
) -> None:
    sandbox.add(lead(1), lead(2))
    with Sandbox(token=None) as foreign:
        sandbox.next_link_base = foreign.base_url
        with pytest.raises(ApiError) as caught:
            poll(connect(page_size=1))
        assert foreign.requests == []
    error = caught.value
    assert not error.retryable
    assert f"another host (127.0.0.1:{foreign.port})" in str(error)
    assert len(sandbox.requests) == 1  # the first page only


def test_a_next_link_naming_the_api_host_differently_is_refused(
    sandbox: Sandbox, connect: Connect
) -> None:
    sandbox.add(lead(1), lead(2))
    sandbox.next_link_base = f"http://localhost:{sandbox.port}/v1.0"  # may well be this server
    with pytest.raises(ApiError, match=f"another host \\(localhost:{sandbox.port}\\)"):
        poll(connect(page_size=1))
    assert len(sandbox.requests) == 1


class FakeApi:
    """A MockTransport handler serving page bodies by call order, recording every request."""

    def __init__(self, *bodies: dict[str, Any]) -> None:
        self.bodies = list(bodies)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        body = self.bodies[min(len(self.requests), len(self.bodies)) - 1]
        return httpx.Response(200, json=body, headers={"Request-ID": f"r{len(self.requests)}"})


def mock_client(api: FakeApi, base_url: str = "https://api.example.test/v1.0") -> PartnerCenter:
    config = PartnerCenterConfig(base_url=base_url)
    return PartnerCenter(config, Tokens(), transport=httpx.MockTransport(api))


def test_an_http_next_link_on_the_api_host_is_followed_over_https() -> None:
    api = FakeApi(
        {
            "value": [{"id": "a"}],
            "@odata.nextLink": "http://api.example.test/v1.0/referrals?"
            "$skiptoken=k181pEdP0ykypkieJfcxX%3D",
        },
        {"value": [{"id": "b"}]},
    )
    with mock_client(api) as client:
        pages = poll(client)
    assert ids(pages) == ["a", "b"]
    assert [p.request_id for p in pages] == ["r1", "r2"]
    second = api.requests[1]
    assert second.url.scheme == "https"
    assert second.url.host == "api.example.test"
    assert second.url.port is None  # 443, not the link's implied 80
    assert second.url.raw_path == b"/v1.0/referrals?$skiptoken=k181pEdP0ykypkieJfcxX%3D"
    assert second.headers["Authorization"] == f"Bearer {TOKEN}"


def test_a_next_link_on_another_port_of_the_api_host_is_refused() -> None:
    api = FakeApi({"value": [], "@odata.nextLink": "https://api.example.test:8443/v1.0/referrals"})
    with mock_client(api) as client, pytest.raises(ApiError, match=r"api\.example\.test:8443"):
        poll(client)
    assert len(api.requests) == 1


def test_a_next_link_loop_is_refused() -> None:
    link = "https://api.example.test/v1.0/referrals?$skiptoken=again"
    api = FakeApi({"value": [{"id": "a"}], "@odata.nextLink": link})
    with mock_client(api) as client, pytest.raises(ApiError, match="paging loop"):
        poll(client)
    assert len(api.requests) == 2  # the first page, and the link once


def test_a_retry_after_date_is_turned_into_seconds(retries: list[Any]) -> None:
    later = format_datetime(datetime.now(UTC) + timedelta(hours=1), usegmt=True)
    answers = iter(
        [
            httpx.Response(503, headers={"Retry-After": later}),
            httpx.Response(503, headers={"Retry-After": "soon"}),  # unreadable: backoff
            httpx.Response(200, json={"value": []}),
        ]
    )
    config = PartnerCenterConfig(base_url="https://api.example.test/v1.0")
    transport = httpx.MockTransport(lambda request: next(answers))
    with PartnerCenter(config, Tokens(), transport=transport) as client:
        poll(client)
    assert [failure.retry_after for failure in retries] == [120, None]  # an hour: capped
