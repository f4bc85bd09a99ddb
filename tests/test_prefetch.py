"""The poll's read-ahead (cycle.prefetch): pages in order, an error after the pages before it,
the next pages read on another thread once a page needs work (and on the caller's own until
then), the pages' clean-up when the caller leaves early, and the interpreter's thread switching
back to what it was once the poll is over."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest

from referral_watch.cycle.prefetch import SWITCH_INTERVAL, Prefetch


def _pages(count: int, fail_at: int | None = None) -> Iterator[int]:
    for number in range(count):
        if number == fail_at:
            raise RuntimeError(f"page {number} failed")
        yield number


def test_pages_arrive_in_order_and_switching_is_quick_only_during_the_poll() -> None:
    before = sys.getswitchinterval()
    got = []
    with Prefetch(lambda: _pages(7)) as pages:
        for page in pages:
            got.append(page)
            assert sys.getswitchinterval() == min(before, SWITCH_INTERVAL)
    assert got == list(range(7))
    assert sys.getswitchinterval() == before


def test_an_error_comes_after_the_pages_before_it_and_switching_is_restored() -> None:
    before = sys.getswitchinterval()
    got = []
    with (
        pytest.raises(RuntimeError, match="page 3 failed"),
        Prefetch(lambda: _pages(7, fail_at=3)) as pages,
    ):
        for page in pages:
            got.append(page)
    assert got == [0, 1, 2]
    assert sys.getswitchinterval() == before


class _Source:
    """Pages that note which thread asked for each, and whether they were closed."""

    def __init__(self, count: int, fail_at: int | None = None) -> None:
        self.count, self.fail_at = count, fail_at
        self.threads: list[int] = []
        self.closed = False

    def __call__(self) -> Iterator[int]:
        try:
            for number in range(self.count):
                self.threads.append(threading.get_ident())
                if number == self.fail_at:
                    raise RuntimeError(f"page {number} failed")
                yield number
        finally:
            self.closed = True


def test_pages_after_one_that_needs_work_are_read_on_another_thread() -> None:
    source = _Source(8)
    got = []
    with Prefetch(source) as pages:
        for page in pages:
            got.append(page)
            if page == 3:
                pages.engage()  # page 3 needs work: 4 and after are read meanwhile
    assert got == list(range(8))
    me = threading.get_ident()
    assert source.threads[0] != me  # the first page was on its way from the start
    assert source.threads[1:4] == [me] * 3  # quick pages: read here, nothing handed over
    assert me not in source.threads[4:]
    assert source.closed


def test_an_error_after_engaging_comes_after_the_pages_before_it() -> None:
    source = _Source(8, fail_at=5)
    got = []
    with pytest.raises(RuntimeError, match="page 5 failed"), Prefetch(source) as pages:
        for page in pages:
            got.append(page)
            pages.engage()
    assert got == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("engaged", [False, True])
def test_leaving_early_closes_the_pages(engaged: bool) -> None:
    source = _Source(50)
    with Prefetch(source) as pages:
        for page in pages:
            if engaged:
                pages.engage()
            if page == 2:
                break
    for _ in range(200):  # an engaged reader ends after the page in flight
        if source.closed:
            break
        threading.Event().wait(0.01)
    assert source.closed
    assert len(source.threads) < 50
