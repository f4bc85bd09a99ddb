"""Where the state lives: a SQLite file (the default) or a PostgreSQL database (`state.url`).

The store's SQL is written once, in SQLite's spelling with `?` placeholders. A dialect holds
only what differs between the two: connecting, where the schema version is kept, how a write
transaction begins, the few spellings PostgreSQL needs instead (translated once per statement
text, never from data: every value is a bound parameter), and the operator's error messages.

Write transactions queue the same way on both: SQLite's BEGIN IMMEDIATE takes the file's write
lock; PostgreSQL takes a transaction advisory lock, so two writers (say, two replicas that both
believe they are active) never decide from the same snapshot.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import sqlite3
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from referral_watch.errors import StateError
from referral_watch.redact import database_url
from referral_watch.state.folder import make_state_folder

# Advisory lock keys (64-bit, any value; these spell "rw-write" and "rw-activ" in ASCII).
WRITE_LOCK = 0x72772D7772697465
ACTIVE_LOCK = 0x72772D6163746976
SCHEMA_LOCK = 0x72772D736368656D  # "rw-schem": creating or migrating the schema
# How long a writer waits for another one before the state counts as busy.
WRITE_WAIT = "60s"
CONNECT_TIMEOUT = 10  # seconds


def is_url(where: Path | str) -> bool:
    return isinstance(where, str) and where.startswith(("postgresql://", "postgres://"))


@functools.cache
def claim_owner() -> str:
    """This process's name in outbox claims and lock sessions: unique across replicas and
    restarts (the host name is cut so the whole fits PostgreSQL's application_name)."""
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Sqlite:
    name = "sqlite"
    errors: tuple[type[BaseException], ...] = (sqlite3.DatabaseError,)
    # What one record can make it raise (not the file's own trouble: full, locked, read-only):
    # that record is set aside, the poll goes on.
    record_errors: tuple[type[BaseException], ...] = (
        UnicodeError,
        ValueError,
        OverflowError,
        TypeError,
        sqlite3.InterfaceError,
        sqlite3.ProgrammingError,
        sqlite3.DataError,
        sqlite3.IntegrityError,
    )
    # One process per file (the lock file, SPEC 11): a crashed run's claims are its own.
    owner = "sqlite"
    for_update = ""  # BEGIN IMMEDIATE already holds the whole file

    def __init__(self, path: Path, *, create: bool) -> None:
        self.path = path
        self.shown = str(path)
        self.create = create

    def connect(self, name: str | None = None) -> Any:
        """A connection any thread may use, one thread at a time (never two at once): a
        pool's is lent to one thread after another (state.pool), a cycle's to its poll's
        writer while the cycle waits (cycle.writer)."""
        if not self.create and not self.path.exists():
            raise StateError(
                f"state file {self.path} does not exist yet: run `referral-watch run --once` first"
            )
        try:
            private_folder(self.path.parent)
            if self.create:
                _create_private(self.path)  # SQLite gives the WAL and SHM files the same mode
            db = sqlite3.connect(
                self.path, isolation_level=None, timeout=30, check_same_thread=False
            )
        except (sqlite3.DatabaseError, OSError) as exc:
            raise StateError(f"cannot open state file {self.path}: {exc}") from None
        db.row_factory = sqlite3.Row
        return db

    def tune(self, db: Any) -> None:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")

    def version(self, db: Any) -> int:
        return int(db.execute("PRAGMA user_version").fetchone()[0])

    def set_version(self, db: Any, version: int) -> None:
        db.execute(f"PRAGMA user_version = {int(version)}")  # PRAGMA takes no parameters

    def ddl(self, script: str) -> str:
        return script

    def begin(self, db: Any) -> None:
        db.execute("BEGIN IMMEDIATE")

    def in_transaction(self, db: Any) -> bool:
        return bool(db.in_transaction)

    def schema_lock(self, db: Any) -> Any:
        """BEGIN IMMEDIATE already keeps migrations apart, and SQLite sees a schema another
        connection changed."""
        return nullcontext()

    def set_write_wait(self, db: Any, seconds: float) -> None:
        db.execute(f"PRAGMA busy_timeout = {int(seconds * 1000)}")  # PRAGMA takes no parameters

    def explain(self, exc: BaseException) -> str:
        return explain_sqlite(self.path, exc)


class Postgres:
    name = "postgresql"
    errors: tuple[type[BaseException], ...] = ()  # _PgDb raises StateError itself
    # Raised before a statement reaches the server; a server error aborts the transaction,
    # so it stays a StateError (the poll fails, changing nothing).
    record_errors: tuple[type[BaseException], ...] = (
        UnicodeError,
        ValueError,
        OverflowError,
        TypeError,
    )
    for_update = "FOR UPDATE SKIP LOCKED"  # rows another writer is claiming are not free

    def __init__(self, url: str, *, create: bool) -> None:
        self.url = url
        self.shown = database_url(url)
        self.create = create
        self.owner = claim_owner()
        # How long a writer waits for another one ("60s", "250ms"; a constant of ours or a
        # caller's, never data): then the state counts as busy.
        self.write_wait = WRITE_WAIT

    def connect(self, name: str | None = None) -> Any:
        options = {"application_name": name[:63]} if name else {}
        return _PgDb(connect_pg(self.url, self.shown, **options), self.shown)

    def tune(self, db: Any) -> None:
        pass

    def version(self, db: Any) -> int:
        if db.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None:
            if not self.create:
                raise StateError(
                    f"database {self.shown} holds no referral-watch state yet: "
                    "run `referral-watch run --once` first"
                )
            return 0
        row = db.execute("SELECT max(version) FROM schema_version").fetchone()
        return int(row[0] or 0)

    def set_version(self, db: Any, version: int) -> None:
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        db.execute("DELETE FROM schema_version")
        db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))

    def ddl(self, script: str) -> str:
        return pg_ddl(script)

    def begin(self, db: Any) -> None:
        db.execute("BEGIN")
        wait = self.write_wait if re.fullmatch(r"\d+(ms|s)", self.write_wait) else WRITE_WAIT
        db.execute(f"SET LOCAL lock_timeout = '{wait}'")
        db.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK,))

    def in_transaction(self, db: Any) -> bool:
        return bool(db.in_transaction)

    @contextmanager
    def schema_lock(self, db: Any) -> Iterator[None]:
        """One process at a time creates or migrates the schema: a session advisory lock, held
        outside any transaction, so what is read after it sees the schema as now committed."""
        db.execute("SELECT pg_advisory_lock(?)", (SCHEMA_LOCK,))
        try:
            yield
        finally:
            if not db.broken:
                db.execute("SELECT pg_advisory_unlock(?)", (SCHEMA_LOCK,))

    def set_write_wait(self, db: Any, seconds: float) -> None:
        self.write_wait = f"{int(seconds * 1000)}ms"

    def explain(self, exc: BaseException) -> str:
        return explain_pg(self.shown, exc)


