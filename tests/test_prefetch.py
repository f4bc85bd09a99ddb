"""The poll's read-ahead (cycle.prefetch): pages in order, an error after the pages before it,
and the interpreter's thread switching back to what it was once the poll is over."""

from __future__ import annotations

import sys
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
