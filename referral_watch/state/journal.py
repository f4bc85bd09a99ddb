"""The journal: every poll (for health, failures in a row, `status`) and every answer given
through referral-watch (the audit, SPEC 14)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from referral_watch.model import CLAIM_ACTIONS, AuditEntry
from referral_watch.state.db import from_ts, ts
from referral_watch.state.leads import Leads

# The audit columns, in AuditEntry's order after lead_id.
_AUDIT_COLUMNS = "lead_id, at, who, name, via, action, result, reason, detail, request_id"


@dataclass(frozen=True)
class PollRecord:
    started: datetime
    finished: datetime
    ok: bool
    fetched: int = 0
    new: int = 0
    skipped: int = 0
    error: str | None = None
    needs_login: bool = False


class Journal(Leads):
    def record_poll(self, poll: PollRecord) -> None:
        """Record a poll; call inside transaction() (a poll's record commits with its results)
        or alone."""
        self.db.execute(
            """INSERT INTO polls (started, finished, ok, fetched, new, skipped, error, needs_login)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                ts(poll.started),
                ts(poll.finished),
                int(poll.ok),
                poll.fetched,
                poll.new,
                poll.skipped,
                poll.error,
                int(poll.needs_login),
            ),
        )

    def fail_last_poll(self, error: str) -> None:
        """A later stage of the cycle threw: the cycle counts as failed (for
        `operations.after_failures` and the health verdict) though its poll went through."""
        self.db.execute(
            "UPDATE polls SET ok = 0, error = ? WHERE id = (SELECT max(id) FROM polls) AND ok = 1",
            (error[:500],),
        )

    def last_success(self) -> datetime | None:
        row = self.db.execute("SELECT max(finished) FROM polls WHERE ok = 1").fetchone()
        return from_ts(row[0])

    def failures_in_a_row(self) -> int:
        row = self.db.execute(
            "SELECT count(*) FROM polls "
            "WHERE id > COALESCE((SELECT max(id) FROM polls WHERE ok = 1), 0)"
        ).fetchone()
        return int(row[0])

    def last_poll(self) -> PollRecord | None:
        row = self.db.execute("SELECT * FROM polls ORDER BY id DESC LIMIT 1").fetchone()
        if row is None:
            return None
        return PollRecord(
            started=datetime.fromisoformat(row["started"]),
            finished=datetime.fromisoformat(row["finished"]),
            ok=bool(row["ok"]),
            fetched=row["fetched"],
            new=row["new"],
            skipped=row["skipped"],
            error=row["error"],
            needs_login=bool(row["needs_login"]),
        )

    # --- answers (SPEC 14) ---------------------------------------------------------------

    def record_answer(self, entry: AuditEntry, raw: str | None = None) -> None:
        """Keep an audit row; when Partner Center took the answer, resolve the lead at once
        (``accepted``/``declined``, its record as Partner Center returned it) so its reminders
        stop and ``on_resolved`` hears of it, in the same transaction."""
        with self.transaction():
            if entry.answered:
                self.resolve(entry.lead_id, entry.result, entry.at, raw)
            self.db.execute(
                f"INSERT INTO audit ({_AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.lead_id,
                    ts(entry.at),
                    entry.who,
                    entry.name,
                    entry.via,
                    entry.action,
                    entry.result,
                    entry.reason,
                    entry.detail[:500],
                    entry.request_id,
                ),
            )

    def audit(self, lead_id: str) -> list[AuditEntry]:
        """Every answer and refusal (and claim, SPEC 17) recorded for one lead, oldest first."""
        return self._audit_where("lead_id = ?", (lead_id,))

    def claim_events(self, since: datetime | None = None) -> list[AuditEntry]:
        """Every claim, take-over, unclaim and lapse in the audit (since ``since``), oldest
        first: the report's time to claim and time to answer."""
        where = f"action IN ({', '.join('?' * len(CLAIM_ACTIONS))})"
        params: list[str] = list(CLAIM_ACTIONS)
        if since is not None:
            where += " AND at >= ?"
            params.append(ts(since))
        return self._audit_where(where, params)

    def _audit_where(self, where: str, params: Sequence[str]) -> list[AuditEntry]:
        rows = self.db.execute(
            f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE {where} ORDER BY id", params
        )
        return [
            AuditEntry(
                lead_id=r[0],
                at=datetime.fromisoformat(r[1]),
                who=r[2],
                name=r[3],
                via=r[4],
                action=r[5],
                result=r[6],
                reason=r[7],
                detail=r[8],
                request_id=r[9],
            )
            for r in rows
        ]
