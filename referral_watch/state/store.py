"""The state: leads, the outbox (which is also the history of what was sent), silences, the
poll log, and a little metadata; in a SQLite file, or in PostgreSQL with `state.url` (the
differences live in dialect.py: one SQL text serves both).

Times are stored as ISO-8601 UTC strings of one fixed width, so text order is time order.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from referral_watch.errors import LockedError, StateError
from referral_watch.model import (
    EXPIRED,
    RESOLVED,
    TIER,
    Alert,
    AuditEntry,
    Lead,
    MalformedReferral,
    PendingRow,
    Referral,
    Sent,
    parse_referral,
)
from referral_watch.state.dialect import Postgres, Sqlite, open_dialect, private_folder

SCHEMA_VERSION = 6

_T = TypeVar("_T")

MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE leads (
        id TEXT PRIMARY KEY,
        raw TEXT NOT NULL,
        customer TEXT NOT NULL,
        created TEXT NOT NULL,
        deadline TEXT NOT NULL,
        substatus TEXT NOT NULL,
        first_seen TEXT NOT NULL,
        last_seen TEXT NOT NULL,
        resolution TEXT,
        resolved_at TEXT,
        expired_at TEXT,
        expired_notified INTEGER NOT NULL DEFAULT 0,
        resolution_notified INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX leads_by_resolution ON leads (resolution, deadline);
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        lead_id TEXT,
        kind TEXT NOT NULL,
        channel TEXT NOT NULL,
        tier TEXT,
        severity INTEGER NOT NULL DEFAULT -1,
        state TEXT NOT NULL,
        created TEXT NOT NULL,
        delivered_at TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        first_failure TEXT,
        last_error TEXT,
        title TEXT,
        body TEXT
    );
    CREATE INDEX outbox_by_lead ON outbox (lead_id, channel);
    CREATE INDEX outbox_pending ON outbox (state) WHERE state = 'pending';
    CREATE TABLE silences (
        lead_id TEXT PRIMARY KEY,
        until TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        created_by TEXT NOT NULL DEFAULT '',
        created TEXT NOT NULL,
        through_deadline INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE polls (
        id INTEGER PRIMARY KEY,
        started TEXT NOT NULL,
        finished TEXT NOT NULL,
        ok INTEGER NOT NULL,
        fetched INTEGER NOT NULL DEFAULT 0,
        new INTEGER NOT NULL DEFAULT 0,
        skipped INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        needs_login INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # Partner Center webhook events (SPEC 15): one row per distinct event, so a redelivery
    # is recognised (the key) and an event answered but not yet handled survives a restart.
    2: """
    CREATE TABLE webhook_events (
        key TEXT PRIMARY KEY,
        event TEXT NOT NULL,
        lead_id TEXT,
        changed TEXT,
        received TEXT NOT NULL,
        state TEXT NOT NULL,
        handled_at TEXT,
        error TEXT
    );
    CREATE INDEX webhook_events_pending ON webhook_events (state) WHERE state = 'pending';
    CREATE INDEX webhook_events_by_received ON webhook_events (received);
    """,
    # Records set aside because they failed on their way (parse, deadline, store, render,
    # send): one row per record, keyed by its id (or "record:<hash>" when it has none).
    # Outbox rows that cannot be rendered get the state 'quarantined' (no new column).
    3: """
    CREATE TABLE quarantine (
        key TEXT PRIMARY KEY,
        lead_id TEXT,
        stage TEXT NOT NULL,
        reason TEXT NOT NULL,
        raw TEXT,
        first_seen TEXT NOT NULL,
        last_seen TEXT NOT NULL,
        notified INTEGER NOT NULL DEFAULT 0
    );
    """,
    # Answers given through referral-watch (SPEC 14), and refusals: who, when, what, result.
    4: """
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        lead_id TEXT NOT NULL,
        at TEXT NOT NULL,
        who TEXT NOT NULL,
        name TEXT NOT NULL DEFAULT '',
        via TEXT NOT NULL,
        action TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        result TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        request_id TEXT
    );
    CREATE INDEX audit_by_lead ON audit (lead_id, id);
    """,
    # Outbox claims (SPEC 16): a row is taken for sending by one process (claim_owner) until
    # claim_until, so two replicas that both believe they are active never send it twice.
    5: """
    ALTER TABLE outbox ADD COLUMN claim_owner TEXT;
    ALTER TABLE outbox ADD COLUMN claim_until TEXT;
    """,
    # The relay's queue (webhooks.forward_to, SPEC 15; see partner_center.webhooks.relay): one
    # row per verified event and target, with the body bytes and signature headers to pass on.
    6: """
    CREATE TABLE relay_queue (
        id INTEGER PRIMARY KEY,
        event_key TEXT NOT NULL,
        target TEXT NOT NULL,
        event TEXT NOT NULL,
        body BLOB NOT NULL,
        headers TEXT NOT NULL,
        received TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt TEXT NOT NULL,
        first_failure TEXT,
        last_error TEXT,
        done_at TEXT,
        claim_until TEXT,
        UNIQUE (event_key, target)
    );
    CREATE INDEX relay_queue_due ON relay_queue (state, next_attempt);
    """,
}

# The stages a record can fail in, in the order it goes through them.
STAGES = ("parse", "deadline", "store", "render", "send")
# Meta key: when the oldest due delivery still undelivered was queued (unset: none stuck).
STUCK_META = "delivery.stuck_since"
# Characters of a quarantined record's JSON kept for a support case.
QUARANTINE_RAW_LIMIT = 4096
# The audit columns, in AuditEntry's order after lead_id.
_AUDIT_COLUMNS = "lead_id, at, who, name, via, action, result, reason, detail, request_id"


def ts(moment: datetime) -> str:
    """A sortable fixed-width UTC timestamp."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def from_ts(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


