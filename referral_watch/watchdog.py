"""Is the daemon's work making progress? The systemd watchdog and the stop path ask.

systemd restarts a service whose watchdog pings stop. A timer pinging on its own would vouch
for a daemon whose cycle hangs forever (holding the work lock: no poll, no reminder), so the
ping is sent only while the work in flight keeps moving: a page arrives, a message is sent, a
cycle or report starts or ends. The API client and the sender are wrapped to report that.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import structlog

from referral_watch.config import Config

log = structlog.get_logger(__name__)


class Progress:
    """When the work (one cycle or one report at a time) last moved, and what it is doing."""

    def __init__(self, stuck_after: float) -> None:
        self.stuck_after = stuck_after  # seconds without progress that count as wedged
        self.lock = threading.Lock()  # one poll cycle or one report at a time
        self._busy = False
        self._moved = time.monotonic()
        self._sending = 0
        self._sent_at = 0.0  # when the last send ended
        self._count_lock = threading.Lock()  # channels send side by side

    @contextmanager
    def working(self) -> Iterator[None]:
        """Hold the work lock, counting the time from now as the work's."""
        with self.lock:
            self._busy = True
            self.moved()
            try:
                yield
            finally:
                self._busy = False
                self.moved()

    def moved(self) -> None:
        self._moved = time.monotonic()

    def stuck_for(self) -> float | None:
        """Seconds the work in flight has gone without progress, when past `stuck_after`."""
        idle = time.monotonic() - self._moved
        return idle if self._busy and idle > self.stuck_after else None

    @contextmanager
    def sending_one(self) -> Iterator[None]:
        with self._count_lock:
            self._sending += 1
        try:
            yield
        finally:
            with self._count_lock:
                self._sending -= 1
                self._sent_at = time.monotonic()

    @property
    def sending(self) -> bool:
        """Whether a message is being handed to a channel right now."""
        return self._sending > 0

    def wait_idle(self, grace: float, send_cap: float) -> bool:
        """After a stop signal: wait for the work in flight to end. A message being sent is
        waited for (up to `send_cap`) and then `grace` more, so its outcome is recorded and it
        is not sent again; anything else (a poll) gets `grace`, then is left behind: a poll
        that does not finish changes nothing. Returns whether the work ended."""
        began = time.monotonic()
        while not self.lock.acquire(timeout=0.05):
            now = time.monotonic()
            if now - began > send_cap + grace:
                return False
            if not self.sending and now - max(began, self._sent_at) > grace:
                return False
        self.lock.release()
        return True

    def watched(self, inner: Any, *, sends: bool = False) -> Any:
        return _Watched(inner, self, sends)


class _Watched:
    """An API client or a sender whose every call (and every page it yields) is progress."""

    def __init__(self, inner: Any, progress: Progress, sends: bool) -> None:
        self._inner = inner
        self._progress = progress
        self._sends = sends

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if not callable(attribute):
            return attribute
        return self._call(attribute, counted=self._sends and name == "send")

    def _call(self, method: Callable[..., Any], counted: bool) -> Callable[..., Any]:
        progress = self._progress

        def call(*args: Any, **kwargs: Any) -> Any:
            progress.moved()
            if counted:
                with progress.sending_one():
                    result = method(*args, **kwargs)
            else:
                result = method(*args, **kwargs)
            progress.moved()
            return _each(result, progress) if isinstance(result, Iterator) else result

        return call


def _each(items: Iterator[Any], progress: Progress) -> Iterator[Any]:
    for item in items:
        progress.moved()
        yield item


# --- systemd ----------------------------------------------------------------------------


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) how we are; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            # Never block: a full notify queue must not hang a job (or the exit joining it).
            sock.settimeout(1.0)
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("systemd.notify_failed", error=str(exc))


def stuck_after(config: Config) -> float:
    """Seconds of no progress that mean the work is wedged: twice the longest a healthy step
    may take (one poll is cut off at partner_center.poll_timeout; a send, a page, a heartbeat
    take less)."""
    return 2 * config.partner_center.poll_timeout.total_seconds()


def exit_leaving_the_work_behind() -> None:
    """End the process now, though a poll is still in flight on a worker thread: the
    interpreter would join that thread before exiting, waiting for the poll (40 s and more
    against a slow Partner Center) while systemd waits for us. Its transaction was never
    committed, so nothing of it is kept; the state lock goes with the process."""
    log.warning("daemon.stopped", left_behind="the poll in flight (nothing of it was kept)")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def watchdog_interval() -> float | None:
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or not usec.isdigit():
        return None
    return max(1.0, int(usec) / 2_000_000)
