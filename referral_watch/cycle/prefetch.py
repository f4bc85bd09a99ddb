"""The poll's pages, read ahead on another thread once they need work: the next pages are
fetched while the cycle stores the current one, so a poll takes about as long as the API."""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

# Pages fetched ahead while the store works on the current one.
PREFETCH_PAGES = 2
# How long a busy thread keeps Python's interpreter lock while another waits for it, during a
# poll (Python's default is 5 ms). Each page's answer wakes the fetching thread, which needs
# the lock for a moment to ask for the next page: while the cycle's thread works through a
# page of new leads, waiting 5 ms for it each time made a first poll of 200 pages last about
# a second longer than the API's own time. Switching costs a few microseconds a time.
SWITCH_INTERVAL = 0.0005


class Prefetch:
    """The API's pages, in order. The first is fetched on another thread from the start (while
    the caller prepares); the next ones on the caller's thread while each is quickly done with
    (a steady poll's unchanged pages: handing each over between two threads would cost more
    than recognising it). Once the caller says a page needs work (``engage``), the next ones
    are fetched on another thread while it works: a poll of new leads then takes about as long
    as the API itself. Leaving stops the fetching after the request in flight.

    An error on any page is raised in the caller's thread, after the pages before it.
    """

    def __init__(self, pages: Callable[[], Iterable[Any]], depth: int = PREFETCH_PAGES) -> None:
        self._pages = pages
        self._source: Iterator[Any] = iter(())
        self._first: tuple[str, Any] = ("end", None)
        self._starting: threading.Thread | None = None  # fetching the first page
        self._fetching: threading.Thread | None = None  # fetching the pages after (engaged)
        self._ahead: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
        self._halt = threading.Event()
        self._switch = sys.getswitchinterval()

    def __enter__(self) -> Prefetch:
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch, SWITCH_INTERVAL))
        self._source = iter(self._pages())
        self._starting = threading.Thread(target=self._fetch_first, name="poll-first", daemon=True)
        self._starting.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        sys.setswitchinterval(self._switch)
        if self._starting is not None and self._starting.is_alive():
            return  # left before the first page came: that thread ends after its request
        if self._fetching is None:
            _close(self._source)

    def __iter__(self) -> Iterator[Any]:
        assert self._starting is not None, "iterate inside `with Prefetch(...)`"
        self._starting.join()
        kind, item = self._first
        while True:
            if kind == "page":
                yield item
            elif kind == "error":
                raise item
            else:
                return
            kind, item = self._next()

    def _next(self) -> tuple[str, Any]:
        if self._fetching is not None:
            return self._ahead.get()
        try:
            return "page", next(self._source)
        except StopIteration:
            return "end", None

    def engage(self) -> None:
        """The page in hand needs work: from now on, the next pages are fetched on another
        thread meanwhile. Call between pages (never while one is being fetched)."""
        if self._fetching is None:
            self._fetching = threading.Thread(
                target=self._fetch, args=(self._source,), name="poll-prefetch", daemon=True
            )
            self._fetching.start()

    def _fetch_first(self) -> None:
        try:
            self._first = ("page", next(self._source))
        except StopIteration:
            self._first = ("end", None)
        except BaseException as exc:  # handed to the caller, raised in its thread
            self._first = ("error", exc)

    def _fetch(self, source: Iterator[Any]) -> None:
        try:
            for page in source:
                if not self._put("page", page):
                    break
            else:
                self._put("end", None)
        except BaseException as exc:  # handed to the caller, raised in its thread
            self._put("error", exc)
        finally:
            _close(source)  # (left early: the rest is never fetched)

    def _put(self, kind: str, item: Any) -> bool:
        while not self._halt.is_set():
            try:
                self._ahead.put((kind, item), timeout=0.05)
                return True
            except queue.Full:
                continue
        return False


def _close(source: Iterator[Any]) -> None:
    """The pages' own clean-up (a generator's finally), on the calling thread."""
    close = getattr(source, "close", None)
    if close is not None:
        close()
