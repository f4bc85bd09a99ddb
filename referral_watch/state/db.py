"""The state's connection: a SQLite file or a PostgreSQL database (the differences live in
dialect.py: one SQL text serves both), its transactions and its metadata.

Times are stored as ISO-8601 UTC strings of one fixed width, so text order is time order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from referral_watch.errors import StateError
from referral_watch.state.checkpoint import Checkpoints
from referral_watch.state.dialect import Postgres, Sqlite, open_dialect

_T = TypeVar("_T")


def ts(moment: datetime) -> str:
    """A sortable fixed-width UTC timestamp."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def from_ts(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


class Times:
    """Stored timestamps read into datetimes, each distinct text once and into one shared
    object: the many rows one poll wrote (tens of thousands in a first cycle) share theirs."""

    def __init__(self) -> None:
        self._read: dict[str, datetime] = {}

    def __call__(self, text: str) -> datetime:
        found = self._read.get(text)
        if found is None:
            found = self._read[text] = datetime.fromisoformat(text)
        return found


def printable(text: str) -> str:
    """Text SQLite (and a terminal) can take: a lone surrogate becomes its escape, \\ud800."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def chunks(items: Sequence[_T], size: int = 500) -> list[Sequence[_T]]:
    """Pieces small enough for SQLite's limit on bound parameters."""
    return [items[i : i + size] for i in range(0, len(items), size)]


class Database:
    """One open state (a SQLite file, or a PostgreSQL database given by its URL), used by one
    thread at a time: open one per thread (a cycle lends its own to the poll's writer while it
    waits: cycle.writer). The table groups (leads, outbox, ...) build on it."""

    def __init__(
        self,
        where: Path | str,
        *,
        create: bool = True,
        name: str | None = None,
        connection: Any = None,
    ) -> None:
        """`where`: a SQLite file's path or a PostgreSQL URL; `name`: how the connection shows
        in PostgreSQL's pg_stat_activity (an active replica's work connections are fenced by
        it on takeover); `connection`: one already open (lent by a pool, see state.pool)."""
        self.dialect: Sqlite | Postgres = open_dialect(where, create=create)
        self.path = where
        self.shown = self.dialect.shown  # fit for messages: a URL without its password
        self.db: Any = self.dialect.connect(name) if connection is None else connection
        # SQLite's log checkpointed off the committing thread (a pool's lent connection keeps
        # SQLite's own checkpoints: it commits small transactions only).
        self._checkpoints: Checkpoints | None = None
        if isinstance(self.dialect, Sqlite) and connection is None:
            self._checkpoints = Checkpoints(self.dialect.path, self.db)

    @property
    def owner(self) -> str:
        """Who this process is in outbox claims."""
        return self.dialect.owner

    def one_of(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        """SQL saying ``column`` holds one of ``values`` (a chunk), and its parameters: one
        array on PostgreSQL (psycopg parses a statement of more than 50 parameters anew each
        time it runs), one parameter per value on SQLite."""
        if isinstance(self.dialect, Postgres):
            return f"{column} = ANY(?)", [list(values)]
        return f"{column} IN ({','.join('?' * len(values))})", list(values)

    def tuples(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """All the rows of a read as plain tuples, by position only: for reads of tens of
        thousands of rows (PostgreSQL builds no row object readable by name for each)."""
        if isinstance(self.dialect, Postgres):
            return self.db.tuples(sql, params)  # type: ignore[no-any-return]
        cursor = self.db.cursor()
        cursor.row_factory = None
        return cursor.execute(sql, params).fetchall()  # type: ignore[no-any-return]

    def close(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.close()
        self.db.close()

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        if self._checkpoints is not None:
            self._checkpoints.committed()

    def _rollback(self) -> None:
        # SQLite may already have rolled back by itself (SQLITE_FULL, SQLITE_IOERR ...);
        # a lost PostgreSQL connection has nothing left to roll back.
        try:
            if self.dialect.in_transaction(self.db):
                self.db.execute("ROLLBACK")
        except StateError:
            pass

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

    def wait_for_writers(self, seconds: float) -> None:
        """How long a write waits for another writer before the state counts as busy."""
        self.dialect.set_write_wait(self.db, seconds)
