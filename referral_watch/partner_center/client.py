"""The Partner Center Referrals API over httpx: paging, retries, Retry-After and token safety.

Every failure leaves this module as AuthError or ApiError; a failure on any page ends ``pages()``
with that error, so the caller knows the poll is incomplete and concludes nothing from absence.
The bearer token is only ever sent to the configured base URL's host and port (SPEC 12).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from http.cookiejar import CookieJar, DefaultCookiePolicy
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx
import stamina
import structlog

from referral_watch import __version__
from referral_watch.config import PartnerCenterConfig, format_duration
from referral_watch.errors import ApiError, AuthError
from referral_watch.model import record_digest
from referral_watch.partner_center import connection
from referral_watch.partner_center.auth import TokenProvider
from referral_watch.partner_center.responses import (
    RetryHook,
    Transient,
    decoded_item,
    describe,
    error_code,
    error_message,
    forbidden,
    inflated,
    port_of,
    read_page,
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
# A poll reading more pages than this is following a chain without end.
MAX_PAGES = 5000
# A page (decoded: a gzip bomb counts what it inflates to) larger than this fails the poll.
PAGE_LIMIT = 16 * 1024 * 1024
ORDER_BY = "createdDateTime desc"


class Page:
    """One page of a poll: its `value` items' JSON exactly as served, undecoded. ``raw(i)`` is
    an item's bytes (what the cycle digests to recognise a record unchanged since the last
    poll: such a record is never decoded), ``text(i)`` its text, ``record(i)`` the decoded
    item. Decoding happens on first use, in the caller's thread, not the fetching one."""

    def __init__(self, items: Sequence[Any], number: int, request_id: str | None) -> None:
        self._items = items  # str, bytes or msgspec.Raw (a view of the page's body)
        self.number = number  # 0-based
        self.request_id = request_id  # the server's Request-ID, for support cases

    def __len__(self) -> int:
        return len(self._items)

    def raw(self, index: int) -> bytes | memoryview:
        """The item's JSON as served (UTF-8 bytes, or a view of them): no copy, no decoding."""
        item = self._items[index]
        return item.encode("utf-8", "surrogatepass") if isinstance(item, str) else memoryview(item)

    def text(self, index: int) -> str:
        """The item's JSON text; ValueError (UnicodeDecodeError) when it is not UTF-8."""
        item = self._items[index]
        return item if isinstance(item, str) else bytes(item).decode("utf-8")

    @cached_property
    def digests(self) -> list[str]:
        """Each item's ``model.record_digest`` (of its bytes as served), the page at once."""
        return [record_digest(item) for item in self._items]  # str, bytes or a buffer

    @cached_property
    def texts(self) -> list[str]:
        return [self.text(index) for index in range(len(self._items))]

    @cached_property
    def records(self) -> list[Any]:
        """The raw `value` items; parsing them is the caller's business."""
        return [self.record(index) for index in range(len(self._items))]

    def record(self, index: int) -> Any:
        return decoded_item(self._items[index])


@dataclass(frozen=True)
class Patched:
    """A successful PATCH: the updated record (when Partner Center returned it) and the
    server's Request-ID, kept in the audit for support cases."""

    record: dict[str, Any] | None
    request_id: str | None


class AnswerError(ApiError):
    """An answer Partner Center refused (412 changed meanwhile, 403 role missing, 404 ...)."""

    def __init__(
        self, message: str, *, status: int, code: str | None, request_id: str | None
    ) -> None:
        super().__init__(message, status=status, code=code)
        self.request_id = request_id


