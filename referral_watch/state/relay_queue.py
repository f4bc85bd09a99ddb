"""The relay's queue (``webhooks.forward_to``): one row per (verified event, target), so an
event answered 200 to Partner Center survives restarts and failovers. Each row is retried with
backoff (the first retries within seconds, then up to every ``MAX_BACKOFF``) until the target
answers 2xx, or for ``RELAY_FOR`` (a day), after which it is dropped. A row is claimed with one
conditional UPDATE before it is sent, so two replicas that both believe they are active never
send it twice. The sending thread is ``partner_center.webhooks.relay``."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from referral_watch.state.db import Database, from_ts, ts

RELAY_FOR = timedelta(days=1)  # then a row is dropped and operations are told
FIRST_BACKOFF = 1.0  # seconds before the first retry; doubled each time
MAX_BACKOFF = 600.0  # ... up to this
TIMEOUT = 10.0  # seconds for one POST
CLAIM_LEASE = timedelta(seconds=2 * TIMEOUT)  # longer than one POST takes
BATCH = 50  # rows claimed at a time
KEPT = timedelta(days=7)  # relayed and dropped rows are remembered this long (redeliveries)


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
    """The relay's rows, on one open state (its connection and transactions)."""

    def __init__(self, store: Database) -> None:
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
