"""Relay (``webhooks.forward_to``): every verified event passed on, byte for byte.

Partner Center keeps one webhook registration per company. A partner whose Dynamics 365 or
Salesforce co-sell connector (or billing integration) also wants the events can register
referral-watch and list the connector's URL in ``forward_to``: each verified event, of any
name, goes on to each URL with its body bytes and signature headers unchanged, so the receiver
verifies Microsoft's signature itself. A forged event never gets here (the receiver relays
only what verified).

The queue (``state.relay_queue``: SQLite or PostgreSQL) keeps an event answered 200 to
Partner Center across restarts and failovers until each target took it, or for a day. This
module is the sending thread: only the active replica relays.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import structlog

from referral_watch.errors import ReferralWatchError
from referral_watch.state.relay_queue import TIMEOUT, Item, RelayQueue, backoff
from referral_watch.state.store import Store

log = structlog.get_logger(__name__)

IDLE_CHECK = 5.0  # seconds between looks at the queue when nothing is due (other replicas)

# The headers passed on, in Partner Center's spelling: the receiver verifies with them.
HEADERS = (
    "Authorization",
    "x-ms-signature",
    "X-MS-Certificate-Url",
    "X-MS-Signature-Algorithm",
    "Content-Type",
)

RELAYED = "relayed"
FAILED = "failed"
DROPPED = "dropped"


def relayed_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The signature headers of a received event (lower-case names) to pass on as they came."""
    return {name: headers[name.lower()] for name in HEADERS if name.lower() in headers}


def target_label(url: str) -> str:
    """The target URL fit for logs and metric labels: no credentials, query or fragment (a
    connector's URL may carry a key in either)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class Relay:
    """The sending thread: claims due rows and POSTs them, while this replica is active.

    ``active()`` says whether this replica does the work; ``on_dropped(reason)`` tells
    operations; ``count(target, result)`` and ``observe(summary)`` feed the metrics."""

    def __init__(
        self,
        state: Any,  # a SQLite path or a PostgreSQL URL (config.state.location)
        targets: Sequence[str],
        *,
        active: Callable[[], bool],
        stop: threading.Event,
        on_dropped: Callable[[str], None] = lambda _reason: None,
        count: Callable[[str, str], None] = lambda _target, _result: None,
        observe: Callable[[dict[str, tuple[int, datetime | None, datetime | None]]], None] = (
            lambda _summary: None
        ),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        post: Callable[[str, bytes, dict[str, str]], int] | None = None,
    ) -> None:
        self.state = state
        self.targets = list(targets)
        self._active = active
        self._stop = stop
        self._on_dropped = on_dropped
        self._count = count
        self._observe = observe
        self._clock = clock
        self._post = post
        self._woken = threading.Event()
        self._thread: threading.Thread | None = None
        self.stuck_since: datetime | None = None  # the oldest failing row's first failure

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="webhook-relay", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Rows were queued (or this replica became active): look now."""
        self._woken.set()

    def join(self, timeout: float = 15.0) -> None:
        self._woken.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        import httpx

        with httpx.Client(timeout=TIMEOUT, trust_env=False, follow_redirects=False) as client:
            post = self._post or _poster(client)
            store: Store | None = None
            pruned: float | None = None
            cleaned = False
            while not self._stop.is_set():
                wait = IDLE_CHECK
                try:
                    if store is None:
                        store = Store(self.state)
                    if self._active():
                        if not cleaned:  # once: rows for URLs taken out of forward_to
                            dropped = RelayQueue(store).drop_other_targets(
                                self.targets, self._clock()
                            )
                            cleaned = True
                            if dropped:
                                log.warning("relay.forgotten", events=dropped)
                        wait = self._round(RelayQueue(store), post)
                        if pruned is None or time.monotonic() - pruned > 3600:
                            RelayQueue(store).prune(self._clock())
                            pruned = time.monotonic()
                except ReferralWatchError as exc:  # e.g. the database went away: try again
                    log.warning("relay.state_error", error=str(exc)[:200])
                    if store is not None:
                        store.close()
                    store = None
                except Exception:  # a bug must not end the relay: the rows wait in the state
                    log.exception("relay.crashed")
                self._woken.wait(wait)
                self._woken.clear()
            if store is not None:
                store.close()

    def _round(self, queue: RelayQueue, post: Callable[[str, bytes, dict[str, str]], int]) -> float:
        """Send what is due; returns how long to wait before the next look."""
        while not self._stop.is_set() and self._active():
            items = queue.claim_due(self._clock(), self.targets)
            if not items:
                break
            for item in items:
                if self._stop.is_set() or not self._active():
                    break  # the claims lapse; whoever is active sends them
                self._send(queue, item, post)
        self._note(queue)
        due = queue.next_due(self.targets)
        if due is None:
            return IDLE_CHECK
        return max(0.05, min(IDLE_CHECK, (due - self._clock()).total_seconds()))

    def _send(
        self, queue: RelayQueue, item: Item, post: Callable[[str, bytes, dict[str, str]], int]
    ) -> None:
        label = target_label(item.target)
        try:
            status = post(item.target, item.body, item.headers)
            error = None if 200 <= status < 300 else f"answered {status}"
        except Exception as exc:  # httpx's errors, and whatever a target's TLS throws
            error = str(exc)[:200] or type(exc).__name__
        now = self._clock()
        if error is None:
            queue.relayed(item, now)
            self._count(label, RELAYED)
            log.info("relay.sent", target=label, webhook_event=item.event, tries=item.attempts + 1)
            return
        dropped = queue.failed(item, error, now)
        self._count(label, DROPPED if dropped else FAILED)
        if not dropped:
            log.warning(
                "relay.failed",
                target=label,
                webhook_event=item.event,
                error=error,
                retry_in_s=backoff(item.attempts + 1),
            )
            return
        reason = (
            f"webhook event {item.event} received {item.received:%Y-%m-%d %H:%M} UTC could not "
            f"be relayed to {label} for a day: {error}"
        )
        log.error("relay.dropped", target=label, webhook_event=item.event, error=error)
        self._on_dropped(reason)

    def _note(self, queue: RelayQueue) -> None:
        summary = queue.summary(self.targets)
        failing = [since for _count, _oldest, since in summary.values() if since is not None]
        self.stuck_since = min(failing) if failing else None
        self._observe(summary)


