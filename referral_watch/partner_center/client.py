"""The Partner Center Referrals API over httpx: paging, retries, Retry-After and token safety.

Every failure leaves this module as AuthError or ApiError; a failure on any page ends ``pages()``
with that error, so the caller knows the poll is incomplete and concludes nothing from absence.
The bearer token is only ever sent to the configured base URL's host and port (SPEC 12).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from http.cookiejar import CookieJar, DefaultCookiePolicy
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx
import structlog

from referral_watch import __version__
from referral_watch.config import PartnerCenterConfig
from referral_watch.errors import ApiError
from referral_watch.model import record_digests
from referral_watch.partner_center import connection
from referral_watch.partner_center.auth import TokenProvider
from referral_watch.partner_center.reading import (
    PAGE_LIMIT,
    REQUEST_TIME_CAP,
    Answer,
    Reader,
    renew_hint,
)
from referral_watch.partner_center.responses import (
    decoded_item,
    describe,
    error_code,
    error_message,
    port_of,
    read_page,
)

__all__ = ["MAX_PAGES", "PAGE_LIMIT", "REQUEST_TIME_CAP", "Page", "PartnerCenter", "Patched"]

log = structlog.get_logger(__name__)

# A poll reading more pages than this is following a chain without end.
MAX_PAGES = 5000
ORDER_BY = "createdDateTime desc"
# The path and query of a nextLink that httpx.URL would keep as it is (printable ASCII that
# needs no percent-encoding, no fragment): such a link on the API's host and port is taken as
# text; any other goes through httpx.URL and the full checks.
_PLAIN_TARGET = re.compile(r"/[!$-;=@-_a-z|~]*(?:\?[!$-;=?-~]*)?")
_PLAIN_LINK_LIMIT = 8192  # characters; a longer link takes the full checks


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
        return record_digests(self._items)  # str, bytes or a buffer

    def digested(self) -> Page:
        """The page with its digests made: where it was read (the fetching thread, when the
        poll reads ahead), its bytes still in that core's cache."""
        self.digests  # noqa: B018
        return self

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
        self._max_pages = MAX_PAGES if max_pages is None else max_pages
        self._base = httpx.URL(config.base_url.rstrip("/"))
        # The API's connections: ours (http.client, kept alive), or httpx's own where the
        # environment names a proxy (None): see connection.py.
        transport = transport or connection.for_environment()
        self._client = httpx.Client(
            transport=transport,
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
        self._reader = Reader(config, tokens, self._client, transport, max_retries)
        # A nextLink starting with one of these is on the API's host and port (SPEC 12).
        netloc = self._base.netloc.decode("ascii")
        self._link_prefixes = (f"http://{netloc}/", f"https://{netloc}/")

    # -- public

    def pages(self) -> Iterator[Page]:
        """One poll: every page of the configured filter's result, in order, within
        partner_center.poll_timeout and MAX_PAGES pages."""
        correlation = str(uuid.uuid4())
        reader = self._reader
        reader.begin()
        list_url = httpx.URL(f"{self._base}/engagements/referrals")
        query = {
            "$filter": self._config.filter,
            "$orderby": ORDER_BY,
            "$top": str(self._config.page_size),
        }
        # URLs as text from here on, in httpx's form (see _next_url).
        url = str(list_url.copy_merge_params(query))
        requested: set[str] = set()
        number = 0
        moved: str | None = None  # a nextLink path that 404s, answered on the list path instead
        try:
            while True:
                answer = reader.request(url, correlation)
                if answer.status_code == 404 and number > 0:
                    answer, moved = self._next_on_list_path(url, list_url, correlation, answer)
                answer = reader.checked(answer, page=number)
                requested.add(answer.url)
                items, link = read_page(answer, number)
                page = Page(items, number, answer.header("Request-ID"))
                if link is None or link == "":
                    yield page.digested()
                    return
                try:
                    url = self._following(link, number, requested)
                except ApiError:
                    yield page.digested()  # this page is good: what fails is the next one
                    raise
                number += 1
                if moved is not None and (following := httpx.URL(url)).path == moved:
                    url = str(following.copy_with(path=list_url.path))
                reader.ahead(url, correlation)  # the next page on its way while this one is
                yield page.digested()  # digested and handed over (its nextLink names it)
        finally:
            reader.drop_ahead()  # a poll left early: the next page, if asked for, is not read

    def _following(self, link: Any, number: int, requested: set[str]) -> str:
        """The URL of the page after page ``number`` (its nextLink made safe): not one read
        already in this poll, nor past MAX_PAGES."""
        url = self._next_url(link, number)
        if url in requested:
            raise ApiError(
                f"Partner Center sent a paging loop: page {number + 1} links back to a page "
                "already read in this poll; the poll is incomplete",
                code="nextLinkLoop",
            )
        if number + 1 >= self._max_pages:
            raise ApiError(
                f"Partner Center sent more than {self._max_pages} pages in one poll (a "
                "next-page chain without end?); the poll is incomplete",
                code="tooManyPages",
            )
        return url

    def _next_on_list_path(
        self, url: str, list_url: httpx.URL, correlation: str, refused: Answer
    ) -> tuple[Answer, str | None]:
        """Microsoft's sample nextLink points at /v1.0/referrals, not the list path (SPEC 12):
        when that 404s, the same query once on the list path (same host: the token goes
        nowhere else). (the answer to use, the path to move for the rest of the poll)."""
        link = httpx.URL(url)
        if link.path == list_url.path:
            return refused, None
        retried = self._reader.request(str(link.copy_with(path=list_url.path)), correlation)
        if not 200 <= retried.status_code < 300:
            return refused, None
        log.info("api.next_link_moved", link_path=link.path, using=list_url.path)
        return retried, link.path

    def get(self, referral_id: str) -> dict[str, Any] | None:
        """One referral by id (any status), or None when Partner Center does not know it."""
        self._reader.begin()
        url = httpx.URL(f"{self._base}/engagements/referrals/{quote(referral_id, safe='')}")
        answer = self._reader.request(str(url), str(uuid.uuid4()))
        if answer.status_code == 404:
            return None
        self._reader.checked(answer, page=None)
        try:
            record = answer.json()
        except (ValueError, RecursionError):
            record = None
        if not isinstance(record, dict):
            raise ApiError(
                f"Partner Center sent an unreadable answer for referral {referral_id} "
                "(not a JSON object, or nested too deeply)",
                status=answer.status_code,
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
                f"sign in again ({renew_hint(self._tokens)})"
            )
        else:
            message = f"Partner Center answered {status} for referral {referral_id}{said}"
        raise AnswerError(message, status=status, code=code, request_id=request_id)

    def close(self) -> None:
        self._reader.drop_ahead()
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

    def _next_url(self, link: Any, number: int) -> str:
        """The nextLink made safe: on the API host only, over the base URL's scheme; as text in
        httpx's form (str(httpx.URL)), so that the same page is the same text."""
        if isinstance(link, str) and len(link) <= _PLAIN_LINK_LIMIT:
            # What nearly every nextLink is: "http(s)://<the API's host and port>/<path?query>",
            # nothing in it that httpx would encode or resolve. Taken as it is, scheme rewritten.
            for prefix in self._link_prefixes:
                if link.startswith(prefix):
                    plain = link[len(prefix) - 1 :]
                    if _PLAIN_TARGET.fullmatch(plain) and "/." not in plain.partition("?")[0]:
                        return self._reader.origin + plain
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
            return str(target)  # already what the rebuilt link would be
        return str(
            httpx.URL(scheme=self._base.scheme, netloc=self._base.netloc, raw_path=target.raw_path)
        )
