"""The poll's pages read ahead: the next pages are fetched on another thread while the cycle
stores the current one, so a poll takes about as long as the API itself."""

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
    """The API's pages, with the next ones already being fetched on another thread while the
    caller stores this one: a poll then takes about as long as the API itself. Fetching starts
    on entering; leaving stops it after the request in flight.

    An error on any page is raised in the caller's thread, after the pages before it.
    """

    def __init__(self, pages: Callable[[], Iterable[Any]], depth: int = PREFETCH_PAGES) -> None:
        self._pages = pages
        self._ahead: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
        self._halt = threading.Event()
        self._switch = sys.getswitchinterval()

    def __enter__(self) -> Iterator[Any]:
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch, SWITCH_INTERVAL))
        threading.Thread(target=self._fetch, name="poll-prefetch", daemon=True).start()
        return self._received()

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        sys.setswitchinterval(self._switch)

    def _received(self) -> Iterator[Any]:
        while True:
            kind, item = self._ahead.get()
            if kind == "page":
                yield item
            elif kind == "error":
                raise item
            else:
                return

    def _fetch(self) -> None:
        try:
            for page in self._pages():
                if not self._put("page", page):
                    return
            self._put("end", None)
        except BaseException as exc:  # handed to the caller, raised in its thread
            self._put("error", exc)

    def _put(self, kind: str, item: Any) -> bool:
        while not self._halt.is_set():
            try:
                self._ahead.put((kind, item), timeout=0.05)
                return True
            except queue.Full:
                continue
        return False
