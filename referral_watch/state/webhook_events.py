"""Partner Center webhook events (SPEC 15): one row per distinct event, so a redelivery is
recognised and an event answered but not yet handled survives a restart."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from referral_watch.state.db import Database, chunks, from_ts, ts

# How long handled webhook events are remembered to recognise redeliveries.
WEBHOOK_KEYS_KEPT = timedelta(days=7)


@dataclass(frozen=True)
class WebhookEvent:
    """A verified Partner Center event: its dedupe key, name, referral id and change time."""

    key: str
    event: str
    lead_id: str | None
    changed: str | None


class WebhookEvents(Database):
    def add_webhook_event(self, event: WebhookEvent, now: datetime) -> bool:
        """Remember a verified event; False when the same event was received before."""
        state = "pending" if event.lead_id is not None else "done"
        with self.transaction():
            cursor = self.db.execute(
                """INSERT INTO webhook_events (key, event, lead_id, changed, received, state)
                   VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING""",
                (event.key, event.event, event.lead_id, event.changed, ts(now), state),
            )
            return bool(cursor.rowcount == 1)

    def pending_webhook_leads(self) -> list[str]:
        """The lead ids of events received but not handled yet, oldest first, each once."""
        rows = self.db.execute(
            "SELECT lead_id FROM webhook_events WHERE state = 'pending' "
            "GROUP BY lead_id ORDER BY min(received)"
        )
        return [row[0] for row in rows]

    def webhook_events_handled(
        self, lead_ids: Collection[str], now: datetime, error: str | None = None
    ) -> None:
        """Mark the pending events of these leads handled (with the error, when it failed:
        polling is the safety net, so a failed event is not retried by itself)."""
        state = "failed" if error else "done"
        for chunk in chunks(sorted(lead_ids)):
            marks = ",".join("?" * len(chunk))
            self.db.execute(
                f"UPDATE webhook_events SET state = ?, handled_at = ?, error = ? "
                f"WHERE state = 'pending' AND lead_id IN ({marks})",
                (state, ts(now), error, *chunk),
            )

    def webhook_event_since(self, event: str, moment: datetime) -> datetime | None:
        """When the first ``event`` (e.g. test-created) received at or after ``moment`` was."""
        row = self.db.execute(
            "SELECT min(received) FROM webhook_events WHERE event = ? AND received >= ?",
            (event, ts(moment)),
        ).fetchone()
        return from_ts(row[0])

    def last_webhook_event(self) -> datetime | None:
        row = self.db.execute("SELECT max(received) FROM webhook_events").fetchone()
        return from_ts(row[0])
