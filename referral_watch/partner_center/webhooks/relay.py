"""Relay (``webhooks.forward_to``): every verified event passed on, byte for byte.

Partner Center keeps one webhook registration per company. A partner whose Dynamics 365 or
Salesforce co-sell connector (or billing integration) also wants the events can register
referral-watch and list the connector's URL in ``forward_to``: each verified event, of any
name, goes on to each URL with its body bytes and signature headers unchanged, so the receiver
verifies Microsoft's signature itself. A forged event never gets here (the receiver relays
only what verified).

The queue is a table in the state (SQLite or PostgreSQL), so an event answered 200 to Partner
Center survives restarts and failovers: each (event, target) row is retried with backoff (the
first retries within seconds, then up to every ``MAX_BACKOFF``) until the target answers 2xx,
or for ``RELAY_FOR`` (a day), after which it is dropped and operations are told. Only the
active replica relays; a row is claimed with one conditional UPDATE before it is sent, so two
replicas that both believe they are active never send it twice.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import structlog

from referral_watch.errors import ReferralWatchError
from referral_watch.state.db import from_ts, ts
from referral_watch.state.store import Store

log = structlog.get_logger(__name__)

RELAY_FOR = timedelta(days=1)  # then a row is dropped and operations are told
FIRST_BACKOFF = 1.0  # seconds before the first retry; doubled each time
MAX_BACKOFF = 600.0  # ... up to this
TIMEOUT = 10.0  # seconds for one POST
CLAIM_LEASE = timedelta(seconds=2 * TIMEOUT)  # longer than one POST takes
BATCH = 50  # rows claimed at a time
IDLE_CHECK = 5.0  # seconds between looks at the queue when nothing is due (other replicas)
KEPT = timedelta(days=7)  # relayed and dropped rows are remembered this long (redeliveries)

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


def backoff(attempts: int) -> float:
    """Seconds before the next try after ``attempts`` failed ones: 1, 2, 4, ... up to 10 min."""
    return float(min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** max(0, attempts - 1)))


@dataclass(frozen=True)
class Item:
    id: int
    target: str
    event: str
    body: bytes
    headers: dict[str, str]
    received: datetime
    attempts: int


class RelayQueue:
    """The relay's rows, on one open Store (its connection and transactions)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.db = store.db

    def add(
        self,
        key: str,
        event: str,
        body: bytes,
        headers: Mapping[str, str],
        targets: Sequence[str],
        now: datetime,
    ) -> int:
        """Queue one event for each target (an event already queued for a target is not
        queued again); returns how many rows were added."""
        added = 0
        with self.store.transaction():
            for target in targets:
                cursor = self.db.execute(
                    """INSERT INTO relay_queue
                         (event_key, target, event, body, headers, received, state, attempts,
                          next_attempt)
                       VALUES (?, ?, ?, ?, ?, ?, 'pending', 0, ?)
                       ON CONFLICT (event_key, target) DO NOTHING""",
                    (key, target, event, body, json.dumps(dict(headers)), ts(now), ts(now)),
                )
                added += max(0, cursor.rowcount)
        return added

    def claim_due(self, now: datetime, targets: Sequence[str]) -> list[Item]:
        """Take up to BATCH due rows for the configured targets for sending (until the lease
        ends), oldest first."""
        if not targets:
            return []
        marks = ",".join("?" * len(targets))
        with self.store.transaction():
            rows = self.db.execute(
                f"""SELECT id, target, event, body, headers, received, attempts
                    FROM relay_queue
                    WHERE state = 'pending' AND next_attempt <= ? AND target IN ({marks})
                      AND (claim_until IS NULL OR claim_until < ?)
                    ORDER BY next_attempt, id LIMIT {BATCH} {self.store.dialect.for_update}""",
                (ts(now), *targets, ts(now)),
            ).fetchall()
            items = []
            for row in rows:
                cursor = self.db.execute(
                    "UPDATE relay_queue SET claim_until = ? WHERE id = ? AND state = 'pending' "
                    "AND (claim_until IS NULL OR claim_until < ?)",
                    (ts(now + CLAIM_LEASE), row[0], ts(now)),
                )
                if cursor.rowcount == 1:
                    items.append(
                        Item(
                            int(row[0]),
                            str(row[1]),
                            str(row[2]),
                            bytes(row[3]),
                            dict(json.loads(row[4])),
                            from_ts(row[5]) or now,
                            int(row[6]),
                        )
                    )
        return items

    def relayed(self, item: Item, now: datetime) -> None:
        with self.store.transaction():
            self.db.execute(
                "UPDATE relay_queue SET state = 'relayed', done_at = ?, attempts = attempts + 1, "
                "last_error = NULL, claim_until = NULL WHERE id = ?",
                (ts(now), item.id),
            )

    def failed(self, item: Item, error: str, now: datetime) -> bool:
        """Record a failed try; True when the row is dropped (tried for RELAY_FOR)."""
        drop = now - item.received >= RELAY_FOR
        attempts = item.attempts + 1
        retry = now + timedelta(seconds=backoff(attempts))
        with self.store.transaction():
            self.db.execute(
                "UPDATE relay_queue SET state = ?, attempts = ?, next_attempt = ?, "
                "first_failure = COALESCE(first_failure, ?), last_error = ?, done_at = ?, "
                "claim_until = NULL WHERE id = ?",
                (
                    "dropped" if drop else "pending",
                    attempts,
                    ts(retry),
                    ts(now),
                    error[:500],
                    ts(now) if drop else None,
                    item.id,
                ),
            )
        return drop

    def next_due(self, targets: Sequence[str]) -> datetime | None:
        if not targets:
            return None
        marks = ",".join("?" * len(targets))
        row = self.db.execute(
            f"SELECT min(next_attempt) FROM relay_queue WHERE state = 'pending' "
            f"AND target IN ({marks})",
            tuple(targets),
        ).fetchone()
        return from_ts(row[0])

    def summary(
        self, targets: Sequence[str]
    ) -> dict[str, tuple[int, datetime | None, datetime | None]]:
        """Per target with rows waiting: (how many, the oldest's arrival, since when the
        oldest failing row has been failing)."""
        if not targets:
            return {}
        marks = ",".join("?" * len(targets))
        rows = self.db.execute(
            "SELECT target, count(*), min(received), min(first_failure) FROM relay_queue "
            f"WHERE state = 'pending' AND target IN ({marks}) GROUP BY target",
            tuple(targets),
        )
        return {str(r[0]): (int(r[1]), from_ts(r[2]), from_ts(r[3])) for r in rows}

    def drop_other_targets(self, targets: Sequence[str], now: datetime) -> int:
        """Rows waiting for a URL no longer in forward_to are dropped; returns how many."""
        marks = ",".join("?" * len(targets)) or "''"
        with self.store.transaction():
            cursor = self.db.execute(
                "UPDATE relay_queue SET state = 'dropped', done_at = ?, claim_until = NULL "
                f"WHERE state = 'pending' AND target NOT IN ({marks})",
                (ts(now), *targets),
            )
        return max(0, int(cursor.rowcount))

    def prune(self, now: datetime) -> None:
        with self.store.transaction():
            self.db.execute(
                "DELETE FROM relay_queue WHERE state != 'pending' AND done_at < ?",
                (ts(now - KEPT),),
            )


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
