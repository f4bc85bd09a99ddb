"""The leads table (and the silences on them): what the poll stored, what the policy reads."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from referral_watch.model import (
    AuditEntry,
    Lead,
    MalformedReferral,
    Referral,
    parse_referral,
    record_digest,
)
from referral_watch.state.candidates import UNKNOWN, Candidates
from referral_watch.state.claims import CLAIM_COLUMNS, claim_from, claim_of_values
from referral_watch.state.db import chunks, from_ts, ts
from referral_watch.state.dialect import Postgres
from referral_watch.state.webhook_events import WEBHOOK_KEYS_KEPT


@dataclass(frozen=True)
class Silence:
    """A running silence (`silences`): whose lead, until when, why, set by whom and when."""

    lead_id: str
    until: datetime
    reason: str
    by: str
    since: datetime
    through_deadline: bool
    customer: str
    deadline: datetime | None  # None when the lead has been pruned from the state
    resolution: str | None


_UPSERT_COLUMNS = "id, raw, digest, customer, created, deadline, substatus, first_seen, last_seen"
_ON_CONFLICT = """ON CONFLICT (id) DO UPDATE SET
                    raw = excluded.raw, digest = excluded.digest, customer = excluded.customer,
                    created = excluded.created, deadline = excluded.deadline,
                    substatus = excluded.substatus, last_seen = excluded.last_seen,
                    resolution = NULL, resolved_at = NULL, resolution_notified = 0"""


def _all_text(rows: Sequence[tuple[Any, ...]]) -> bool:
    """Whether every value is text PostgreSQL takes (UTF-8, no NUL): the page's arrays failing
    on a value would end the whole transaction, a bound statement only that row (set aside)."""
    try:
        for row in rows:
            for value in row:
                if "\x00" in value:
                    return False
                value.encode("utf-8")
    except (UnicodeEncodeError, TypeError):
        return False
    return True


PRUNED_META = "state.pruned_at"


class Leads(Candidates):
    def upsert(
        self, referrals: Iterable[Referral], deadline: Callable[[Referral], datetime], now: datetime
    ) -> int:
        """Store a page of the poll; returns how many were new. Call inside transaction()."""
        return sum(self.upsert_each(referrals, deadline, now))

    def upsert_each(
        self,
        referrals: Iterable[Referral],
        deadline: Callable[[Referral], datetime],
        now: datetime,
        *,
        rejected: Callable[[Referral, BaseException], None] | None = None,
    ) -> list[bool]:
        """Store a page of the poll; for each referral, whether it was new (first seen now).
        A referral this store cannot hold (text it cannot encode, ...) is handed to `rejected`
        (counted as not new) instead of failing the page. Call inside transaction()."""
        seen = ts(now)
        given = list(referrals)
        # One statement per slice of the page; a lead twice in it is stored once, the last
        # copy winning (as one statement per record would leave it).
        rows: dict[str, tuple[Any, ...]] = {}
        refused: set[str] = set()
        for ref in given:
            try:
                rows[ref.id] = (
                    ref.id,
                    ref.raw,
                    record_digest(ref.raw),
                    ref.customer,
                    ts(ref.created),
                    ts(deadline(ref)),
                    ref.substatus,
                    seen,
                    seen,
                )
            except (OverflowError, ValueError) as exc:  # no deadline can be computed
                if rejected is None:
                    raise
                rejected(ref, exc)
                refused.add(ref.id)
        by_id = {ref.id: ref for ref in given}
        first_seen: dict[str, str] = {}
        for chunk in chunks(list(rows.values()), 200):
            try:
                first_seen.update(self._upsert_rows(chunk))
            except self.dialect.record_errors:
                if rejected is None:
                    raise
                # Nothing of the statement was stored (its values could not be bound): one
                # by one, to set aside only the records this store cannot hold.
                for row in chunk:
                    try:
                        first_seen.update(self._upsert_rows([row]))
                    except self.dialect.record_errors as exc:
                        rejected(by_id[row[0]], exc)
                        refused.add(row[0])
        return [ref.id not in refused and first_seen.get(ref.id) == seen for ref in given]

    def _upsert_rows(self, chunk: Sequence[tuple[Any, ...]]) -> list[tuple[str, str]]:
        if isinstance(self.dialect, Postgres) and _all_text(chunk):
            stored = self._upsert_arrays(chunk)
            self.unsettle([lead_id for lead_id, _ in stored], written=True)
            return stored
        marks = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(chunk))
        rows = self.db.execute(
            f"""INSERT INTO leads ({_UPSERT_COLUMNS})
                VALUES {marks}
{_ON_CONFLICT}
                RETURNING id, first_seen""",
            [value for row in chunk for value in row],
        )
        stored = [(str(row[0]), str(row[1])) for row in rows]
        # New or changed (its deadline too, perhaps): when its next tier falls due is worked
        # out again before the policy's candidates are chosen (state.candidates).
        self.unsettle([lead_id for lead_id, _ in stored])
        return stored

    def _upsert_arrays(self, chunk: Sequence[tuple[Any, ...]]) -> list[tuple[str, str]]:
        """PostgreSQL: one statement for the slice, each column one array (sent in binary), and
        the leads' next tier moments made unknown in the same statement (``unsettle``): one
        round trip, where a temporary table, its COPY and the inserts took five. (The ids
        are distinct: ``upsert_each`` keeps the last copy of a lead.)"""
        arrays = ", ".join(["?::text[]"] * len(chunk[0]))
        rows = self.db.execute(
            f"""WITH stored AS (
                    INSERT INTO leads ({_UPSERT_COLUMNS})
                    SELECT * FROM unnest({arrays})
                    {_ON_CONFLICT}
                    RETURNING id, first_seen),
                unknown AS (
                    INSERT INTO lead_quiet (lead_id, until) SELECT id, '{UNKNOWN}' FROM stored
                    ON CONFLICT (lead_id) DO UPDATE SET until = '{UNKNOWN}')
                SELECT id, first_seen FROM stored""",
            [list(column) for column in zip(*chunk, strict=True)],
        )
        return [(str(row[0]), str(row[1])) for row in rows]

    def absent_since(
        self,
        moment: datetime,
        *,
        seen: Collection[str] = (),
        among: Sequence[str] | None = None,
    ) -> list[str]:
        """Watched leads that the poll which started at `moment` did not return: not stored by
        it, and not in `seen` (the leads it found unchanged and so did not rewrite). ``among``:
        the watched leads when the poll began (``digests()``): only those not seen are read
        again, not every watched lead. Most urgent first."""
        if among is None:
            rows = self.db.execute(
                "SELECT id FROM leads WHERE resolution IS NULL AND last_seen < ? ORDER BY deadline",
                (ts(moment),),
            )
            return [row[0] for row in rows if row[0] not in seen]
        absent: list[tuple[str, str]] = []
        for chunk in chunks([lead_id for lead_id in among if lead_id not in seen]):
            marks = ",".join("?" * len(chunk))
            absent += self.db.execute(
                f"SELECT deadline, id FROM leads WHERE id IN ({marks}) "
                "AND resolution IS NULL AND last_seen < ?",
                [*chunk, ts(moment)],
            ).fetchall()
        return [str(row[1]) for row in sorted(absent, key=lambda row: str(row[0]))]

    def refresh(self, referral: Referral, deadline: datetime) -> None:
        """A by-id fetch found the lead still waiting: keep its data current."""
        self.db.execute(
            "UPDATE leads SET raw = ?, digest = ?, customer = ?, deadline = ?, substatus = ? "
            "WHERE id = ?",
            (
                referral.raw,
                record_digest(referral.raw),
                referral.customer,
                ts(deadline),
                referral.substatus,
                referral.id,
            ),
        )
        self.unsettle([referral.id])  # its deadline may have moved

    def resolve(self, lead_id: str, resolution: str, now: datetime, raw: str | None = None) -> None:
        self.db.execute(
            """UPDATE leads SET resolution = ?, resolved_at = ?, raw = COALESCE(?, raw),
                   digest = COALESCE(?, digest),
                   substatus = CASE WHEN ? = 'gone' THEN substatus ELSE ? END
               WHERE id = ?""",
            (
                resolution,
                ts(now),
                raw,
                None if raw is None else record_digest(raw),
                resolution,
                resolution.capitalize(),
                lead_id,
            ),
        )
        self.db.execute("DELETE FROM lead_quiet WHERE lead_id = ?", (lead_id,))  # not watched
        # A reminder still held (quiet hours, failing channel) is moot once the lead is answered.
        self.db.execute(
            "UPDATE outbox SET state = 'superseded' "
            "WHERE lead_id = ? AND kind = 'tier' AND +state = 'pending'",
            (lead_id,),
        )

    def mark_expired(self, now: datetime) -> None:
        """Remember when watched leads passed their deadline unanswered (for reports)."""
        self.db.execute(
            """UPDATE leads SET expired_at = deadline
               WHERE resolution IS NULL AND expired_at IS NULL AND deadline < ?""",
            (ts(now),),
        )
        # A reminder still held when the deadline passes would only confuse: the expired
        # notice speaks for the lead now.
        # From the pending rows (none, most cycles) to their leads by id: `lead_id IN (SELECT
        # id FROM leads WHERE deadline < ?)` read every lead (PostgreSQL: ~5 ms at 20,000
        # leads in a steady cycle, ~70 ms after a first one).
        self.db.execute(
            """UPDATE outbox SET state = 'superseded'
               WHERE kind = 'tier' AND state = 'pending'
                 AND (SELECT deadline FROM leads WHERE leads.id = outbox.lead_id) < ?""",
            (ts(now),),
        )

    def leads(
        self,
        *,
        include_resolved: bool = False,
        for_policy: bool = False,
        ids: Sequence[str] | None = None,
    ) -> list[Lead]:
        """Watched leads (plus resolved ones on request, or those with a notice still owed),
        most urgent first; ``ids`` limits them to those leads."""
        where = "l.resolution IS NULL"
        if include_resolved:
            where = "1 = 1"
        elif for_policy:
            where = """(l.resolution IS NULL
                        OR (l.resolution = 'expired' AND l.expired_notified = 0)
                        OR (l.resolution NOT IN ('expired', 'gone')
                            AND l.resolution_notified = 0))"""
        if ids is None:
            return self._leads_where(where, ())
        found: list[Lead] = []
        for chunk in chunks(ids):
            marks = ",".join("?" * len(chunk))
            found.extend(self._leads_where(f"{where} AND l.id IN ({marks})", chunk))
        found.sort(key=lambda lead: lead.deadline)  # stable: chunks are already in order
        return found

    def _leads_where(self, where: str, params: Sequence[str]) -> list[Lead]:
        rows = self.db.execute(
            f"""SELECT l.*, s.until AS silenced_until, s.reason AS silence_reason,
                       s.through_deadline,
                       (SELECT group_concat(DISTINCT o.tier) FROM outbox o
                         WHERE o.lead_id = l.id AND o.kind = 'tier' AND o.state = 'delivered')
                         AS tiers_sent,
                       a.at AS a_at, a.who AS a_who, a.name AS a_name, a.via AS a_via,
                       a.action AS a_action, a.result AS a_result, a.reason AS a_reason,
                       a.request_id AS a_request_id, {CLAIM_COLUMNS}
                FROM leads l LEFT JOIN silences s ON s.lead_id = l.id
                LEFT JOIN claims c ON c.lead_id = l.id
                LEFT JOIN audit a ON a.id = (
                    SELECT max(id) FROM audit WHERE lead_id = l.id
                      AND result IN ('accepted', 'declined'))
                WHERE {where} ORDER BY l.deadline, l.id""",
            params,
        )
        return [lead for lead in (_lead(row) for row in rows) if lead is not None]

    def lead(self, lead_id: str) -> Lead | None:
        found = self.leads(include_resolved=True, ids=[lead_id])
        return found[0] if found else None

    def lead_outlines(self, ids: Iterable[str]) -> LeadOutlines:
        """What ordering and addressing outbox rows needs of these leads, without reading their
        stored JSON: each one's deadline, and an outline (id, customer, created, deadline,
        resolution, claim; never enough to render) of each one with a claim. A first cycle
        delivers tens of thousands of rows and only a few of its leads are claimed."""
        outlines = LeadOutlines()
        read = datetime.fromisoformat
        for chunk in chunks(list(ids)):
            these, params = self.one_of("id", chunk)
            rows = self.tuples(f"SELECT id, deadline FROM leads WHERE {these}", params)
            outlines.deadlines.update((lead_id, read(deadline)) for lead_id, deadline in rows)
            claimed = self.db.execute(
                "SELECT id, customer, created, deadline, first_seen, last_seen, resolution, "
                f"{CLAIM_COLUMNS} FROM leads l JOIN claims c ON c.lead_id = l.id WHERE {these}",
                params,
            )
            for row in claimed:
                lead_id, customer, created, deadline, first, last, resolution = row[:7]
                referral = Referral(id=lead_id, name="", customer=customer, created=read(created))
                outlines.leads[lead_id] = Lead(
                    referral=referral,
                    deadline=read(deadline),
                    first_seen=read(first),
                    last_seen=read(last),
                    resolution=resolution,
                    claim=claim_of_values(row[7:]),
                )
        return outlines

    def watched_digests(self) -> tuple[set[str], int]:
        """(the digests of the watched leads' stored records, how many leads are watched):
        what a steady poll needs to recognise its records unchanged, in one value (a
        digest is hexadecimal: no comma in it)."""
        joined, count = self.db.execute(
            "SELECT group_concat(digest), count(*) FROM leads WHERE resolution IS NULL"
        ).fetchone()
        return (set(joined.split(",")) if joined else set()), int(count)

    def digests(self) -> list[tuple[str, str | None]]:
        """(id, digest of its stored record or None) of every watched lead. A poll recognises
        an unchanged record by its digest, without reading stored texts (an index holds both)."""
        # Plain tuples: on PostgreSQL a third of the time at 20,000.
        return self.tuples("SELECT id, digest FROM leads WHERE resolution IS NULL")

    def ids_starting(self, prefix: str) -> list[str]:
        """Lead ids (any state) that begin with `prefix`, case-sensitive, without parsing leads."""
        rows = self.db.execute(
            "SELECT id FROM leads WHERE substr(id, 1, ?) = ? ORDER BY id", (len(prefix), prefix)
        )
        return [row[0] for row in rows]

    def known(self, lead_id: str) -> bool:
        row = self.db.execute("SELECT 1 FROM leads WHERE id = ?", (lead_id,)).fetchone()
        return row is not None

    def watched_summary(self) -> tuple[int, datetime | None]:
        """How many leads are watched, and the earliest deadline among them (for metrics)."""
        count, soonest = self.db.execute(
            "SELECT count(*), min(deadline) FROM leads WHERE resolution IS NULL"
        ).fetchone()
        return int(count), from_ts(soonest)

    def pruned_at(self) -> datetime | None:
        """When the state was last pruned (None: never)."""
        return from_ts(self.get_meta(PRUNED_META))

    def prune(self, now: datetime, keep_resolved: timedelta) -> int:
        """Forget leads resolved longer than keep_resolved ago, with their outbox rows, audit,
        silence and claim, and old polls, webhook keys and quarantined records."""
        cutoff = ts(now - keep_resolved)
        with self.transaction():
            self.set_meta(PRUNED_META, ts(now))
            gone = [
                row[0]
                for row in self.db.execute(
                    "SELECT id FROM leads WHERE resolution IS NOT NULL AND resolved_at < ?",
                    (cutoff,),
                )
            ]
            for lead_id in gone:
                self.db.execute("DELETE FROM outbox WHERE lead_id = ?", (lead_id,))
                self.db.execute("DELETE FROM audit WHERE lead_id = ?", (lead_id,))
                self.db.execute("DELETE FROM silences WHERE lead_id = ?", (lead_id,))
                self.db.execute("DELETE FROM claims WHERE lead_id = ?", (lead_id,))
                self.db.execute("DELETE FROM lead_quiet WHERE lead_id = ?", (lead_id,))
                self.db.execute("DELETE FROM leads WHERE id = ?", (lead_id,))
            self.db.execute(
                "DELETE FROM outbox WHERE lead_id IS NULL AND state != 'pending' AND created < ?",
                (cutoff,),
            )
            self.db.execute("DELETE FROM polls WHERE finished < ?", (cutoff,))
            # Partner Center redelivers for about a day at most; a week of keys is plenty.
            self.db.execute(
                "DELETE FROM webhook_events WHERE state != 'pending' AND received < ?",
                (ts(now - WEBHOOK_KEYS_KEPT),),
            )
            self.db.execute("DELETE FROM quarantine WHERE last_seen < ?", (cutoff,))
        return len(gone)

    # --- silences -----------------------------------------------------------------------

    def silence(
        self,
        lead_id: str,
        until: datetime,
        now: datetime,
        *,
        reason: str = "",
        by: str = "",
        through_deadline: bool = False,
    ) -> None:
        with self.transaction():
            self.db.execute(
                """INSERT INTO silences (lead_id, until, reason, created_by, created,
                                         through_deadline)
                   VALUES (?, ?, ?, ?, ?, ?)
                   ON CONFLICT (lead_id) DO UPDATE SET until = excluded.until,
                       reason = excluded.reason, created_by = excluded.created_by,
                       created = excluded.created, through_deadline = excluded.through_deadline""",
                (lead_id, ts(until), reason, by, ts(now), int(through_deadline)),
            )

    def unsilence(self, lead_id: str) -> bool:
        with self.transaction():
            cursor = self.db.execute("DELETE FROM silences WHERE lead_id = ?", (lead_id,))
        return bool(cursor.rowcount > 0)

    def silences(self, now: datetime) -> list[Silence]:
        """The silences still running at ``now``, the one ending first first."""
        rows = self.db.execute(
            """SELECT s.lead_id, s.until, s.reason, s.created_by, s.created, s.through_deadline,
                      l.customer, l.deadline, l.resolution
               FROM silences s LEFT JOIN leads l ON l.id = s.lead_id
               WHERE s.until > ? ORDER BY s.until, s.lead_id""",
            (ts(now),),
        )
        return [
            Silence(
                lead_id=row["lead_id"],
                until=from_ts(row["until"]) or now,
                reason=row["reason"] or "",
                by=row["created_by"] or "",
                since=from_ts(row["created"]) or now,
                through_deadline=bool(row["through_deadline"]),
                customer=row["customer"] or "",
                deadline=from_ts(row["deadline"]),
                resolution=row["resolution"],
            )
            for row in rows
        ]


@dataclass
class LeadOutlines:
    """What delivery needs of the leads its outbox rows are about (Leads.lead_outlines)."""

    deadlines: dict[str, datetime] = field(default_factory=dict)  # every lead found
    leads: dict[str, Lead] = field(default_factory=dict)  # outlines of claimed leads, whole ones


def _lead(row: Any) -> Lead | None:
    try:
        referral = parse_referral_text(row["raw"])
    except (MalformedReferral, RecursionError, TypeError):  # stored by an older version
        return None
    tiers = tuple(sorted(set((row["tiers_sent"] or "").split(",")) - {""}))
    return Lead(
        referral=referral,
        deadline=datetime.fromisoformat(row["deadline"]),
        first_seen=datetime.fromisoformat(row["first_seen"]),
        last_seen=datetime.fromisoformat(row["last_seen"]),
        resolution=row["resolution"],
        resolved_at=from_ts(row["resolved_at"]),
        silenced_until=from_ts(row["silenced_until"]),
        silence_through_deadline=bool(row["through_deadline"]),
        silence_reason=row["silence_reason"] or "",
        expired_notified=bool(row["expired_notified"]),
        resolution_notified=bool(row["resolution_notified"]),
        tiers_sent=tiers,
        answered=_answered(row),
        claim=claim_from(row, "c_"),
    )


def _answered(row: Any) -> AuditEntry | None:
    if row["a_at"] is None:
        return None
    return AuditEntry(
        lead_id=row["id"],
        at=datetime.fromisoformat(row["a_at"]),
        who=row["a_who"],
        name=row["a_name"],
        via=row["a_via"],
        action=row["a_action"],
        result=row["a_result"],
        reason=row["a_reason"],
        request_id=row["a_request_id"],
    )


def parse_referral_text(raw: str) -> Referral:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise MalformedReferral(f"stored record is not JSON: {exc}") from None
    return parse_referral(data, raw)
