"""What the console's pages read: waiting leads a page at a time, the recently closed ones,
and the messages about one lead."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from referral_watch.model import Lead
from referral_watch.state.db import from_ts, ts
from referral_watch.state.leads import Leads


class Console(Leads):
    def waiting_page(
        self, now: datetime, query: str = "", *, offset: int = 0, limit: int = 200
    ) -> tuple[list[Lead], int]:
        """One page of the leads still waiting before their deadline, most urgent first, and
        how many there are in all; ``query`` keeps those whose customer or stored record
        contains it (any case), e.g. a country code or a product name."""
        where = "resolution IS NULL AND deadline >= ?"
        params: list[str] = [ts(now)]
        if query:
            pattern = "%" + "".join("\\" + c if c in "\\%_" else c for c in query) + "%"
            where += " AND (customer LIKE ? ESCAPE '\\' OR raw LIKE ? ESCAPE '\\')"
            params += [pattern, pattern]
        total = int(
            self.db.execute(f"SELECT count(*) FROM leads WHERE {where}", params).fetchone()[0]
        )
        page = self._leads_where(
            f"l.id IN (SELECT id FROM leads WHERE {where} ORDER BY deadline "
            f"LIMIT {int(limit)} OFFSET {int(offset)})",
            params,
        )
        return page, total

    def waiting_after(
        self, after: tuple[str, str] | None, limit: int
    ) -> tuple[list[Lead], tuple[str, str] | None]:
        """The watched leads after the key ``after`` (deadline text, id) in the order of
        ``leads()`` (most urgent first), at most ``limit``; and the key to continue after, or
        None when no lead follows. Keyset paging: each page is an index range, however deep."""
        where, params = "resolution IS NULL", []
        if after is not None:
            where += " AND deadline >= ? AND (deadline > ? OR id > ?)"
            params = [after[0], after[0], after[1]]
        keys = [
            (str(row[0]), str(row[1]))
            for row in self.db.execute(
                f"SELECT deadline, id FROM leads WHERE {where} ORDER BY deadline, id "
                f"LIMIT {int(limit) + 1}",
                params,
            )
        ]
        page = keys[:limit]
        # By id (their primary key: with "resolution IS NULL" too, SQLite would walk the
        # resolution index through every waiting lead instead).
        found = self.leads(include_resolved=True, ids=[lead_id for _, lead_id in page])
        return found, page[-1] if len(keys) > limit else None

    def lead_ids(self, *, include_resolved: bool = False) -> list[str]:
        """Every lead's id (watched ones only, unless asked), in the order of ``leads()``."""
        where = "1 = 1" if include_resolved else "resolution IS NULL"
        rows = self.db.execute(f"SELECT id FROM leads WHERE {where} ORDER BY deadline, id")
        return [str(row[0]) for row in rows]

    def recently_closed(self, now: datetime, since: datetime, limit: int = 50) -> list[Lead]:
        """Leads answered (or gone) since ``since``, and those whose deadline passed since
        then without an answer; the latest first."""
        where = (
            "(resolution IS NOT NULL AND resolved_at >= ?) "
            "OR (resolution IS NULL AND deadline < ? AND deadline >= ?)"
        )
        leads = self._leads_where(
            f"l.id IN (SELECT id FROM leads WHERE {where} "
            f"ORDER BY coalesce(resolved_at, deadline) DESC LIMIT {int(limit)})",
            (ts(since), ts(now), ts(since)),
        )
        return sorted(leads, key=lambda x: x.resolved_at or x.deadline, reverse=True)

    def messages_for(self, lead_id: str) -> list[dict[str, Any]]:
        """Every outbox row about one lead, oldest first: what was sent, held or skipped where,
        and when (the console's lead page)."""
        rows = self.db.execute(
            "SELECT kind, channel, tier, state, created, delivered_at, attempts FROM outbox "
            "WHERE lead_id = ? ORDER BY id",
            (lead_id,),
        )
        return [
            {**dict(row), "created": from_ts(row["created"]), "delivered_at": from_ts(row[5])}
            for row in rows
        ]
