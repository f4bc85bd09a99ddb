"""The outbox: decisions written with the poll that made them, then claimed, delivered, failed
or dropped; it is also the history of what was sent (SPEC 16 claims: one sender per row)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from referral_watch.model import EXPIRED, RESOLVED, TIER, Alert, PendingRow, Sent
from referral_watch.state.db import Database, Times, chunks, from_ts, ts
from referral_watch.state.dialect import Postgres

# Meta key: when the oldest due delivery still undelivered was queued (unset: none stuck).
STUCK_META = "delivery.stuck_since"


# How long a claim on an outbox row keeps other processes off it: longer than one send takes.
CLAIM_LEASE = timedelta(seconds=30)


# The columns Outbox.record writes, in its rows' order.
_RECORD_COLUMNS = ("lead_id", "kind", "channel", "tier", "severity", "state", "created")


class _NotAllFree(Exception):
    """A claim found a row delivered or claimed by another process: nothing is claimed."""


class Outbox(Database):
    def history(self, lead_ids: Sequence[str] | None = None) -> dict[str, list[Sent]]:
        """Every lead alert row ever written, by lead id (only for ``lead_ids`` when given)."""
        out: dict[str, list[Sent]] = {}
        query = (
            "SELECT lead_id, kind, channel, tier, state, created FROM outbox "
            "WHERE lead_id IS NOT NULL{} ORDER BY id"
        )
        if lead_ids is None:
            batches: list[tuple[str, Sequence[str]]] = [(query.format(""), ())]
        else:
            batches = [
                (query.format(f" AND lead_id IN ({','.join('?' * len(chunk))})"), chunk)
                for chunk in chunks(lead_ids)
            ]
        for sql, params in batches:
            for lead_id, kind, channel, tier, state, created in self.db.execute(sql, params):
                out.setdefault(lead_id, []).append(
                    Sent(lead_id, kind, channel, tier, state, datetime.fromisoformat(created))
                )
        return out

    def record(self, alerts: Sequence[Alert], now: datetime, *, new_leads: bool = False) -> int:
        """Write decisions to the outbox; a more severe tier replaces held, less severe ones
        (``new_leads``: the alerts are about leads first stored in this transaction, which
        have no outbox rows to replace).

        Call inside transaction(). Returns the number of rows to deliver.
        """
        # A few statements per batch of alerts, not a few per alert: a first cycle writes
        # tens of thousands of rows. The policy decides at most one pending tier per lead and
        # channel at a time, so all the replacing can come before the inserts.
        replacing = [
            (alert.lead_id, alert.channel, alert.severity)
            for alert in alerts
            if alert.kind == TIER and not alert.skipped and not new_leads
        ]
        self.db.executemany(
            # `+state`: look rows up by lead and channel; the partial index on
            # state would scan every pending row (20,000 in a first cycle) per alert.
            """UPDATE outbox SET state = 'superseded'
               WHERE lead_id = ? AND channel = ? AND kind = 'tier'
                 AND +state = 'pending' AND severity < ?""",
            replacing,
        )
        created = ts(now)
        rows = [
            (
                alert.lead_id,
                alert.kind,
                alert.channel,
                alert.tier,
                alert.severity,
                "skipped" if alert.skipped else "pending",
                created,
            )
            for alert in alerts
        ]
        if isinstance(self.dialect, Postgres) and len(rows) > 1:
            # COPY: psycopg parses a statement of more than 50 parameters anew each time, and
            # the values are the state's own (stored lead ids, the config's names).
            self.db.copy("outbox", _RECORD_COLUMNS, rows)
            rows = []
        for part in chunks(rows, 300):
            marks = ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(part))
            self.db.execute(
                f"INSERT INTO outbox ({', '.join(_RECORD_COLUMNS)}) VALUES {marks}",
                [value for row in part for value in row],
            )
        for kind, column in ((EXPIRED, "expired_notified"), (RESOLVED, "resolution_notified")):
            told = [alert.lead_id for alert in alerts if alert.kind == kind]
            for ids in chunks(told):
                marks = ",".join("?" * len(ids))
                self.db.execute(f"UPDATE leads SET {column} = 1 WHERE id IN ({marks})", ids)
        return sum(not alert.skipped for alert in alerts)

    def enqueue_message(self, kind: str, channel: str, title: str, body: str, now: datetime) -> int:
        """A message about no single lead (ops, test, report), with its text fixed now."""
        with self.transaction():
            cursor = self.db.execute(
                """INSERT INTO outbox (lead_id, kind, channel, state, created, title, body)
                   VALUES (NULL, ?, ?, 'pending', ?, ?, ?) RETURNING id""",
                (kind, channel, ts(now), title, body),
            )
            row_id = int(cursor.fetchone()[0])
        return row_id

    def pending(self, *, kinds: Sequence[str] | None = None) -> list[PendingRow]:
        # Read as they come, not all fetched first: a first cycle's tens of thousands of rows
        # would be held twice (as read, and as PendingRows), ~6 MiB more at its peak.
        rows = self.db.execute(
            "SELECT id, lead_id, kind, channel, tier, created, attempts FROM outbox "
            "WHERE state = 'pending' ORDER BY id"
        )
        # Channel, kind, tier and the time a row was written repeat on many rows: share one
        # object each (a first cycle has tens of thousands of rows, written at one moment).
        same: dict[Any, Any] = {}
        at = Times()

        return [
            PendingRow(
                r[0],
                r[1],
                same.setdefault(r[2], r[2]),
                same.setdefault(r[3], r[3]),
                same.setdefault(r[4], r[4]),
                at(r[5]),
                r[6],
            )
            for r in rows
            if kinds is None or r[2] in kinds
        ]

    def message_text(self, row_id: int) -> tuple[str, str]:
        row = self.db.execute("SELECT title, body FROM outbox WHERE id = ?", (row_id,)).fetchone()
        return (row[0] or "", row[1] or "") if row else ("", "")

    def claim(self, row_ids: Sequence[int], now: datetime, lease: timedelta = CLAIM_LEASE) -> bool:
        """Take the rows of one message for sending until now + lease. True when all of them
        are this process's now; False when one was delivered meanwhile or another process
        holds a claim on it whose lease still runs (then nothing is claimed)."""
        ids = list(dict.fromkeys(row_ids))
        try:
            with self.transaction():
                # One pass: each row taken where it is free; a row that was not means none is
                # (the transaction is rolled back). Looking first, then writing, went over
                # every row twice (a first cycle's digest has thousands).
                taken = 0
                for chunk in chunks(ids):
                    these, params = self.one_of("id", chunk)
                    rows = self.db.execute(  # `+state`: by id (see delivered)
                        f"""UPDATE outbox SET claim_owner = ?, claim_until = ?
                            WHERE {these} AND +state = 'pending'
                              AND (claim_owner IS NULL OR claim_owner = ? OR claim_until < ?)
                            RETURNING id""",
                        (self.owner, ts(now + lease), *params, self.owner, ts(now)),
                    )
                    taken += len(rows.fetchall())
                if taken < len(ids):
                    raise _NotAllFree
        except _NotAllFree:
            return False
        return True

    def delivered(self, row_ids: Sequence[int], now: datetime) -> None:
        with self.transaction():
            for chunk in chunks(list(row_ids)):  # a first cycle's digest covers thousands
                these, params = self.one_of("id", chunk)
                # `+state`: find the rows by id. Right after a first cycle PostgreSQL has no
                # statistics on the outbox yet and would read every pending row (tens of
                # thousands) through the partial index on state for each chunk of 500.
                self.db.execute(
                    "UPDATE outbox SET state = 'delivered', delivered_at = ?, last_error = NULL, "
                    f"claim_owner = NULL, claim_until = NULL WHERE {these} AND +state = 'pending'",
                    (ts(now), *params),
                )

    def failed(
        self, row_ids: Sequence[int], error: str, now: datetime, give_up_after: timedelta
    ) -> list[int]:
        """Record a failed attempt; rows failing for longer than `give_up_after` are dropped.

        Returns the ids of the rows dropped now.
        """
        with self.transaction():
            self.db.executemany(
                """UPDATE outbox SET attempts = attempts + 1, last_error = ?,
                       claim_owner = NULL, claim_until = NULL,
                       first_failure = COALESCE(first_failure, ?)
                   WHERE id = ? AND state = 'pending'""",
                [(error[:500], ts(now), row_id) for row_id in row_ids],
            )
            marks = ",".join("?" * len(row_ids))
            dropped = [
                row[0]
                for row in self.db.execute(
                    f"SELECT id FROM outbox WHERE id IN ({marks}) AND first_failure <= ?",
                    (*row_ids, ts(now - give_up_after)),
                )
            ]
            self.db.executemany(
                "UPDATE outbox SET state = 'dropped' WHERE id = ?", [(i,) for i in dropped]
            )
        return dropped

    def set_aside(self, row_ids: Sequence[int], reason: str) -> None:
        """Outbox rows whose message cannot be made: never retried, never pending forever."""
        self.db.executemany(
            "UPDATE outbox SET state = 'quarantined', last_error = ? "
            "WHERE id = ? AND state = 'pending'",
            [(reason[:500], row_id) for row_id in row_ids],
        )

    def deliveries_stuck_since(self) -> datetime | None:
        """Since when a due delivery has been failing or blocked (None: none is)."""
        return from_ts(self.get_meta(STUCK_META))

    def oldest_pending(self) -> datetime | None:
        row = self.db.execute("SELECT min(created) FROM outbox WHERE state = 'pending'").fetchone()
        return from_ts(row[0])

    def backlog(self) -> int:
        return int(
            self.db.execute("SELECT count(*) FROM outbox WHERE state = 'pending'").fetchone()[0]
        )
