"""One GET of the Partner Center API, read whole within bounds: retries (stamina: backoff,
Retry-After, a time cap), one fresh token on 401, the body inflated step by step within PAGE_LIMIT
and the poll's deadline, and every failure as AuthError or ApiError with the token scrubbed.

Where the transport is ours (connection.KeptAlive: no proxy), a GET goes straight to it as text
(the path and query, the headers) and comes back as an Answer: a poll of 200 pages then makes no
httpx Request, Response or URL on its way, which cost it about 0.2 ms of CPU a page. The
httpx.Response the rules for anything but a plain success read (error codes, Retry-After, a
redirect's Location) is made from the Answer when one is asked for. Through a proxy (httpx's own
transport), or a transport given by a test, the same rules run on httpx's requests.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from functools import cached_property
from typing import Any
from urllib.parse import unquote

import httpx
import stamina
import structlog

from referral_watch.config import PartnerCenterConfig, format_duration
from referral_watch.errors import ApiError, AuthError
from referral_watch.partner_center.auth import TokenProvider
from referral_watch.partner_center.connection import Ahead, Body, KeptAlive
from referral_watch.partner_center.responses import (
    RetryHook,
    Transient,
    describe,
    error_code,
    error_message,
    forbidden,
    inflated,
    port_of,
    refused,
    retry_after,
)
from referral_watch.redact import scrub

log = structlog.get_logger(__name__)

RETRY_STATUSES = frozenset({429, 502, 503, 504})
BACKOFF_START = 1.0
BACKOFF_CAP = 30.0
# One request's whole time, retries and their waits included (SPEC 0 alone would allow
# 4 x 120 s of Retry-After): then the poll fails, and the next cycle tries again.
REQUEST_TIME_CAP = 180.0
# A page (decoded: a gzip bomb counts what it inflates to) larger than this fails the poll.
PAGE_LIMIT = 16 * 1024 * 1024
# Headers about the body as sent, not as read (inflated, whole).
_FRAMING = frozenset({"content-encoding", "content-length", "transfer-encoding"})


class Answer:
    """A GET's answer with its whole body read (inflated): what a poll needs of a page (status,
    a header, the body), and the httpx.Response, made on first use, that the rules for anything
    else read."""

    def __init__(
        self,
        url: str,
        status_code: int,
        reason: str,
        headers: list[tuple[str, str]],
        content: bytes,
    ) -> None:
        self.url = url  # as asked for: scheme://host[:port]/path?query
        self.status_code = status_code
        self.reason = reason  # the server's reason phrase
        self.headers = headers  # as received
        self.content = content

    def header(self, name: str) -> str | None:
        return _header(self.headers, name)

    def json(self) -> Any:
        return json.loads(self.content)  # what httpx.Response.json() does

    @cached_property
    def response(self) -> httpx.Response:
        headers = [(key, value) for key, value in self.headers if key.lower() not in _FRAMING]
        return httpx.Response(
            self.status_code,
            headers=headers,
            content=self.content,
            request=httpx.Request("GET", self.url),
        )


class _Head:
    """An answer's status and headers, its body still to read (raw: maybe compressed), from
    either transport."""

    def __init__(
        self,
        status: int,
        reason: str,
        headers: list[tuple[str, str]],
        encoding: str,
        chunks: Iterable[bytes],
        close: Callable[[], None],
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.encoding = encoding  # Content-Encoding, "identity" when absent
        self.chunks = chunks
        self.close = close


class Reader:
    """The GETs of one PartnerCenter client: ``begin`` a poll (or a lookup), then ``request``
    each URL (text, on the base URL's scheme, host and port) and ``checked`` its answer."""

    def __init__(
        self,
        config: PartnerCenterConfig,
        tokens: TokenProvider,
        client: httpx.Client,
        transport: httpx.BaseTransport | None,
        max_retries: int,
    ) -> None:
        self._config = config
        self._tokens = tokens
        self._client = client
        self._transport = transport
        self._max_retries = max_retries
        self.token: str | None = None  # fetched per poll; providers cache and refresh it
        self.deadline = float("inf")  # monotonic time the current poll must end by
        base = httpx.URL(config.base_url.rstrip("/"))
        self.origin = f"{base.scheme}://{base.netloc.decode('ascii')}"
        # Ours, spoken to directly: the connection's key and what httpx would send every time
        # (Host, Connection, Accept, Accept-Encoding, User-Agent, in its order) and its timeouts.
        self._ours = transport if isinstance(transport, KeptAlive) and not base.userinfo else None
        self._key = (base.scheme, base.host, port_of(base))
        fixed = client.build_request("GET", base)
        self._fixed = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in fixed.headers.raw]
        self._timeouts: dict[str, float | None] = fixed.extensions["timeout"]
        self._ahead: Ahead | None = None  # a GET already sent, its answer not yet read
        self._debug = False  # whether api.response lines are written (see begin)

    def begin(self) -> None:
        """A poll (or a lookup) starts: its deadline, and the token it sends."""
        self.drop_ahead()
        self.deadline = time.monotonic() + self._config.poll_timeout.total_seconds()
        self.token = self._tokens.get_token()
        # Asked once here: each call of a module's logger costs a bind (a few µs a page).
        self._debug = log.is_enabled_for(logging.DEBUG)

    def ahead(self, url: str, correlation: str) -> None:
        """Ask for ``url`` now, its answer read by the next ``request`` of it (that request's
        first attempt): a poll's next page is on its way while the page before it is handed
        over. Only on our own connections; elsewhere the GET goes when it is asked for."""
        self.drop_ahead()
        if self._ours is not None and (wire := self._on_ours(url, correlation)) is not None:
            target, headers = wire
            self._ahead = self._ours.ahead(self._key, target, headers, self._timeouts)

    def drop_ahead(self) -> None:
        """A GET sent ahead and not wanted after all: its connection goes, unread."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.close()

    def request(self, url: str, correlation: str) -> Answer:
        """Send a GET, retrying transient failures; on 401 one fresh token and one more try
        (outside the retries: a revoked token is not a transient failure)."""
        answer = self._retried(url, correlation)
        if answer.status_code == 401:
            self.token = self._tokens.get_token(force_refresh=True)
            answer = self._retried(url, correlation)
        return answer

    def _retried(self, url: str, correlation: str) -> Answer:
        """SPEC 0 with stamina: up to max_retries more attempts, exponential backoff from 1 s
        capped at 30 s with jitter, Retry-After honoured (up to 120 s), and the whole at most
        REQUEST_TIME_CAP (and never past the poll's deadline).

        The first attempt is made before stamina's retry context is entered (most succeed, and
        the context costs ~20 µs a page); a failure is handed to the context as its first
        attempt's, so the waits, the attempts and stamina's retry hooks are what they would be
        with every attempt inside it."""
        started = time.monotonic()
        budget = min(REQUEST_TIME_CAP, self.deadline - started)
        if budget <= 0:
            raise self.out_of_time()
        try:
            return self._attempt(url, correlation)
        except Transient as exc:
            failed: Transient | None = exc
        attempts = 1
        # stamina times from its context's start (never 0: it warns that nothing is retried)
        left = max(budget - (time.monotonic() - started), 1e-6)
        try:
            for attempt in stamina.retry_context(
                on=RetryHook(started, budget),
                attempts=self._max_retries + 1,
                timeout=left,
                wait_initial=BACKOFF_START,
                wait_max=BACKOFF_CAP,
                wait_jitter=BACKOFF_START,
            ):
                with attempt:
                    if failed is not None:  # the first attempt's, for stamina to act on
                        first, failed = failed, None
                        raise first
                    attempts += 1
                    return self._attempt(url, correlation)
        except Transient as exc:
            where = httpx.URL(url)
            at = f"{where.scheme}://{where.netloc.decode('ascii', 'replace')}{where.path}"
            tries = f"{attempts} attempt" + ("s" if attempts != 1 else "")
            raise ApiError(
                f"Partner Center at {at} did not answer after {tries}: {exc}",
                status=exc.status,
                retryable=True,
            ) from None
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _attempt(self, url: str, correlation: str) -> Answer:
        """One GET, its body read within the poll's deadline and PAGE_LIMIT; a transient
        failure raises Transient (retried), a limit ApiError (not)."""
        try:
            head = self._sent(url, correlation)
        except httpx.TransportError as exc:
            raise Transient(self.scrub(describe(exc)), refused=refused(exc)) from None
        try:
            if self._debug:
                log.debug(
                    "api.response",
                    status=head.status,
                    path=self._path_of(url),
                    request_id=_header(head.headers, "Request-ID"),
                )
            content = self._body(head, url)
        except httpx.TransportError as exc:  # cut off, or a read timed out, mid-body
            raise Transient(self.scrub(describe(exc))) from None
        finally:
            head.close()
        answer = Answer(url, head.status, head.reason, head.headers, content)
        if head.status in RETRY_STATUSES:
            code = error_code(answer.response)
            raise Transient(
                f"{head.status} {code or head.reason}",
                status=head.status,
                retry_after=retry_after(answer.response),
            )
        return answer

    def _sent(self, url: str, correlation: str) -> _Head:
        """The GET sent, its answer's head read. To our transport directly where the URL is on
        the base URL's origin (every URL of a poll is); else through httpx's models."""
        if self._ours is not None and (wire := self._on_ours(url, correlation)) is not None:
            target, headers = wire
            ahead, self._ahead = self._ahead, None  # (sent for another URL: dropped by send)
            body = self._ours.send(
                self._key, "GET", target, headers, None, self._timeouts, ahead=ahead
            )
            return _lean_head(body)
        self.drop_ahead()
        request = self._client.build_request("GET", url, headers=self._headers(correlation))
        if self._transport is None:
            response = self._client.send(request, stream=True)
        else:
            # httpx's client layers (auth, redirects, cookies, event hooks) have nothing to do
            # for these requests: straight to the transport.
            response = self._transport.handle_request(request)
            response.request = request
        return _httpx_head(response)

    def _on_ours(self, url: str, correlation: str) -> tuple[str, list[tuple[str, str]]] | None:
        """(the target, the headers) of a GET of ``url`` on our connections as text, or None
        where it goes through httpx: a URL off the base URL's origin (no URL of a poll is),
        or a token httpx would refuse (as it always has)."""
        if not url.startswith(self.origin + "/") or not (self.token or "").isascii():
            return None
        return url[len(self.origin) :], [*self._fixed, *self._headers(correlation).items()]

    def _body(self, head: _Head, url: str) -> bytes:
        """The whole body: inflated step by step, counted as it arrives, within the poll's
        deadline (a server sending a byte now and then cannot hold a poll for ever) and
        PAGE_LIMIT."""
        chunks: list[bytes] = []
        size = 0
        for chunk in inflated(head.encoding, head.chunks):
            size += len(chunk)
            if size > PAGE_LIMIT:
                raise ApiError(
                    f"Partner Center sent an answer over {PAGE_LIMIT // (1024 * 1024)} MiB "
                    f"({self._path_of(url)}); the poll is incomplete",
                    status=head.status,
                    code="answerTooLarge",
                )
            if time.monotonic() > self.deadline:
                raise self.out_of_time()
            chunks.append(chunk)
        return b"".join(chunks)

    def _headers(self, correlation: str) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self.token}",
            "MS-CorrelationId": correlation,
            "MS-RequestId": str(uuid.uuid4()),
        }

    def checked(self, answer: Answer, *, page: int | None) -> Answer:
        """The answer if it is a success, else the matching AuthError or ApiError."""
        status = answer.status_code
        if 200 <= status < 300:
            return answer
        response = answer.response
        code = error_code(response)
        detail = self.scrub(error_message(response))
        if status == 401:
            raise AuthError(
                "Partner Center rejected the token (401 unauthenticated): check that the "
                "signed-in account belongs to the partner's tenant and that the app registration "
                "has the delegated permission of the Microsoft Partner API (4990cffe-04e8-4e8b-"
                f"808a-1175604b879f, not Microsoft Partner Center); {renew_hint(self._tokens)}",
                needs_login=True,
            )
        if status == 403:
            raise forbidden(response, code, detail)
        where = f" (page {page + 1})" if page is not None else ""
        if 300 <= status < 400:
            reason = f"unexpected redirect to {response.headers.get('Location', '?')}"
        else:
            reason = ": ".join(p for p in (code, detail) if p) or response.reason_phrase
        if status == 404 and page == 0:
            reason += (
                f"; {response.request.url.copy_with(query=None)} does not exist: check "
                "partner_center.base_url (Partner Center's is https://api.partner.microsoft.com"
                "/v1.0, with the /v1.0)"
            )
        elif status == 404 and page is not None:
            reason += (
                f"; Partner Center's next-page link {response.request.url.copy_with(query=None)}"
                " does not exist, nor does its query on the list path; the poll is incomplete"
            )
        raise ApiError(
            self.scrub(f"Partner Center answered {status}{where}: {reason}"),
            status=status,
            code=code,
            retryable=status >= 500,
        )

    def out_of_time(self) -> ApiError:
        limit = format_duration(self._config.poll_timeout)
        return ApiError(
            f"the poll took longer than partner_center.poll_timeout ({limit}): Partner Center "
            "answers too slowly (or without end); the poll is incomplete",
            code="pollTimeout",
        )

    def _path_of(self, url: str) -> str:
        """The URL's path, decoded: what httpx.URL(url).path is, without parsing a poll's URLs
        (on the base's origin, in httpx's form already)."""
        if url.startswith(self.origin + "/"):
            return unquote(url[len(self.origin) :].partition("?")[0])
        return httpx.URL(url).path

    def scrub(self, text: str) -> str:
        """Never repeat the token, whatever a server or library put in a message."""
        return scrub(text, [self.token] if self.token else [])


def renew_hint(tokens: TokenProvider) -> str:
    """What renews the credentials: each provider knows (login, a variable, a program)."""
    return str(getattr(tokens, "renew_hint", "run `referral-watch login` if needed"))


def _lean_head(body: Body) -> _Head:
    answer = body.answer
    return _Head(
        answer.status,
        # as httpx would show it (its reason_phrase): ASCII
        answer.reason.encode("latin-1", "replace").decode("ascii", "ignore"),
        answer.getheaders(),
        (answer.getheader("Content-Encoding") or "identity").strip().lower(),
        body,
        body.close,
    )


def _httpx_head(response: httpx.Response) -> _Head:
    chunks: Iterable[bytes]
    if response.is_stream_consumed:  # read already (a transport that answers in memory)
        encoding, chunks = "identity", [response.content]
    else:
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        chunks = response.iter_raw()
    return _Head(
        response.status_code,
        response.reason_phrase,
        response.headers.multi_items(),
        encoding,
        chunks,
        response.close,
    )


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    wanted = name.lower()
    values = [value for key, value in headers if key.lower() == wanted]
    return ", ".join(values) if values else None