class PartnerCenter:
    """A client for one configured Partner Center; use as a context manager or call close()."""

    def __init__(
        self,
        config: PartnerCenterConfig,
        tokens: TokenProvider,
        *,
        transport: httpx.BaseTransport | None = None,
        max_retries: int = 4,
        max_pages: int | None = None,
    ) -> None:
        self._config = config
        self._tokens = tokens
        self._max_retries = max_retries
        self._max_pages = MAX_PAGES if max_pages is None else max_pages
        self._base = httpx.URL(config.base_url.rstrip("/"))
        self._token: str | None = None  # fetched per poll; providers cache and refresh it
        self._deadline = float("inf")  # monotonic time the current poll must end by
        # The API's connections: ours (http.client, kept alive), or httpx's own where the
        # environment names a proxy (None): see connection.py.
        self._transport = transport or connection.for_environment()
        self._client = httpx.Client(
            transport=self._transport,
            # No cookies kept: the API is stateless (a bearer token and the nextLink carry all),
            # and the poll's requests go straight to the transport, past httpx's cookie jar.
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
            # connect, each read, each write: a silent server fails after `timeout`; one that
            # dribbles is stopped by the poll's deadline (poll_timeout)
            timeout=config.timeout.total_seconds(),
            follow_redirects=False,  # a redirect could carry the token elsewhere
            headers={
                "Accept": "application/json",
                "Accept-Encoding": "gzip, deflate",  # what inflated() can bound
                "User-Agent": f"referral-watch/{__version__}",
            },
        )

    # -- public

    def pages(self) -> Iterator[Page]:
        """One poll: every page of the configured filter's result, in order, within
        partner_center.poll_timeout and MAX_PAGES pages."""
        correlation = str(uuid.uuid4())
        self._deadline = time.monotonic() + self._config.poll_timeout.total_seconds()
        self._token = self._tokens.get_token()
        url = list_url = httpx.URL(f"{self._base}/engagements/referrals")
        params: dict[str, str] | None = {
            "$filter": self._config.filter,
            "$orderby": ORDER_BY,
            "$top": str(self._config.page_size),
        }
        requested: set[str] = set()
        number = 0
        moved: str | None = None  # a nextLink path that 404s, answered on the list path instead
        while True:
            if url.path == moved:
                url = url.copy_with(path=list_url.path)
            response = self._request(url, params, correlation)
            if response.status_code == 404 and number > 0 and url.path != list_url.path:
                response, moved = self._next_on_list_path(url, list_url, correlation, response)
            response = self._checked(response, page=number)
            requested.add(str(response.request.url))
            items, link = read_page(response, number)
            yield Page(items, number, response.headers.get("Request-ID"))
            if link is None or link == "":
                return
            url = self._next_url(link, number)
            if str(url) in requested:
                raise ApiError(
                    f"Partner Center sent a paging loop: page {number + 1} links back to a page "
                    "already read in this poll; the poll is incomplete",
                    code="nextLinkLoop",
                )
            params = None  # the nextLink carries its own query
            number += 1
            if number >= self._max_pages:
                raise ApiError(
                    f"Partner Center sent more than {self._max_pages} pages in one poll (a "
                    "next-page chain without end?); the poll is incomplete",
                    code="tooManyPages",
                )

    def _next_on_list_path(
        self,
        url: httpx.URL,
        list_url: httpx.URL,
        correlation: str,
        refused: httpx.Response,
    ) -> tuple[httpx.Response, str | None]:
        """Microsoft's sample nextLink points at /v1.0/referrals, not the list path (SPEC 12):
        when that 404s, the same query once on the list path (same host: the token goes
        nowhere else). (the answer to use, the path to move for the rest of the poll)."""
        retried = self._request(url.copy_with(path=list_url.path), None, correlation)
        if not 200 <= retried.status_code < 300:
            return refused, None
        log.info("api.next_link_moved", link_path=url.path, using=list_url.path)
        return retried, url.path

    def get(self, referral_id: str) -> dict[str, Any] | None:
        """One referral by id (any status), or None when Partner Center does not know it."""
        self._deadline = time.monotonic() + self._config.poll_timeout.total_seconds()
        self._token = self._tokens.get_token()
        url = httpx.URL(f"{self._base}/engagements/referrals/{quote(referral_id, safe='')}")
        response = self._request(url, None, str(uuid.uuid4()))
        if response.status_code == 404:
            return None
        self._checked(response, page=None)
        try:
            record = response.json()
        except (ValueError, RecursionError):
            record = None
        if not isinstance(record, dict):
            raise ApiError(
                f"Partner Center sent an unreadable answer for referral {referral_id} "
                "(not a JSON object, or nested too deeply)",
                status=response.status_code,
                retryable=True,
                code="unreadableRecord",
            )
        return record

    # -- answering (SPEC 14): one request each, never retried

    def current(self, referral_id: str, *, token: str | None = None) -> dict[str, Any] | None:
        """One referral by id, read with ``token`` (a person's delegated token) or the daemon's
        own; None when Partner Center does not know it. For its eTag and state before an answer."""
        response = self._once("GET", referral_id, token)
        if response.status_code == 404:
            return None
        self._answer_checked(response, referral_id, token)
        try:
            record = response.json()
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise ApiError(
                f"Partner Center sent an unreadable answer for referral {referral_id}",
                status=response.status_code,
                code="unreadableRecord",
            )
        return record

    def patch(
        self,
        referral_id: str,
        operations: list[dict[str, Any]],
        *,
        etag: str | None,
        token: str | None = None,
    ) -> Patched:
        """PATCH one referral with a JSON Patch document, conditional on ``etag`` (If-Match).

        Not retried: 412 (changed meanwhile), 403 (role missing) and 404 come back as ApiError
        with that status; the caller decides what to tell the person.
        """
        headers = {"Content-Type": "application/json", "Prefer": "return=representation"}
        if etag:
            headers["If-Match"] = etag
        response = self._once("PATCH", referral_id, token, json=operations, headers=headers)
        self._answer_checked(response, referral_id, token)
        record: Any = None
        if response.status_code != 204 and response.content:
            try:
                record = response.json()
            except ValueError:
                record = None
        return Patched(
            record if isinstance(record, dict) else None, response.headers.get("Request-ID")
        )

    def _once(
        self, method: str, referral_id: str, token: str | None, **kwargs: Any
    ) -> httpx.Response:
        bearer = token if token is not None else self._tokens.get_token()
        url = httpx.URL(f"{self._base}/engagements/referrals/{quote(referral_id, safe='')}")
        headers = {**self._answer_headers(bearer), **kwargs.pop("headers", {})}
        try:
            response = self._client.request(method, url, headers=headers, **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(
                f"Partner Center could not be reached for referral {referral_id}: "
                + describe(exc).replace(bearer, "***"),
                retryable=True,
            ) from None
        log.debug(
            "api.response",
            method=method,
            status=response.status_code,
            path=url.path,
            request_id=response.headers.get("Request-ID"),
        )
        return response

    def _answer_headers(self, bearer: str) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {bearer}",
            "MS-CorrelationId": str(uuid.uuid4()),
            "MS-RequestId": str(uuid.uuid4()),
        }

    def _answer_checked(
        self, response: httpx.Response, referral_id: str, token: str | None
    ) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        code = error_code(response)
        detail = error_message(response)
        if token:
            detail = detail.replace(token, "***")
        said = f" (Partner Center said: {detail})" if detail else ""
        request_id = response.headers.get("Request-ID")
        if status == 412:
            message = (
                f"referral {referral_id} was changed in Partner Center meanwhile (412): "
                "nothing was answered; look at its current state and try again"
            )
        elif status == 403:
            message = (
                f"Partner Center refused to answer referral {referral_id} (403 "
                f"{code or 'forbidden'}): the account lacks the Referral Admin or Referral User "
                f"role; ask a Partner Center admin to assign one{said}"
            )
        elif status == 404:
            message = f"referral {referral_id} is not known to Partner Center (404){said}"
        elif status == 401:
            message = (
                f"Partner Center rejected the token for referral {referral_id} (401): "
                f"sign in again ({self._renew_hint()})"
            )
        else:
            message = f"Partner Center answered {status} for referral {referral_id}{said}"
        raise AnswerError(message, status=status, code=code, request_id=request_id)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> PartnerCenter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- requests and retries

    def _request(
        self, url: httpx.URL, params: dict[str, str] | None, correlation: str
    ) -> httpx.Response:
        """Send a GET, retrying transient failures; on 401 one fresh token and one more try
        (outside the retries: a revoked token is not a transient failure)."""
        response = self._retried(url, params, correlation)
        if response.status_code == 401:
            self._token = self._tokens.get_token(force_refresh=True)
            response = self._retried(url, params, correlation)
        return response

    def _retried(
        self, url: httpx.URL, params: dict[str, str] | None, correlation: str
    ) -> httpx.Response:
        """SPEC 0 with stamina: up to max_retries more attempts, exponential backoff from 1 s
        capped at 30 s with jitter, Retry-After honoured (up to 120 s), and the whole at most
        REQUEST_TIME_CAP (and never past the poll's deadline)."""
        started = time.monotonic()
        budget = min(REQUEST_TIME_CAP, self._deadline - started)
        if budget <= 0:
            raise self._out_of_time()
        attempts = 0
        hook = RetryHook(started, budget)
        try:
            for attempt in stamina.retry_context(
                on=hook,
                attempts=self._max_retries + 1,
                timeout=budget,
                wait_initial=BACKOFF_START,
                wait_max=BACKOFF_CAP,
                wait_jitter=BACKOFF_START,
            ):
                with attempt:
                    attempts += 1
                    return self._attempt(url, params, correlation)
        except Transient as exc:
            where = f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}{url.path}"
            tries = f"{attempts} attempt" + ("s" if attempts != 1 else "")
            raise ApiError(
                f"Partner Center at {where} did not answer after {tries}: {exc}",
                status=exc.status,
                retryable=True,
            ) from None
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _attempt(
        self, url: httpx.URL, params: dict[str, str] | None, correlation: str
    ) -> httpx.Response:
        """One GET, its body read within the poll's deadline and PAGE_LIMIT; a transient
        failure raises Transient (retried), a limit ApiError (not)."""
        request = self._client.build_request(
            "GET", url, params=params, headers=self._headers(correlation)
        )
        try:
            response = self._send(request)
        except httpx.TransportError as exc:
            raise Transient(self._scrub(describe(exc)), refused=refused(exc)) from None
        try:
            log.debug(
                "api.response",
                status=response.status_code,
                path=request.url.path,
                request_id=response.headers.get("Request-ID"),
            )
            body = self._body(response)
        except httpx.TransportError as exc:  # cut off, or a read timed out, mid-body
            raise Transient(self._scrub(describe(exc))) from None
        finally:
            response.close()
        if response.status_code in RETRY_STATUSES:
            code = error_code(body)
            raise Transient(
                f"{response.status_code} {code or response.reason_phrase}",
                status=response.status_code,
                retry_after=retry_after(response),
            )
        return body

    def _send(self, request: httpx.Request) -> httpx.Response:
        """A GET, its body still to read. Where the transport is ours (no proxy), straight to
        it: httpx's client layers (auth, redirects, cookies, event hooks) have nothing to do
        for these requests and cost a poll about 0.1 ms of CPU per page."""
        if self._transport is None:
            return self._client.send(request, stream=True)
        response = self._transport.handle_request(request)
        response.request = request
        return response

    def _body(self, response: httpx.Response) -> httpx.Response:
        """The response with its whole body read: inflated step by step, counted as it
        arrives, within the poll's deadline (a server sending a byte now and then cannot
        hold a poll for ever) and PAGE_LIMIT."""
        chunks: list[bytes] = []
        size = 0
        for chunk in inflated(response):
            size += len(chunk)
            if size > PAGE_LIMIT:
                raise ApiError(
                    f"Partner Center sent an answer over {PAGE_LIMIT // (1024 * 1024)} MiB "
                    f"({response.request.url.path}); the poll is incomplete",
                    status=response.status_code,
                    code="answerTooLarge",
                )
            if time.monotonic() > self._deadline:
                raise self._out_of_time()
            chunks.append(chunk)
        headers = [
            (name, value)
            for name, value in response.headers.multi_items()
            if name.lower() not in ("content-encoding", "content-length", "transfer-encoding")
        ]
        return httpx.Response(
            response.status_code,
            headers=headers,
            content=b"".join(chunks),
            request=response.request,
        )

    def _out_of_time(self) -> ApiError:
        limit = format_duration(self._config.poll_timeout)
        return ApiError(
            f"the poll took longer than partner_center.poll_timeout ({limit}): Partner Center "
            "answers too slowly (or without end); the poll is incomplete",
            code="pollTimeout",
        )

    def _renew_hint(self) -> str:
        """What renews the credentials: each provider knows (login, a variable, a program)."""
        return str(getattr(self._tokens, "renew_hint", "run `referral-watch login` if needed"))

    def _headers(self, correlation: str) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self._token}",
            "MS-CorrelationId": correlation,
            "MS-RequestId": str(uuid.uuid4()),
        }

    # -- answers

    def _checked(self, response: httpx.Response, *, page: int | None) -> httpx.Response:
        """The response if it is a success, else the matching AuthError or ApiError."""
        status = response.status_code
        if 200 <= status < 300:
            return response
        code = error_code(response)
        detail = self._scrub(error_message(response))
        if status == 401:
            raise AuthError(
                "Partner Center rejected the token (401 unauthenticated): check that the "
                "signed-in account belongs to the partner's tenant and that the app registration "
                "has the delegated permission of the Microsoft Partner API (4990cffe-04e8-4e8b-"
                f"808a-1175604b879f, not Microsoft Partner Center); {self._renew_hint()}",
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
            self._scrub(f"Partner Center answered {status}{where}: {reason}"),
            status=status,
            code=code,
            retryable=status >= 500,
        )

    def _next_url(self, link: Any, number: int) -> httpx.URL:
        """The nextLink made safe: on the API host only, over the base URL's scheme."""
        if not isinstance(link, str):
            raise ApiError(
                f"Partner Center sent an unreadable page (page {number + 1}): "
                "@odata.nextLink is not a string",
                retryable=True,
            )
        try:
            target = httpx.URL(link)  # one parse for an absolute link (join would take three)
            if not target.is_absolute_url:
                target = self._base.join(link)
        except httpx.InvalidURL:
            raise ApiError(
                f"Partner Center sent an unreadable page (page {number + 1}): "
                f"@odata.nextLink {link[:200]!r} is not a URL",
                retryable=True,
            ) from None
        base_port = port_of(self._base)
        # A link without a port means "the default one": the documented links say http:// for
        # the https API, so the default port follows the scheme we rewrite to.
        target_port = target.port if target.port is not None else base_port
        if target.host.lower() != self._base.host.lower() or target_port != base_port:
            foreign = target.host + (f":{target.port}" if target.port is not None else "")
            raise ApiError(
                f"Partner Center's next-page link points at another host ({foreign}), not "
                f"{self._base.netloc.decode('ascii')}: refused, the token is only sent to the "
                "configured API host; the poll is incomplete",
                code="foreignNextLink",
            )
        if (target.scheme, target.netloc) == (self._base.scheme, self._base.netloc) and not (
            target.userinfo or target.fragment
        ):
            return target  # already what the rebuilt link would be
        return httpx.URL(
            scheme=self._base.scheme, netloc=self._base.netloc, raw_path=target.raw_path
        )

    def _scrub(self, text: str) -> str:
        """Never repeat the token, whatever a server or library put in a message."""
        return scrub(text, [self._token] if self._token else [])
