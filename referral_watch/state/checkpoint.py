"""SQLite's write-ahead log copied back into the state file off the writer's thread.

SQLite commits by appending to the state's WAL file; a checkpoint copies those pages into the
state file itself. By default the connection that commits does it, inside COMMIT, once the log
holds 1,000 pages (4 MiB): a first poll of 20,000 leads (about 28 MiB) waited some 0.2 s for it
before delivering a single alert. Here a thread of the state's own, with a connection of its
own, checkpoints after each commit (PASSIVE: it never waits for, nor blocks, a reader or a
writer), while the cycle goes on delivering. Should it fail or fall behind, the committing
connection still checkpoints by itself once the log reaches AUTOCHECKPOINT_PAGES: the log never
grows without bound.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

# Pages of WAL (4 KiB each) at which a committing connection checkpoints by itself: 64 MiB.
AUTOCHECKPOINT_PAGES = 16_384


class Checkpoints:
    """Checkpoints of one SQLite state file, on a thread started at the first commit."""

    def __init__(self, path: Path, db: Any) -> None:
        self._path = path
        db.execute(f"PRAGMA wal_autocheckpoint = {AUTOCHECKPOINT_PAGES}")
        self._due = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._failed = False

    def committed(self) -> None:
        """A transaction was committed: checkpoint soon (on the thread, not the caller's)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="state-checkpoints", daemon=True)
            self._thread.start()
        self._due.set()

    def close(self) -> None:
        """Stop after the checkpoint in progress (closing the state checkpoints the rest)."""
        if self._thread is not None:
            self._closing = True
            self._due.set()
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        db: sqlite3.Connection | None = None
        try:
            db = sqlite3.connect(
                f"{self._path.resolve().as_uri()}?mode=rw", uri=True, isolation_level=None
            )
            while True:
                self._due.wait()
                self._due.clear()
                if self._closing:
                    return
                db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:  # the committing connection checkpoints by itself
            if not self._failed:
                log.warning("state.checkpoint_failed", path=str(self._path), error=str(exc))
                self._failed = True
        finally:
            if db is not None:
                db.close()
