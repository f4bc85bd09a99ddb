"""A bounded pool of state connections, lent to one thread at a time: the webhook receiver's
threads (up to the web server's thread pool, 40) share a few connections instead of keeping one
each. On PostgreSQL the connections come from psycopg_pool (checked before each loan, replaced
when broken); a SQLite file needs no server connection, so a handful of open Stores do."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from referral_watch.errors import StateError
from referral_watch.state.dialect import Postgres, Sqlite, connect_options
from referral_watch.state.store import Store

POOL_SIZE = 4  # connections at most


class StorePool:
    """Up to `size` connections to the state at `where`; ``lend(wait)`` gives a Store over one
    of them for a unit of work, or StateError when none is free within `wait` seconds (the
    caller treats that as "busy", as it treats a write lock held by a poll). Each Store waits
    at most `write_wait` seconds for the state's write lock."""

    def __init__(self, where: Path | str, *, write_wait: float, size: int = POOL_SIZE) -> None:
        self.where = where
        self.size = size
        self.write_wait = write_wait
        self._idle: list[Store] = []
        self._free = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._pg: Any = None
        with Store(where) as first:  # the schema made current once, here
            postgres = isinstance(first.dialect, Postgres)
            self.shown = first.shown
        if postgres:
            from psycopg_pool import ConnectionPool

            options = connect_options()
            self._pg = ConnectionPool(
                str(where),
                min_size=1,
                max_size=size,
                kwargs=options["kwargs"],
                configure=options["configure"],
                check=ConnectionPool.check_connection,
                name="referral-watch-state",
                open=True,
            )

    @contextmanager
    def lend(self, wait: float) -> Iterator[Store]:
        if self._pg is not None:
            with self._lent_pg(wait) as pooled:
                yield pooled
            return
        if not self._free.acquire(timeout=wait):
            raise StateError(f"state {self.shown}: all {self.size} connections are busy")
        store: Store | None = None
        try:
            with self._lock:
                store = self._idle.pop() if self._idle else None
            if store is None:
                store = Store(self.where, connection=_shared_sqlite(self.where))
                store.wait_for_writers(self.write_wait)
            yield store
        except BaseException:
            if store is not None:  # it may be mid-way: not lent again
                store.close()
                store = None
            raise
        finally:
            if store is not None:
                with self._lock:
                    self._idle.append(store)
            self._free.release()

    @contextmanager
    def _lent_pg(self, wait: float) -> Iterator[Store]:
        from psycopg_pool import PoolTimeout

        from referral_watch.state.dialect import pg_db

        try:
            lent = self._pg.connection(timeout=wait)
            conn = lent.__enter__()
        except PoolTimeout:
            raise StateError(f"state {self.shown}: all {self.size} connections are busy") from None
        try:
            store = Store(self.where, connection=pg_db(conn, self.shown))
            store.wait_for_writers(self.write_wait)
            yield store
        except BaseException as exc:
            lent.__exit__(type(exc), exc, exc.__traceback__)
            raise
        else:
            lent.__exit__(None, None, None)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for store in idle:
            store.close()
        if self._pg is not None:
            self._pg.close()


def _shared_sqlite(where: Path | str) -> Any:
    """A connection to the SQLite file that one thread after another may use."""
    dialect = Sqlite(Path(where), create=False)
    db = dialect.connect()
    dialect.tune(db)
    return db
