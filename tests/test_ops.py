"""The operations alert state machine and the health verdict, with `now` passed in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from referral_watch.config import OperationsConfig
from referral_watch.ops import (
    FAILING,
    RECOVERED,
    STILL_FAILING,
    OpsState,
    health,
    healthy,
    ops_event,
)

T0 = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)
CONFIG = OperationsConfig(after_failures=3, repeat=timedelta(hours=6))


def run(outcomes: list[tuple[bool, timedelta]]) -> list[str | None]:
    """Feed polls (ok?, time since T0) through the state machine; return the events."""
    state = OpsState()
    failures = 0
    events = []
    for ok, offset in outcomes:
        failures = 0 if ok else failures + 1
        event, state = ops_event(ok, failures, state, CONFIG, T0 + offset)
        events.append(event)
    return events


def minutes(n: int) -> timedelta:
    return timedelta(minutes=n)


def test_quiet_while_polls_succeed() -> None:
    assert run([(True, minutes(15 * i)) for i in range(10)]) == [None] * 10


def test_told_once_at_the_threshold_not_before() -> None:
    events = run([(False, minutes(15 * i)) for i in range(6)])
    assert events == [None, None, FAILING, None, None, None]


def test_fewer_failures_than_the_threshold_then_success_is_silent() -> None:
    assert run([(False, minutes(0)), (False, minutes(15)), (True, minutes(30))]) == [None] * 3


def test_repeats_every_repeat_interval_while_it_lasts() -> None:
    outcomes = [(False, minutes(15 * i)) for i in range(3 + 6 * 4 * 2)]  # 12h of failures
    events = run(outcomes)
    assert events.count(FAILING) == 1
    assert events.count(STILL_FAILING) == 2  # at +6h and +12h after the first alert
    assert events[2 + 24] == STILL_FAILING


def test_recovery_is_told_once() -> None:
    events = run(
        [
            (False, minutes(0)),
            (False, minutes(15)),
            (False, minutes(30)),
            (True, minutes(45)),
            (True, minutes(60)),
        ]
    )
    assert events == [None, None, FAILING, RECOVERED, None]


@pytest.mark.parametrize(
    ("age", "expected"),
    [
        (None, False),
        (timedelta(0), True),
        (minutes(44), True),
        (minutes(45) - timedelta(seconds=1), True),
        (minutes(45), False),
        (timedelta(days=1), False),
    ],
)
def test_health_verdict_is_three_intervals(age: timedelta | None, expected: bool) -> None:
    last = None if age is None else T0 - age
    assert healthy(last, minutes(15), T0) is expected


@pytest.mark.parametrize(
    ("stuck_for", "expected", "reason"),
    [
        (None, True, "last successful poll"),
        (minutes(29), True, "last successful poll"),
        (minutes(30), False, "deliveries stuck since 2026-11-24 07:30:00 UTC"),
        (timedelta(days=1), False, "deliveries stuck since"),
    ],
)
def test_deliveries_stuck_for_two_intervals_are_unhealthy(
    stuck_for: timedelta | None, expected: bool, reason: str
) -> None:
    stuck_since = None if stuck_for is None else T0 - stuck_for
    ok, why = health(T0 - minutes(1), minutes(15), T0, stuck_since)
    assert ok is expected
    assert why.startswith(reason)
    assert healthy(T0 - minutes(1), minutes(15), T0, stuck_since) is expected


def test_a_stale_poll_is_named_before_stuck_deliveries() -> None:
    assert health(None, minutes(15), T0, T0 - timedelta(days=1)) == (
        False,
        "last successful poll never",
    )
    assert health(T0 - minutes(50), minutes(15), T0) == (
        False,
        "last successful poll 2026-11-24 07:10:00 UTC",
    )
