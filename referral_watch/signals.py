"""Signals, handled off the main thread: the handlers only note a signal; a thread of its own
does the work (stop, reload).

Work run inside a handler, on the main thread, deadlocked when the signal came while the main
thread held a lock that work needs (the scheduler submitting a job, as it does right after a
reload); and a signal the kernel gave another thread waited for the main thread's next
wake-up. The wakeup fd is written by whichever thread gets the signal."""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType

import structlog

log = structlog.get_logger(__name__)


def install(on_signal: Callable[[int], None]) -> None:
    """SIGTERM, SIGINT and SIGHUP call ``on_signal(signum)`` on the "signals" thread."""
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    for name in ("SIGTERM", "SIGINT", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _noted)
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    threading.Thread(
        target=_deliver, args=(reader, writer, on_signal), name="signals", daemon=True
    ).start()


def _deliver(
    reader: socket.socket, writer: socket.socket, on_signal: Callable[[int], None]
) -> None:
    with reader, writer:
        while True:
            for signum in reader.recv(64):  # one byte per signal, in the order they came
                try:
                    on_signal(signum)
                except Exception:  # a bug must not leave the daemon deaf to SIGTERM
                    log.exception("daemon.signal_failed", signal=signum)


def _noted(_: int, __: FrameType | None) -> None:
    """A signal's Python handler: the wakeup fd already told the signals thread."""
