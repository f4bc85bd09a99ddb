"""The state's schema: its migrations, applied in order, under a lock so that processes
starting together on an empty database create it once (the others wait, then find it current).
"""

from __future__ import annotations

from referral_watch.errors import StateError
from referral_watch.state.db import Database
from referral_watch.state.dialect import Sqlite

SCHEMA_VERSION = 9


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
    # The digest of each lead's record as served (model.record_digest): a poll recognises an
    # unchanged record by it without reading the stored text (the index covers that read).
    # NULL (written before): the next poll reads that record once more and stores its digest.
    7: """
    ALTER TABLE leads ADD COLUMN digest TEXT;
    CREATE INDEX leads_watched ON leads (resolution, id, digest);
    """,
    # Claims (SPEC 17): who took each lead, until when; the row stays after a lapse (lapsed_at
    # set) for the lapse notice's wording. Claims, take-overs, lapses, unclaims: in the audit.
    8: """
    CREATE TABLE claims (
        lead_id TEXT PRIMARY KEY,
        email TEXT NOT NULL,
        name TEXT NOT NULL DEFAULT '',
        at TEXT NOT NULL,
        lapses_at TEXT NOT NULL,
        via TEXT NOT NULL,
        note TEXT NOT NULL DEFAULT '',
        lapsed_at TEXT
    );
    """,
    # When the next tier point of each watched lead can fall due, worked out from its deadline
    # and outbox rows ('' = not yet: every lead stored or changed since): a steady poll looks
    # only at the leads whose moment has come (state.candidates), not at every lead. Its own
    # narrow table: writing it does not rewrite the lead's row.
    9: """
    CREATE TABLE lead_quiet (lead_id TEXT PRIMARY KEY, until TEXT NOT NULL);
    CREATE INDEX lead_quiet_until ON lead_quiet (until);
    INSERT INTO lead_quiet (lead_id, until) SELECT id, '' FROM leads WHERE resolution IS NULL;
    """,
}


def prepare(database: Database) -> None:
    """Check the schema version (before anything writes to a file we may not understand),
    tune the connection and bring the schema up to date."""
    check_version(database)
    database.dialect.tune(database.db)
    if database.dialect.version(database.db) >= SCHEMA_VERSION:
        return
    # PostgreSQL: one process at a time past this point; a session advisory lock, so that the
    # version read after it (a new statement: the catalog as now committed) sees the schema
    # that the process before created. Read inside a transaction that began before waiting,
    # PostgreSQL's cached catalog could still miss it and create the tables again (issue 26).
    with database.dialect.schema_lock(database.db):
        migrate(database)


def check_version(database: Database) -> None:
    version = database.dialect.version(database.db)
    if version > SCHEMA_VERSION:
        what = "state file" if isinstance(database.dialect, Sqlite) else "state database"
        raise StateError(
            f"{what} {database.shown} was written by a newer referral-watch (schema {version}, "
            f"this version knows {SCHEMA_VERSION}): upgrade referral-watch or use another "
            f"{'file' if what == 'state file' else 'database'}"
        )


def migrate(database: Database) -> None:
    """Every migration the state lacks, in one transaction (a new state's first cycle waited
    for one commit per migration): all of them, or none."""
    with database.transaction():
        # Read again under the write lock: another process may have migrated meanwhile.
        current = database.dialect.version(database.db)
        if current >= SCHEMA_VERSION:
            return
        for target in range(current + 1, SCHEMA_VERSION + 1):
            for statement in _statements(database.dialect.ddl(MIGRATIONS[target])):
                database.db.execute(statement)
        database.dialect.set_version(database.db, SCHEMA_VERSION)


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