def _poster(client: Any) -> Callable[[str, bytes, dict[str, str]], int]:
    def post(url: str, body: bytes, headers: dict[str, str]) -> int:
        return int(client.post(url, content=body, headers=headers).status_code)

    return post


class RelayMetrics:
    """referral_watch_relay_events_total{target,result} (relayed, failed, dropped),
    referral_watch_relay_waiting{target} and referral_watch_relay_queue_age_seconds{target}
    (the oldest waiting event's age; 0 when none waits), targets as target_label shows them."""

    def __init__(
        self, registry: Any, targets: Sequence[str], clock: Callable[[], datetime]
    ) -> None:
        from prometheus_client import Counter, Gauge

        self._clock = clock
        self._labels = {target: target_label(target) for target in targets}
        self.events = Counter(
            "referral_watch_relay_events",
            "Webhook events relayed to webhooks.forward_to, by target and result",
            ["target", "result"],
            registry=registry,
        )
        self.waiting = Gauge(
            "referral_watch_relay_waiting",
            "Webhook events waiting to be relayed, by target",
            ["target"],
            registry=registry,
        )
        self.age = Gauge(
            "referral_watch_relay_queue_age_seconds",
            "Age of the oldest webhook event waiting to be relayed (0: none waits), by target",
            ["target"],
            registry=registry,
        )
        for label in self._labels.values():
            self.waiting.labels(label).set(0)
            self.age.labels(label).set(0)

    def count(self, target: str, result: str) -> None:
        self.events.labels(target, result).inc()

    def observe(self, summary: dict[str, tuple[int, datetime | None, datetime | None]]) -> None:
        now = self._clock()
        for target, label in self._labels.items():
            waiting, oldest, _failing = summary.get(target, (0, None, None))
            self.waiting.labels(label).set(waiting)
            self.age.labels(label).set((now - oldest).total_seconds() if oldest else 0)
