"""The poll's writer (cycle.writer): a page's writes run on a thread of their own, in order; a
write that fails fails the poll in the caller's thread, and nothing after it is written."""

from __future__ import annotations

import threading

import pytest

from referral_watch.cycle.writer import Writer


def test_jobs_run_in_order_on_another_thread_and_drain_waits_for_them() -> None:
    done: list[tuple[int, str]] = []
    with Writer() as writer:
        for n in range(10):
            writer.submit(lambda n=n: done.append((n, threading.current_thread().name)))
        writer.drain()
        assert [n for n, _ in done] == list(range(10))
    assert {name for _, name in done} == {"poll-writer"}


def test_a_failed_write_is_raised_in_the_caller_and_stops_the_writes_after_it() -> None:
    done: list[int] = []

    def fail() -> None:
        raise OSError("database or disk is full")

    with pytest.raises(OSError, match="disk is full"), Writer() as writer:
        writer.submit(lambda: done.append(1))
        writer.submit(fail)
        for n in range(2, 20):  # raised at a submit once the writer has met it
            writer.submit(lambda n=n: done.append(n))
        writer.drain()
    assert done == [1]


def test_leaving_with_an_error_waits_for_the_write_in_progress_and_drops_the_rest() -> None:
    started, release = threading.Event(), threading.Event()
    done: list[str] = []

    def slow() -> None:
        started.set()
        release.wait(5)
        done.append("slow")

    with pytest.raises(KeyError), Writer(depth=5) as writer:
        writer.submit(slow)
        writer.submit(lambda: done.append("later"))
        started.wait(5)
        threading.Timer(0.2, release.set).start()
        raise KeyError("the API failed")  # the caller's own error, e.g. a page that failed
    assert done == ["slow"]  # the write in progress finished before the caller went on