# How long handled webhook events are remembered to recognise redeliveries.
WEBHOOK_KEYS_KEPT = timedelta(days=7)


@dataclass(frozen=True)
class WebhookEvent:
    """A verified Partner Center event: its dedupe key, name, referral id and change time."""

    key: str
    event: str
    lead_id: str | None
    changed: str | None


# How long a claim on an outbox row keeps other processes off it: longer than one send takes.
CLAIM_LEASE = timedelta(seconds=30)


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


class Store:
    """One open state (a SQLite file, or a PostgreSQL database given by its URL). Not shared
    between threads: open one per thread."""

    def __init__(self, where: Path | str, *, create: bool = True, name: str | None = None) -> None:
        """`where`: a SQLite file's path or a PostgreSQL URL; `name`: how the connection shows
        in PostgreSQL's pg_stat_activity (an active replica's work connections are fenced by
        it on takeover)."""
        self.dialect: Sqlite | Postgres = open_dialect(where, create=create)
        self.path = where
        self.shown = self.dialect.shown  # fit for messages: a URL without its password
        self.db: Any = self.dialect.connect(name)
        try:
            self._check_version()  # before anything writes to a file we may not understand
            self.dialect.tune(self.db)
            self._migrate()
        except self.dialect.errors as exc:
            self.db.close()
            raise StateError(self.dialect.explain(exc)) from None
        except StateError:
            self.db.close()
            raise

    @property
    def owner(self) -> str:
        """Who this process is in outbox claims."""
        return self.dialect.owner

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- schema -------------------------------------------------------------------------

    def _check_version(self) -> None:
        version = self.dialect.version(self.db)
        if version > SCHEMA_VERSION:
            what = "state file" if isinstance(self.dialect, Sqlite) else "state database"
            raise StateError(
                f"{what} {self.shown} was written by a newer referral-watch (schema {version}, "
                f"this version knows {SCHEMA_VERSION}): upgrade referral-watch or use another "
                f"{'file' if what == 'state file' else 'database'}"
            )

    def _migrate(self) -> None:
        if self.dialect.version(self.db) >= SCHEMA_VERSION:
            return
        for target in range(1, SCHEMA_VERSION + 1):
            with self.transaction():
                # Read again under the write lock: another replica may have migrated meanwhile.
                if self.dialect.version(self.db) >= target:
                    continue
                for statement in _statements(self.dialect.ddl(MIGRATIONS[target])):
                    self.db.execute(statement)
                self.dialect.set_version(self.db, target)

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """BEGIN (a writer's lock) ... COMMIT, or ROLLBACK on any exception (nothing
        half-written)."""
        try:
            self.dialect.begin(self.db)
        except self.dialect.errors as exc:
            raise StateError(self.dialect.explain(exc)) from None
        except StateError:
            self._rollback()
            raise
        try:
            yield self.db
        except self.dialect.errors as exc:  # e.g. the disk filled up mid-poll
            self._rollback()
            raise StateError(self.dialect.explain(exc)) from None
        except BaseException:
            self._rollback()
            raise
        try:
            self.db.execute("COMMIT")
        except self.dialect.errors as exc:
            self._rollback()
            raise StateError(self.dialect.explain(exc)) from None
        except StateError:
            self._rollback()
            raise

    def _rollback(self) -> None:
        # SQLite may already have rolled back by itself (SQLITE_FULL, SQLITE_IOERR ...);
        # a lost PostgreSQL connection has nothing left to roll back.
        try:
            if self.dialect.in_transaction(self.db):
                self.db.execute("ROLLBACK")
        except StateError:
            pass

    # --- leads --------------------------------------------------------------------------

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
        for chunk in _chunks(list(rows.values()), 200):
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
        marks = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * len(chunk))
        stored = self.db.execute(
            f"""INSERT INTO leads (id, raw, customer, created, deadline, substatus,
                                   first_seen, last_seen)
                VALUES {marks}
                ON CONFLICT (id) DO UPDATE SET
                    raw = excluded.raw, customer = excluded.customer,
                    created = excluded.created, deadline = excluded.deadline,
                    substatus = excluded.substatus, last_seen = excluded.last_seen,
                    resolution = NULL, resolved_at = NULL, resolution_notified = 0
                RETURNING id, first_seen""",
            [value for row in chunk for value in row],
        )
        return [(str(row[0]), str(row[1])) for row in stored]

    def absent_since(self, moment: datetime, *, seen: Collection[str] = ()) -> list[str]:
        """Watched leads that the poll which started at `moment` did not return: not stored by
        it, and not in `seen` (the leads it found unchanged and so did not rewrite)."""
        rows = self.db.execute(
            "SELECT id FROM leads WHERE resolution IS NULL AND last_seen < ? ORDER BY deadline",
            (ts(moment),),
        )
        return [row[0] for row in rows if row[0] not in seen]

    def refresh(self, referral: Referral, deadline: datetime) -> None:
        """A by-id fetch found the lead still waiting: keep its data current."""
        self.db.execute(
            "UPDATE leads SET raw = ?, customer = ?, deadline = ?, substatus = ? WHERE id = ?",
            (referral.raw, referral.customer, ts(deadline), referral.substatus, referral.id),
        )

    def resolve(self, lead_id: str, resolution: str, now: datetime, raw: str | None = None) -> None:
        self.db.execute(
            """UPDATE leads SET resolution = ?, resolved_at = ?, raw = COALESCE(?, raw),
                   substatus = CASE WHEN ? = 'gone' THEN substatus ELSE ? END
               WHERE id = ?""",
            (resolution, ts(now), raw, resolution, resolution.capitalize(), lead_id),
        )
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
        self.db.execute(
            """UPDATE outbox SET state = 'superseded'
               WHERE kind = 'tier' AND state = 'pending'
                 AND lead_id IN (SELECT id FROM leads WHERE deadline < ?)""",
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
        for chunk in _chunks(ids):
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
                       a.request_id AS a_request_id
                FROM leads l LEFT JOIN silences s ON s.lead_id = l.id
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
        """Leads with only id, customer, created, deadline and resolution filled in, without
        reading their stored JSON: enough to order and group outbox rows, never to render."""
        outlines = LeadOutlines()
        for chunk in _chunks(list(ids)):
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(
                "SELECT id, customer, created, deadline, first_seen, last_seen, resolution "
                f"FROM leads WHERE id IN ({marks})",
                chunk,
            )
            for row in rows:
                outlines.rows[row[0]] = tuple(row)
        return outlines

    def fingerprints(self) -> dict[int, str]:
        """The watched leads' ids by hash() of their stored record text. A poll looks up what
        it receives in this to recognise unchanged leads without decoding them (the hashes are
        valid in this process only)."""
        rows = self.db.execute("SELECT id, raw FROM leads WHERE resolution IS NULL")
        return {hash(raw): lead_id for lead_id, raw in rows}

    def policy_candidates(
        self,
        points: Sequence[tuple[str, str, datetime, datetime | None]],
        now: datetime,
        *,
        expired_notices: bool = True,
        resolved_notices: bool = True,
    ) -> list[str]:
        """Ids of the leads the policy may have something to say about at ``now``, most urgent
        first: a superset of those ``policy.due_alerts`` returns alerts for.

        ``points`` are (channel, tier, cutoff, repeat_after) from ``policy.tier_points``: the
        tier is due for a lead whose deadline <= cutoff. A watched lead is a candidate when a due
        tier has no outbox row yet for that channel, or the tier repeats and no row of it that
        was not skipped is newer than repeat_after. Every other lead has heard all that is due,
        so a steady cycle reads (and parses) none of them.
        """
        points = list(points) or [("", "", datetime.min.replace(tzinfo=UTC), None)]
        values = ",".join("(?, ?, ?, ?)" for _ in points)
        params: list[Any] = [
            value
            for channel, tier, cutoff, repeat_after in points
            for value in (channel, tier, ts(cutoff), ts(repeat_after) if repeat_after else None)
        ]
        moment = ts(now)
        params += [moment, int(expired_notices), moment, int(resolved_notices)]
        rows = self.db.execute(
            f"""WITH points (channel, tier, cutoff, repeat_after) AS (VALUES {values})
                SELECT l.id FROM leads l
                WHERE (l.resolution IS NULL AND l.deadline >= ? AND EXISTS (
                         SELECT 1 FROM points p
                         WHERE l.deadline <= p.cutoff AND (
                           NOT EXISTS (
                             SELECT 1 FROM outbox o
                             WHERE o.lead_id = l.id AND o.channel = p.channel
                               AND o.kind = 'tier' AND o.tier = p.tier)
                           OR (p.repeat_after IS NOT NULL AND NOT EXISTS (
                             SELECT 1 FROM outbox o
                             WHERE o.lead_id = l.id AND o.channel = p.channel
                               AND o.kind = 'tier' AND o.tier = p.tier
                               AND o.state != 'skipped' AND o.created > p.repeat_after)))))
                   OR (? = 1 AND l.expired_notified = 0
                       AND ((l.resolution IS NULL AND l.deadline < ?)
                            OR l.resolution = 'expired'))
                   OR (? = 1 AND l.resolution_notified = 0
                       AND l.resolution NOT IN ('expired', 'gone'))
                ORDER BY l.deadline""",
            params,
        )
        return [row[0] for row in rows]

    def ids_starting(self, prefix: str) -> list[str]:
        """Lead ids (any state) that begin with `prefix`, case-sensitive, without parsing leads."""
        rows = self.db.execute(
            "SELECT id FROM leads WHERE substr(id, 1, ?) = ? ORDER BY id", (len(prefix), prefix)
        )
        return [row[0] for row in rows]

    def known(self, lead_id: str) -> bool:
        row = self.db.execute("SELECT 1 FROM leads WHERE id = ?", (lead_id,)).fetchone()
        return row is not None

    def prune(self, now: datetime, keep_resolved: timedelta) -> int:
        cutoff = ts(now - keep_resolved)
        with self.transaction():
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
        """Every answer and refusal recorded for one lead, oldest first."""
        rows = self.db.execute(
            f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE lead_id = ? ORDER BY id", (lead_id,)
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

    def unsilence(self, lead_id: str) -> bool:
        with self.transaction():
            cursor = self.db.execute("DELETE FROM silences WHERE lead_id = ?", (lead_id,))
        return bool(cursor.rowcount > 0)

    # --- outbox -------------------------------------------------------------------------

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
                for chunk in _chunks(lead_ids)
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
        for part in _chunks(rows, 300):
            marks = ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(part))
            self.db.execute(
                "INSERT INTO outbox (lead_id, kind, channel, tier, severity, state, created) "
                f"VALUES {marks}",
                [value for row in part for value in row],
            )
        for kind, column in ((EXPIRED, "expired_notified"), (RESOLVED, "resolution_notified")):
            told = [alert.lead_id for alert in alerts if alert.kind == kind]
            for ids in _chunks(told):
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
        rows = self.db.execute(
            "SELECT id, lead_id, kind, channel, tier, created, attempts FROM outbox "
            "WHERE state = 'pending' ORDER BY id"
        )
        # Channel, kind and tier repeat on every row: share one string each (a first cycle
        # has tens of thousands of rows).
        same: dict[Any, Any] = {}
        return [
            PendingRow(
                r[0],
                r[1],
                same.setdefault(r[2], r[2]),
                same.setdefault(r[3], r[3]),
                same.setdefault(r[4], r[4]),
                datetime.fromisoformat(r[5]),
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
        with self.transaction():
            free = 0
            for chunk in _chunks(ids):
                marks = ",".join("?" * len(chunk))
                rows = self.db.execute(
                    f"""SELECT id FROM outbox WHERE id IN ({marks}) AND state = 'pending'
                          AND (claim_owner IS NULL OR claim_owner = ? OR claim_until < ?)
                        {self.dialect.for_update}""",
                    (*chunk, self.owner, ts(now)),
                )
                free += len(rows.fetchall())
            if free < len(ids):
                return False
            for chunk in _chunks(ids):
                marks = ",".join("?" * len(chunk))
                self.db.execute(
                    f"UPDATE outbox SET claim_owner = ?, claim_until = ? WHERE id IN ({marks})",
                    (self.owner, ts(now + lease), *chunk),
                )
        return True

    def delivered(self, row_ids: Sequence[int], now: datetime) -> None:
        with self.transaction():
            for chunk in _chunks(list(row_ids)):  # a first cycle's digest covers thousands
                marks = ",".join("?" * len(chunk))
                self.db.execute(
                    "UPDATE outbox SET state = 'delivered', delivered_at = ?, last_error = NULL, "
                    "claim_owner = NULL, claim_until = NULL "
                    f"WHERE id IN ({marks}) AND state = 'pending'",
                    (ts(now), *chunk),
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

    # --- quarantine ---------------------------------------------------------------------

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

    def watched_summary(self) -> tuple[int, datetime | None]:
        """How many leads are watched, and the earliest deadline among them (for metrics)."""
        count, soonest = self.db.execute(
            "SELECT count(*), min(deadline) FROM leads WHERE resolution IS NULL"
        ).fetchone()
        return int(count), from_ts(soonest)

    def backlog(self) -> int:
        return int(
            self.db.execute("SELECT count(*) FROM outbox WHERE state = 'pending'").fetchone()[0]
        )

    # --- webhook events -----------------------------------------------------------------

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
        for chunk in _chunks(sorted(lead_ids)):
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

    # --- the console -------------------------------------------------------------------

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

    # --- poll log and metadata ----------------------------------------------------------

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

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str | None) -> None:
        """Set or (with None) clear a metadata value; call inside transaction() or alone."""
        if value is None:
            self.db.execute("DELETE FROM meta WHERE key = ?", (key,))
        else:
            self.db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )


class LeadOutlines(Mapping[str, Lead]):
    """Lead outlines by id, built on each lookup from their columns: a first cycle delivers
    tens of thousands of rows, and a Lead object for each at once would weigh ten times more."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[Any, ...]] = {}
        self.whole: dict[str, Lead] = {}  # whole leads given instead of outlines

    def __getitem__(self, lead_id: str) -> Lead:
        if lead_id in self.whole:
            return self.whole[lead_id]
        _, customer, created, deadline, first, last, resolution = self.rows[lead_id]
        return Lead(
            referral=Referral(
                id=lead_id, name="", customer=customer, created=datetime.fromisoformat(created)
            ),
            deadline=datetime.fromisoformat(deadline),
            first_seen=datetime.fromisoformat(first),
            last_seen=datetime.fromisoformat(last),
            resolution=resolution,
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


def printable(text: str) -> str:
    """Text SQLite (and a terminal) can take: a lone surrogate becomes its escape, \\ud800."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _clip_raw(raw: str | None) -> str | None:
    return raw if raw is None or len(raw) <= QUARANTINE_RAW_LIMIT else raw[:QUARANTINE_RAW_LIMIT]


def _chunks(items: Sequence[_T], size: int = 500) -> list[Sequence[_T]]:
    """Pieces small enough for SQLite's limit on bound parameters."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


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
    import json

    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise MalformedReferral(f"stored record is not JSON: {exc}") from None
    return parse_referral(data, raw)


class InstanceLock:
    """A lock file beside the state file keeping a second process off the same state."""

    def __init__(self, path: Path) -> None:
        import filelock

        self.path = path
        private_folder(path.parent)
        self._lock = filelock.FileLock(str(path), timeout=0, mode=0o600)
        self._timeout = filelock.Timeout

    def acquire(self) -> None:
        try:
            self._lock.acquire()
        except self._timeout:
            raise LockedError(
                f"another referral-watch process holds the state lock {self.path}: "
                "stop it first (only one instance may use a state file)"
            ) from None
        except OSError as exc:  # e.g. a read-only file system: the lock file cannot be made
            raise StateError(
                f"cannot create the state lock {self.path} ({exc.strerror or exc}): "
                "give the service user write access to the state folder"
            ) from None

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
