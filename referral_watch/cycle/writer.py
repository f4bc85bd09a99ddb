"""The poll's writes on a thread of their own: a page's leads are stored and decided while the
next page is read and parsed.

Reading a page is Python's work (decoding, parsing, sanitising); storing it is mostly the
database's (SQLite's C code, or a PostgreSQL server's round trips), during which Python lets
another thread run. With the writes on this thread the two overlap on a machine's two cores,
so a first poll of thousands of new leads takes little more than the API's own time.

The writes stay in the poll's one transaction and in the order of the pages: the caller's
thread begins and ends the transaction and does not touch the state while writes are
waiting (it calls ``drain`` first), so the connection is only ever used by one thread at a
time.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from types import TracebackType

# Pages read ahead of the writes: the reader never holds more than this many unwritten.
WRITES_AHEAD = 2


class Writer:
    """Runs the jobs it is given, one after another, on one thread of its own.

    A job that raises stops the rest: the exception is raised in the caller's thread, at its
    next ``submit`` or ``drain`` or on leaving, and the poll's transaction is rolled back as if
    the write had failed in the caller's thread. When the caller leaves with an exception of
    its own, jobs not yet begun are dropped (the transaction is rolled back anyway)."""

    def __init__(self, depth: int = WRITES_AHEAD) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=depth)
        self._failure: BaseException | None = None
        self._dropping = False
        self._thread = threading.Thread(target=self._run, name="poll-writer", daemon=True)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._dropping = kind is not None
        self._jobs.put(None)
        self._thread.join()
        if kind is None:
            self._raise()

    def submit(self, job: Callable[[], None]) -> None:
        """Queue a job; waits while WRITES_AHEAD jobs are waiting."""
        self._raise()
        self._jobs.put(job)

    def drain(self) -> None:
        """Wait until every job given so far is done (the state is then the caller's again)."""
        self._jobs.join()
        self._raise()

    def _raise(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if self._failure is None and not self._dropping:
                    job()
            except BaseException as exc:  # raised again in the caller's thread
                self._failure = exc
            finally:
                self._jobs.task_done()
