"""Which replica is active, with the state in PostgreSQL (SPEC 16).

The active replica is the one holding a session advisory lock on a connection of its own (TCP
keepalives on, a short user timeout). A standby tries to take the lock every CHECK_EVERY
seconds; the active checks every CHECK_EVERY seconds that its connection still answers.

How each failure ends an active replica's term:
- the process dies: the server sees the socket close and drops the lock at once;
- the process is paused (SIGSTOP, a frozen VM) or cut off: its checks stop reaching the server,
  which ends the idle lock session after SERVER_IDLE (``idle_session_timeout``);
- the database goes away or the network breaks: the check fails (or has not succeeded for
  FRESH seconds), and the replica stops working before its next send.
FRESH < SERVER_IDLE, so a replica counts itself active only while the server still holds its
lock. A replica that takes the lock ends the old active's work connections (fencing), so a
paused one that wakes finds them gone; outbox claims with a lease cover the message it may
have been about to send.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from referral_watch.config import Config
from referral_watch.errors import LockedError, StateError
from referral_watch.state.dialect import ACTIVE_LOCK, claim_owner, connect_pg, explain_pg

log = structlog.get_logger(__name__)

CHECK_EVERY = 2.0  # seconds between lock checks
FRESH = 5.0  # the lock counts as ours this long after the last check that reached the server
SERVER_IDLE = "8s"  # the server ends a lock session silent for this long
APP_NAME = "referral-watch"


def work_name(owner: str) -> str:
    """application_name of an active replica's work connections (fenced on takeover)."""
    return f"{APP_NAME} work {owner}"[:63]


def _lock_options(owner: str) -> dict[str, Any]:
    return {
        "application_name": f"{APP_NAME} lock {owner}"[:63],
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 2,
        "tcp_user_timeout": 8000,  # ms: a send not acknowledged this long breaks the connection
        "options": f"-c idle_session_timeout={SERVER_IDLE} -c statement_timeout=5s",
    }


class Leadership:
    """This replica's claim to be the active one: `active` is true while it holds the lock."""

    def __init__(
        self, url: str, shown: str, on_change: Callable[[bool], None] | None = None
    ) -> None:
        self.url = url
        self.shown = shown
        self.owner = claim_owner()
        self.on_change = on_change
        self._conn: Any = None
        self.error: str | None = None  # why the last check failed to reach the database
        self._held = False
        self._last_ok = 0.0
        self._guard = threading.Lock()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return self._held and time.monotonic() - self._last_ok < FRESH

    def check(self) -> bool:
        """Take the lock if free, or confirm it is still ours; returns `active`."""
        with self._guard:
            was = self._held
            self.error = None
            try:
                self._check()
            except StateError as exc:
                self.error = str(exc)
                self._drop()
                log.warning("replica.lock_lost" if was else "replica.lock_error", error=str(exc))
            now = self.active
        if now != was and self.on_change is not None:
            self.on_change(now)
        return now

    def _check(self) -> None:
        import psycopg

        if self._conn is None or self._conn.closed or self._conn.broken:
            self._drop()
            self._conn = connect_pg(self.url, self.shown, **_lock_options(self.owner))
        try:
            if self._held:
                self._conn.execute("SELECT 1")
            else:
                row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (ACTIVE_LOCK,))
                self._held = bool(row.fetchone()[0])
                if self._held:
                    self._fence()
        except psycopg.Error as exc:
            raise StateError(explain_pg(self.shown, exc)) from None
        self._last_ok = time.monotonic()

    def _fence(self) -> None:
        """End the work connections of any earlier active replica (one that was paused or cut
        off may still believe it is active)."""
        rows = self._conn.execute(
            """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
               WHERE datname = current_database() AND pid <> pg_backend_pid()
                 AND application_name LIKE %s AND application_name <> %s""",
            (f"{APP_NAME} work %", work_name(self.owner)),
        )
        ended = int(rows.fetchone()[0])
        log.info("replica.active", owner=self.owner, fenced=ended)

    def _drop(self) -> None:
        self._held = False
        if self._conn is not None:
            with contextlib.suppress(Exception):  # closing a broken connection
                self._conn.close()
            self._conn = None

    # --- as a background thread ---------------------------------------------------------

    def start(self) -> None:
        self.check()
        self._thread = threading.Thread(target=self._loop, name="replica-lock", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._halt.wait(CHECK_EVERY):
            self.check()

    def stop(self) -> None:
        """Give up the lock (a standby takes over at its next check)."""
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._guard:
            if self._held and self._conn is not None and not self._conn.broken:
                with contextlib.suppress(Exception):  # the session ends right after anyway
                    self._conn.execute("SELECT pg_advisory_unlock(%s)", (ACTIVE_LOCK,))
            self._drop()


class OnceLock:
    """For `run --once` on PostgreSQL: the active lock for one cycle, or LockedError (exit 3)
    while a daemon replica is active."""

    def __init__(self, url: str, shown: str) -> None:
        self.leadership = Leadership(url, shown)

    def __enter__(self) -> OnceLock:
        if not self.leadership.check():
            self.leadership.stop()
            if self.leadership.error is not None:
                raise StateError(self.leadership.error)
            raise LockedError(
                f"another referral-watch replica is active on {self.leadership.shown}: "
                "it polls already (stop it first, or let it do the work)"
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self.leadership.stop()


def active_holder(url: str, shown: str) -> str | None:
    """The owner ("host:pid:tag") of the replica holding the active lock, or None."""
    import psycopg

    conn = connect_pg(url, shown)
    try:
        row = conn.execute(
            """SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid)
               WHERE l.locktype = 'advisory' AND l.granted AND l.database = (
                       SELECT oid FROM pg_database WHERE datname = current_database())
                 AND l.classid = %s AND l.objid = %s AND l.objsubid = 1""",
            (ACTIVE_LOCK >> 32, ACTIVE_LOCK & 0xFFFFFFFF),
        ).fetchone()
    except psycopg.Error as exc:
        raise StateError(explain_pg(shown, exc)) from None
    finally:
        conn.close()
    if row is None:
        return None
    return str(row[0]).removeprefix(f"{APP_NAME} lock ")


def state_lock(config: Config) -> Any:
    """What keeps a second `run --once` off the state: the lock file beside a SQLite file
    (SPEC 11), the active lock on PostgreSQL."""
    if config.state.url is not None:
        return OnceLock(config.state.url, config.state.shown)
    from referral_watch.state.lock import InstanceLock

    return InstanceLock(config.lock_path)


def active_elsewhere(url: str, shown: str) -> str | None:
    """For `status --check` on a replica: the active replica's owner when it runs on another
    host (this one is then a standby), else None (none is active, or this host's is)."""
    try:
        holder = active_holder(url, shown)
    except StateError:
        return None
    if holder is None or holder.split(":", 1)[0] == claim_owner().split(":", 1)[0]:
        return None
    return holder
