"""PURE: when to tell operations that polling is failing, still failing, or recovered."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from referral_watch.config import OperationsConfig

FAILING = "failing"
STILL_FAILING = "still_failing"
RECOVERED = "recovered"
DROPPED = "dropped"
QUARANTINED = "quarantined"


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


def health(
    last_success: datetime | None,
    interval: timedelta,
    now: datetime,
    stuck_since: datetime | None = None,
    relay_stuck_since: datetime | None = None,
) -> tuple[bool, str]:
    """The health verdict shared by `status --check` and /healthz, with the reason: healthy
    while the last successful poll is younger than 3 x interval and no due delivery (nor a
    webhook relay, webhooks.forward_to) has been failing for 2 x interval or longer."""
    if last_success is None:
        return False, "last successful poll never"
    if now - last_success >= 3 * interval:
        return False, f"last successful poll {last_success:%Y-%m-%d %H:%M:%S} UTC"
    if stuck_since is not None and now - stuck_since >= 2 * interval:
        return False, f"deliveries stuck since {stuck_since:%Y-%m-%d %H:%M:%S} UTC"
    if relay_stuck_since is not None and now - relay_stuck_since >= 2 * interval:
        return False, f"webhook relay stuck since {relay_stuck_since:%Y-%m-%d %H:%M:%S} UTC"
    return True, f"last successful poll {last_success:%Y-%m-%d %H:%M:%S} UTC"


def healthy(
    last_success: datetime | None,
    interval: timedelta,
    now: datetime,
    stuck_since: datetime | None = None,
) -> bool:
    """Just the verdict of health()."""
    return health(last_success, interval, now, stuck_since)[0]
