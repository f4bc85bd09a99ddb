"""``POST {webhooks.path}``: Partner Center's events arrive here (SPEC 15).

Each event is verified (``partner_center.webhooks.verify``) before anything acts on it,
remembered in the state file (so a redelivery acts once and an answered event survives a
restart) and answered at once; the daemon's worker then fetches the referral and handles it.
Nothing here calls Partner Center: a forged event costs a signature check, never an API request.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.to_thread
import structlog
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from referral_watch.config import Config
from referral_watch.errors import ReferralWatchError, StateError
from referral_watch.partner_center.webhooks.relay import relayed_headers
from referral_watch.partner_center.webhooks.verify import (
    DUPLICATE,
    IGNORED,
    MAX_BODY,
    OK,
    TEST_EVENT,
    Event,
    Rejected,
    Verifier,
    lower_headers,
    parse_event,
)
from referral_watch.state.pool import StorePool
from referral_watch.state.relay_queue import RelayQueue
from referral_watch.state.store import Store
from referral_watch.web.server import REQUEST_TIMEOUT

log = structlog.get_logger(__name__)

# Event names counted by name; anything else is counted as "other" (labels stay few).
KNOWN_EVENTS = frozenset(
    {
        "referral-created",
        "referral-updated",
        "related-referral-created",
        "related-referral-updated",
        TEST_EVENT,
    }
)
# Events verified side by side, on threads of their own: a certificate download (up to
# certificates.CERTIFICATE_TIMEOUT) never holds a thread of the pool that serves the
# rest of the web app, /healthz included (issue 25.5).
VERIFYING = 4
# Seconds an event waits for the state file's write lock before it is answered anyway and left
# to the worker to store: Partner Center should never wait for a poll.
LOCK_WAIT = 0.25
UNVERIFIED = "unverified"  # the event label of a rejected event: its body is not believed


class Receiver:
    """The endpoint: verify, remember, answer, and wake the worker.

    ``count(event, result)`` feeds referral_watch_webhook_events_total; ``wake()`` tells the
    daemon's worker that events wait in the state file; ``relay_wake()`` tells the relay
    (webhooks.forward_to) that verified events wait in its queue.
    """

    def __init__(
        self,
        config: Config,
        *,
        verifier: Verifier | None = None,
        wake: Callable[[], None] = lambda: None,
        count: Callable[[str, str], None] = lambda _event, _result: None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        relay_wake: Callable[[], None] = lambda: None,
    ) -> None:
        assert config.webhooks is not None
        self.config = config
        self.path = config.webhooks.path
        self.verifier = verifier or Verifier(config.webhooks, clock=clock)
        self.wake = wake
        self.relay_wake = relay_wake
        self.forward_to = list(config.webhooks.forward_to)
        self.count = count
        self.clock = clock
        self.last_event: datetime | None = None
        self._pool: StorePool | None = None  # opened with the first event
        self._pool_lock = threading.Lock()
        self._parked: list[_Parked] = []  # answered, not stored yet
        self._parked_lock = threading.Lock()
        self._verifying: anyio.CapacityLimiter | None = None  # made in the event loop

    def _stores(self) -> StorePool:
        """A few state connections shared by the web server's threads (not one per thread),
        kept open: opening and closing a SQLite file for every event would also checkpoint its
        journal every time (~20 ms). Each waits at most LOCK_WAIT for the write lock (a poll
        holds it while it runs), and an event waits as long for a free connection."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = StorePool(self.config.state.location, write_wait=LOCK_WAIT)
            return self._pool

    def close(self) -> None:
        """Close the state connections (the daemon stops)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def flush(self, store: Store) -> None:
        """Store the events answered while the state was busy (on the worker's thread)."""
        with self._parked_lock:
            parked, self._parked = self._parked, []
        try:
            while parked:
                self._counted(parked[0].event, self._remember(store, parked[0]))
                parked.pop(0)
        finally:
            with self._parked_lock:
                self._parked[:0] = parked  # what could not be stored yet, first again

    @property
    def parked(self) -> int:
        with self._parked_lock:
            return len(self._parked)

    def route(self) -> Route:
        return Route(self.path, self.endpoint, methods=["POST"], name="webhooks")

    async def endpoint(self, request: Request) -> Response:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                body = await _body_within_limit(request)
        except TimeoutError:
            log.warning("webhook.rejected", status=408, reason="body not sent in time")
            self.count(UNVERIFIED, IGNORED)
            return _answer(408, "body not sent in time")
        except ClientDisconnect:  # e.g. cut by the server's own deadline: nobody to answer
            self.count(UNVERIFIED, IGNORED)
            return _answer(400, "disconnected")
        if body is None:
            log.warning("webhook.rejected", status=413, reason=f"body over {MAX_BODY} bytes")
            self.count(UNVERIFIED, IGNORED)
            return _answer(413, "body too large")
        headers = lower_headers(request.headers)
        try:
            if self._verifying is None:
                self._verifying = anyio.CapacityLimiter(VERIFYING)
            await anyio.to_thread.run_sync(
                self.verifier.verify, headers, body, limiter=self._verifying
            )
        except Rejected as exc:
            # The reason names headers, hosts and certificates, never the body's content.
            log.warning("webhook.rejected", status=401, result=exc.result, reason=exc.reason)
            self.count(UNVERIFIED, exc.result)
            return _answer(401, "not verified")
        except ReferralWatchError as exc:  # e.g. the trust roots cannot be read
            log.error("webhook.unverifiable", error=str(exc))
            self.count(UNVERIFIED, "untrusted_certificate")
            return _answer(401, "not verified")
        try:
            event = parse_event(body)
        except Rejected as exc:
            log.warning("webhook.unreadable", reason=exc.reason)
            self.count(UNVERIFIED, IGNORED)
            return _answer(400, "unreadable event")
        relayed = (body, relayed_headers(headers)) if self.forward_to else None
        return await run_in_threadpool(self._accept, event, relayed)

    def _accept(self, event: Event, relayed: tuple[bytes, dict[str, str]] | None) -> Response:
        now = self.clock()
        self.last_event = now
        arrived = _Parked(event, now, relayed)
        try:
            with self._stores().lend(LOCK_WAIT) as store:
                new = self._remember(store, arrived)
        except StateError as exc:
            # Busy (a long poll holds the write lock): answer now, the worker stores it.
            log.info("webhook.parked", webhook_event=event.name, reason=str(exc)[:120])
            with self._parked_lock:
                self._parked.append(arrived)
            self.wake()
            return _answer(200, "accepted")
        return _answer(200, self._counted(event, new))

    def _remember(self, store: Store, arrived: _Parked) -> bool:
        """Store a verified event, and queue it for each forward_to URL (the same event
        again is queued once): True when it was not received before."""
        event = arrived.event
        if arrived.relayed is not None:
            body, headers = arrived.relayed
            queue = RelayQueue(store)
            if queue.add(event.key, event.name, body, headers, self.forward_to, arrived.at):
                self.relay_wake()
        return store.add_webhook_event(event.stored(), arrived.at)

    def _counted(self, event: Event, new: bool) -> str:
        """Count and log a stored event (``new``: not received before); wake the worker for
        one that names a lead. Returns what the answer says."""
        label = event.name if event.name in KNOWN_EVENTS else "other"
        if not new:
            log.info("webhook.duplicate", webhook_event=event.name, lead=event.lead_id)
            self.count(label, DUPLICATE)
            return "already received"
        if event.name == TEST_EVENT:
            log.info("webhook.test_event", resource=event.resource_uri)
            self.count(label, OK)
            return "test event received"
        if not event.actionable:
            log.info("webhook.ignored", webhook_event=event.name)
            self.count(label, IGNORED)
            return "ignored"
        log.info("webhook.received", webhook_event=event.name, lead=event.lead_id)
        self.count(label, OK)
        self.wake()
        return "accepted"


@dataclass(frozen=True)
class _Parked:
    """A verified event as it arrived: when, and what to relay (body, signature headers)."""

    event: Event
    at: datetime
    relayed: tuple[bytes, dict[str, str]] | None


async def _body_within_limit(request: Request) -> bytes | None:
    """The raw body, or None when it is (or claims to be) longer than MAX_BODY."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            return None
    return bytes(body)


def _answer(status: int, text: str) -> Response:
    body: dict[str, Any] = {"status": text}
    return JSONResponse(body, status_code=status)
