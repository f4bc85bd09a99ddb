"""Partner Center's responses, read safely: a page's records as served (msgspec, or jsontext
for a page nested too deeply), error bodies and codes, Retry-After, bodies inflated within
bounds, and which failures are transient (retried by the client) or mean a refused connection."""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import httpx
import msgspec

from referral_watch import jsontext
from referral_watch.errors import ApiError, AuthError

RETRY_AFTER_CAP = 120.0
# Connection refused or no such host: retried while the attempts so far took less than this,
# so a wrong base_url fails in a few seconds, naming it.
CONNECT_RETRY_TIME = 3.0
# Inflate a compressed body at most this much per step (no 1,000:1 burst in memory).
_INFLATE_STEP = 1024 * 1024
_DETAIL_LIMIT = 300  # characters of a server's error message worth repeating


class Served(Protocol):
    """An answer whose body was read: an httpx.Response, or the client's own Answer."""

    @property
    def status_code(self) -> int: ...

    @property
    def content(self) -> bytes: ...

    def json(self) -> Any: ...


def read_page(response: Served, number: int) -> tuple[Sequence[Any], Any]:
    """(the `value` items, each its JSON as served, the @odata.nextLink or None) of one page.

    msgspec finds the items without decoding them (each a view of the body's bytes), so the
    cycle can recognise unchanged records by their bytes alone (see bench/bench.py for what that
    saves). A page nested too deeply for msgspec anywhere is split by jsontext instead: only the
    deep record then fails, on its own.
    """
    try:
        shape = RAW_PAGE.decode(response.content)
    except RecursionError:
        return split_deep_page(response, number)
    except (msgspec.DecodeError, msgspec.ValidationError):
        body = page_body(response, number)  # explains what is wrong, or copes with it
        texts = [json.dumps(item, separators=(",", ":")) for item in body["value"]]
        return texts, body.get("@odata.nextLink")
    return shape.value, shape.next_link


def split_deep_page(response: Served, number: int) -> tuple[Sequence[Any], Any]:
    try:
        members = jsontext.top_level(response.content.decode("utf-8"))
        texts = list(jsontext.array_items(members.get("value", "")))
        link = json.loads(members["@odata.nextLink"]) if "@odata.nextLink" in members else None
    except (ValueError, RecursionError) as exc:
        raise ApiError(
            f"Partner Center sent an unreadable page (page {number + 1}): not JSON "
            f"({type(exc).__name__}); the poll is incomplete",
            status=response.status_code,
            retryable=True,
            code="unreadablePage",
        ) from None
    return texts, link


def page_body(response: Served, number: int) -> dict[str, Any]:
    """The page as JSON, or an ApiError saying why it cannot be read."""
    problem = ""
    try:
        body = response.json()
    except (ValueError, RecursionError) as exc:
        body, problem = None, f"not JSON ({type(exc).__name__}: {str(exc)[:200]})"
    if not problem and not (isinstance(body, dict) and isinstance(body.get("value"), list)):
        problem = "no `value` list in the answer"
    if problem or not isinstance(body, dict):
        raise ApiError(
            f"Partner Center sent an unreadable page (page {number + 1}): {problem}; "
            "the poll is incomplete",
            status=response.status_code,
            retryable=True,
            code="unreadablePage",
        )
    return body


class RawPage(msgspec.Struct):
    value: list[msgspec.Raw]
    next_link: Any = msgspec.field(name="@odata.nextLink", default=None)


RAW_PAGE = msgspec.json.Decoder(RawPage)
_ITEM = msgspec.json.Decoder()


def decoded_item(item: str | bytes | msgspec.Raw) -> Any:
    """One item of a page, decoded: by msgspec (a third of the json module's time a record)
    where it can; an item msgspec refuses goes to the json module, whose value or error is then
    what the cycle gets, as it always was (1e400 as inf, a lone surrogate's escape as that
    character; a text that is not UTF-8 raises UnicodeDecodeError). Where both decode an item
    they give the same value, so which one did is never seen."""
    try:
        return _ITEM.decode(item)
    except (msgspec.DecodeError, RecursionError):
        text = item if isinstance(item, str) else bytes(item).decode("utf-8")
        return json.loads(text)


def error_body(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except (ValueError, RecursionError):
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def error_code(response: httpx.Response) -> str | None:
    code = error_body(response).get("code")
    return code if isinstance(code, str) and code else None


def error_message(response: httpx.Response) -> str:
    message = error_body(response).get("message")
    text = message if isinstance(message, str) else ""
    return " ".join(text.split())[:_DETAIL_LIMIT]


def forbidden(response: httpx.Response, code: str | None, detail: str) -> AuthError:
    challenge = response.headers.get("WWW-Authenticate", "")
    if code == "insufficient_claims" or "insufficient_claims" in challenge:
        return AuthError(
            "Partner Center refused the request (403 insufficient_claims): Conditional Access "
            "requires a new sign-in (for example MFA); run `referral-watch login`",
            needs_login=True,
        )
    said = f" Partner Center said: {detail}" if detail else ""
    return AuthError(
        f"Partner Center refused the request (403 {code or 'forbidden'}): the signed-in account "
        "lacks the Referral Admin (or Referral User) role, or Conditional Access requires a new "
        f"sign-in; ask a Partner Center admin to assign the role, then run "
        f"`referral-watch login` if needed.{said}",
        needs_login=False,
    )


def retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date), capped; None when absent/odd."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return min(RETRY_AFTER_CAP, max(0.0, seconds))


def port_of(url: httpx.URL) -> int:
    if url.port is not None:
        return url.port
    return 443 if url.scheme == "https" else 80


class Transient(Exception):
    """A failure worth another attempt (SPEC 0)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        refused: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.refused = refused


class RetryHook:
    """stamina's `on=`: whether (and after how long) to try again."""

    def __init__(self, started: float, budget: float) -> None:
        self.started = started
        self.budget = budget

    def __call__(self, exc: BaseException) -> bool | float:
        if not isinstance(exc, Transient):
            return False
        spent = time.monotonic() - self.started
        if exc.refused and spent >= CONNECT_RETRY_TIME:
            return False  # nothing listens there: say so soon
        if exc.retry_after is not None:
            # Waiting past the request's budget would only end in failure after the wait.
            return exc.retry_after if spent + exc.retry_after < self.budget else False
        return True


def refused(exc: httpx.TransportError) -> bool:
    return isinstance(exc, httpx.ConnectError)


def inflated(encoding: str, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The body as it arrives (``chunks``, as sent in ``encoding``: the Content-Encoding,
    stripped and lowercased), gzip or deflate inflated at most _INFLATE_STEP at a time."""
    if encoding in ("", "identity"):
        yield from chunks
        return
    if encoding not in ("gzip", "deflate"):
        raise ApiError(f"Partner Center sent an answer in an unknown encoding {encoding!r}")
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib, by the header
    try:
        for raw in chunks:
            data = raw
            while data:
                yield inflater.decompress(data, _INFLATE_STEP)
                data = inflater.unconsumed_tail
    except zlib.error as exc:
        raise Transient(f"a corrupt {encoding} body ({exc})") from None


def describe(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    text = str(exc) or type(exc).__name__
    return f"connection failed ({text})"
