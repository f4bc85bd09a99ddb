"""`state migrate --to URL`: copy a SQLite state file into an empty PostgreSQL database.

Every table of the file is copied (leads, outbox and so its history, silences, polls, meta,
and whatever later schemas added: quarantine, audit, webhook events ...), row for row and id
for id, in one transaction, then the rows of each table are counted on both sides. A target
that already holds rows is refused before anything is written, and so is one on which a
replica is active, or a file a daemon is using.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from referral_watch.errors import StateError
from referral_watch.state.store import Store

_NAME = re.compile(r"[a-z_][a-z0-9_]*")
BATCH = 1000  # rows per executemany


@dataclass(frozen=True)
class Copied:
    table: str
    source: int
    target: int

    @property
    def same(self) -> bool:
        return self.source == self.target


def tables_of(source: Store) -> list[str]:
    """The file's own tables, parents before children (as the schema created them)."""
    rows = source.db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite%' "
        "ORDER BY rowid"
    )
    return [_checked(row[0]) for row in rows]


def _checked(name: str) -> str:
    """A table or column name from the file's schema, safe to put in a statement."""
    if not _NAME.fullmatch(name):
        raise StateError(f"unexpected table or column name {name!r} in the state file")
    return name


def _columns(source: Store, table: str) -> dict[str, str]:
    """The table's column names and declared types."""
    rows = source.db.execute(f"PRAGMA table_info({table})")
    return {_checked(row[1]): str(row[2]).upper() for row in rows}


def _count(store: Store, table: str) -> int:
    return int(store.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def refuse_unless_empty(target: Store, tables: list[str]) -> None:
    for table in tables:
        rows = _count(target, table)
        if rows:
            raise StateError(
                f"database {target.shown} is not empty (table {table} has {rows} rows): "
                "migrate only into a new, empty database"
            )


def copy_state(source: Store, target: Store) -> list[Copied]:
    """Copy every table of `source` (SQLite) into `target` (PostgreSQL, at the same schema)."""
    tables = tables_of(source)
    with target.transaction():
        refuse_unless_empty(target, tables)
        for table in tables:
            _copy_table(source, target, table)
    return [Copied(table, _count(source, table), _count(target, table)) for table in tables]


def _copy_table(source: Store, target: Store, table: str) -> None:
    columns = _columns(source, table)
    names = ", ".join(columns)
    insert = f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' * len(columns))})"
    rows = source.db.execute(f"SELECT {names} FROM {table}")
    while batch := rows.fetchmany(BATCH):
        target.db.executemany(insert, [tuple(row) for row in batch])
    if columns.get("id") == "INTEGER" and _count(target, table):
        # Rows came with their ids: new rows continue after the highest one.
        target.db.execute(
            f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), max(id)) FROM {table}"
        )


def migrate(path: Path, url: str) -> list[Copied]:
    """Open both sides (the target gets the current schema first) and copy."""
    if not path.exists():
        raise StateError(f"state file {path} does not exist: nothing to migrate")
    with Store(path, create=False) as source, Store(url) as target:
        if _version(source) != _version(target):
            raise StateError(
                f"state file {path} and database {target.shown} are at different schemas: "
                "run the same referral-watch version on both"
            )
        return copy_state(source, target)


def _version(store: Store) -> int:
    return store.dialect.version(store.db)
