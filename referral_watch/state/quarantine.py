"""Records set aside because they failed on their way (parse, deadline, store, render, send)."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime

from referral_watch.state.db import Database, printable, ts

# The stages a record can fail in, in the order it goes through them.
STAGES = ("parse", "deadline", "store", "render", "send")


# Characters of a quarantined record's JSON kept for a support case.
QUARANTINE_RAW_LIMIT = 4096


@dataclass(frozen=True)
class Quarantined:
    """A record set aside: which one, where on its way it failed, and why."""

    key: str  # the referral id, or "record:<hash>" for a record without a usable id
    lead_id: str | None
    stage: str  # one of STAGES
    reason: str
    first_seen: datetime
    last_seen: datetime
    notified: bool = False
    raw: str | None = None  # the start of the record's JSON


class Quarantine(Database):
    def quarantine(
        self,
        key: str,
        stage: str,
        reason: str,
        now: datetime,
        *,
        lead_id: str | None = None,
        raw: str | None = None,
    ) -> bool:
        """Set a record aside (or note that it is still bad); True when it is new here, so
        operations hear about it once. Works inside a transaction or alone."""
        seen = ts(now)
        key, reason = printable(key)[:200], printable(reason)
        lead_id = lead_id and printable(lead_id)[:200]
        row = self.db.execute(
            """INSERT INTO quarantine (key, lead_id, stage, reason, raw, first_seen, last_seen)
               VALUES (?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (key) DO UPDATE SET stage = excluded.stage,
                   reason = excluded.reason, raw = COALESCE(excluded.raw, quarantine.raw),
                   last_seen = excluded.last_seen
               RETURNING first_seen""",
            (
                key,
                lead_id,
                stage,
                reason[:500],
                raw and printable(_clip_raw(raw) or ""),
                seen,
                seen,
            ),
        ).fetchone()
        return bool(row[0] == seen)

    def release(self, keys: Iterable[str], stages: Collection[str] = STAGES) -> int:
        """Take records out of quarantine (they went through now); returns how many were in."""
        marks = ",".join("?" * len(stages))
        released = 0
        for key in keys:
            cursor = self.db.execute(
                f"DELETE FROM quarantine WHERE key = ? AND stage IN ({marks})", (key, *stages)
            )
            released += cursor.rowcount
        return released

    def quarantined(self, *, unnotified: bool = False) -> list[Quarantined]:
        """Records set aside, oldest first (only those operations have not heard of yet)."""
        where = "WHERE notified = 0" if unnotified else ""
        rows = self.db.execute(f"SELECT * FROM quarantine {where} ORDER BY first_seen, key")
        return [
            Quarantined(
                key=row["key"],
                lead_id=row["lead_id"],
                stage=row["stage"],
                reason=row["reason"],
                first_seen=datetime.fromisoformat(row["first_seen"]),
                last_seen=datetime.fromisoformat(row["last_seen"]),
                notified=bool(row["notified"]),
                raw=row["raw"],
            )
            for row in rows
        ]

    def quarantined_keys(self) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT key FROM quarantine")}

    def mark_quarantine_notified(self, keys: Iterable[str]) -> None:
        self.db.executemany(
            "UPDATE quarantine SET notified = 1 WHERE key = ?", [(key,) for key in keys]
        )


def _clip_raw(raw: str | None) -> str | None:
    return raw if raw is None or len(raw) <= QUARANTINE_RAW_LIMIT else raw[:QUARANTINE_RAW_LIMIT]