def open_dialect(where: Path | str, *, create: bool) -> Sqlite | Postgres:
    if is_url(where):
        return Postgres(str(where), create=create)
    return Sqlite(Path(where), create=create)


# --- SQLite ------------------------------------------------------------------------------------


def explain_sqlite(path: Path, exc: BaseException) -> str:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return f"state file {path} is busy (locked by another process): {text}"
    if "readonly" in text or "read-only" in text:
        return (
            f"state file {path} is read-only: "
            "give the service user write access to it and its folder"
        )
    if "not a database" in text or "malformed" in text:
        return (
            f"state file {path} is corrupt ({text}): restore it from a backup, or move it away "
            "to start afresh (leads will be seen as new)"
        )
    if "disk" in text and "full" in text:
        return f"no space left for state file {path}: free disk space (nothing was changed)"
    return f"state file {path}: {text}"


def private_folder(folder: Path) -> None:
    """Create the state folder (and missing parents) readable by the service user only:
    the state holds customer names and deal values. An existing folder is left as it is.
    StateError (the path and the fix) when it cannot be created."""
    make_state_folder(folder, mode=0o700)


def _create_private(path: Path) -> None:
    """Create an empty file 0600 unless it exists (whatever the umask)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.fchmod(fd, 0o600)
    os.close(fd)


# --- PostgreSQL --------------------------------------------------------------------------------


def connect_pg(url: str, shown: str, **options: Any) -> Any:
    """A psycopg connection in autocommit mode (the store says BEGIN itself), rows readable by
    index and by name like sqlite3.Row, Python booleans stored as 0/1 like SQLite does."""
    import psycopg

    how = connect_options()
    try:
        conn = psycopg.connect(url, **how["kwargs"], **options)
    except psycopg.Error as exc:
        raise StateError(explain_pg(shown, exc)) from None
    how["configure"](conn)
    return conn


def connect_options() -> dict[str, Any]:
    """How every state connection to PostgreSQL is made: ``kwargs`` for psycopg.connect (or a
    psycopg_pool's), then ``configure(conn)``."""

    def configure(conn: Any) -> None:
        from psycopg.types.array import ListBinaryDumper

        conn.adapters.register_dumper(bool, _bool_dumper())
        # A list parameter (an array: ``= ANY(?)``, ``unnest(?::text[])``) goes in binary: no
        # text to quote value by value here and parse there (a page's leads are ~130 KB).
        conn.adapters.register_dumper(list, ListBinaryDumper)

    kwargs = {"autocommit": True, "row_factory": _row_factory, "connect_timeout": CONNECT_TIMEOUT}
    return {"kwargs": kwargs, "configure": configure}


def pg_db(conn: Any, shown: str) -> Any:
    """The store's view of a psycopg connection (e.g. one lent by a pool)."""
    return _PgDb(conn, shown)


class _PgDb:
    """A psycopg connection that speaks the store's SQL: `?` placeholders, SQLite spellings
    translated, every database error raised as StateError (a lost connection fails the cycle;
    the next one connects again)."""

    def __init__(self, conn: Any, shown: str) -> None:
        self.conn = conn
        self.shown = shown

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        import psycopg

        try:
            return self.conn.execute(pg_sql(sql), tuple(params))
        except psycopg.Error as exc:
            raise StateError(explain_pg(self.shown, exc)) from None

    def tuples(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """All the rows as plain tuples: for a read of tens of thousands of rows, where a
        row object readable by name for each costs more than the read itself."""
        import psycopg
        from psycopg.rows import tuple_row

        try:
            with self.conn.cursor(row_factory=tuple_row) as cursor:
                cursor.execute(pg_sql(sql), tuple(params))
                return list(cursor.fetchall())
        except psycopg.Error as exc:
            raise StateError(explain_pg(self.shown, exc)) from None

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Any:
        import psycopg

        batch = [tuple(row) for row in rows]
        try:
            cursor = self.conn.cursor()
            if batch:  # an empty batch would still cost a round trip
                cursor.executemany(pg_sql(sql), batch)
            return cursor
        except psycopg.Error as exc:
            raise StateError(explain_pg(self.shown, exc)) from None

    def copy(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        """COPY rows into a table (ours, never data: the names are constants of the store's).
        Every value must already be text PostgreSQL takes (see Leads._upsert_rows)."""
        import psycopg

        try:
            with self.conn.cursor().copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        except psycopg.Error as exc:
            raise StateError(explain_pg(self.shown, exc)) from None

    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus

        status = self.conn.info.transaction_status
        return bool(status in (TransactionStatus.INTRANS, TransactionStatus.INERROR))

    @property
    def broken(self) -> bool:
        return bool(self.conn.broken or self.conn.closed)

    def close(self) -> None:
        self.conn.close()


# SQLite's "+state" (do not use an index on state here): an expression does the same in
# PostgreSQL, whose planner would otherwise pick the partial index of pending rows and scan
# them all for each lead.
_PLUS_COLUMN = re.compile(r"(?<=[\s(])\+([a-z_][a-z0-9_.]*)")
_GROUP_CONCAT = re.compile(r"group_concat\(((?:DISTINCT )?[\w.]+)\)")
_OR_IGNORE = re.compile(r"INSERT OR IGNORE INTO", re.IGNORECASE)


@functools.lru_cache(maxsize=512)
def pg_sql(sql: str) -> str:
    """The store's SQLite-spelled statement text in PostgreSQL's spelling (cached per text)."""
    text = sql.replace("%", "%%").replace("?", "%s")
    text = _PLUS_COLUMN.sub(r"(\1 || '')", text)
    text = _GROUP_CONCAT.sub(r"string_agg(\1, ',')", text)
    text = re.sub(r"\bIFNULL\(", "COALESCE(", text)
    if _OR_IGNORE.search(text):
        text = _OR_IGNORE.sub("INSERT INTO", text)
        head, returning, tail = text.partition(" RETURNING ")
        text = f"{head.rstrip()} ON CONFLICT DO NOTHING" + (returning + tail if returning else "")
    return text


def pg_ddl(script: str) -> str:
    """A SQLite migration as PostgreSQL DDL: 64-bit integers as SQLite has, identity keys, and
    byte-order ("C") text comparison, so the fixed-width ISO timestamps sort as time."""
    text = re.sub(
        r"\bINTEGER PRIMARY KEY( AUTOINCREMENT)?",
        "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
        script,
    )
    text = re.sub(r"\bINTEGER\b", "BIGINT", text)
    text = re.sub(r"\bREAL\b", "DOUBLE PRECISION", text)
    text = re.sub(r"\bBLOB\b", "BYTEA", text)
    return re.sub(r"\bTEXT\b", 'TEXT COLLATE "C"', text)


def _row_factory(cursor: Any) -> Any:
    names = tuple(column.name for column in cursor.description or ())
    return _row_class(names)


@functools.lru_cache(maxsize=256)
def _row_class(names: tuple[str, ...]) -> type[tuple[Any, ...]]:
    index = {name: i for i, name in enumerate(names)}

    class Row(tuple[Any, ...]):
        """A result row like sqlite3.Row: by position or by column name."""

        __slots__ = ()

        def __getitem__(self, key: Any) -> Any:
            if isinstance(key, str):
                return tuple.__getitem__(self, index[key])
            return tuple.__getitem__(self, key)

        def keys(self) -> list[str]:
            return list(names)

    return Row


def _bool_dumper() -> type[Any]:
    from psycopg.adapt import Dumper
    from psycopg.postgres import types

    class BoolAsInt(Dumper):
        oid = types["int8"].oid

        def dump(self, obj: Any) -> bytes:
            return b"1" if obj else b"0"

    return BoolAsInt


def explain_pg(shown: str, exc: BaseException) -> str:
    """One or two lines naming the database (its URL without the password) and what to do."""
    import psycopg

    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, psycopg.errors.LockNotAvailable):  # before OperationalError: a subclass
        return f"state database {shown} is busy (another writer holds it): {text}"
    if isinstance(exc, psycopg.OperationalError):
        if "password" in text or "authentication" in text:
            return (
                f"cannot sign in to the state database {shown}: {text} "
                "(check state.url's user and password, or PGPASSFILE)"
            )
        return (
            f"state database {shown} is unreachable: {text} "
            "(nothing was changed; the next cycle tries again)"
        )
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return f"state database {shown}: {text} (grant the user the rights it needs)"
    return f"state database {shown}: {text}"
