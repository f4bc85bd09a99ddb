"""PURE: when to tell operations that polling is failing, still failing, or recovered."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from referral_watch.config import OperationsConfig

FAILING = "failing"
STILL_FAILING = "still_failing"
RECOVERED = "recovered"
DROPPED = "dropped"


@dataclass(frozen=True)
class OpsState:
    alerting_since: datetime | None = None  # first alert of the current outage
    last_alert: datetime | None = None


def ops_event(
    poll_ok: bool,
    failures_in_a_row: int,
    state: OpsState,
    config: OperationsConfig,
    now: datetime,
) -> tuple[str | None, OpsState]:
    """The event to announce after a poll (or None) and the state to remember."""
    if poll_ok:
        if state.alerting_since is not None:
            return RECOVERED, OpsState()
        return None, state
    if state.alerting_since is None:
        if failures_in_a_row >= config.after_failures:
            return FAILING, OpsState(alerting_since=now, last_alert=now)
        return None, state
    if state.last_alert is None or now - state.last_alert >= config.repeat:
        return STILL_FAILING, OpsState(alerting_since=state.alerting_since, last_alert=now)
    return None, state


def healthy(last_success: datetime | None, interval: timedelta, now: datetime) -> bool:
    """The health verdict shared by `status --check` and /healthz."""
    return last_success is not None and now - last_success < 3 * interval
