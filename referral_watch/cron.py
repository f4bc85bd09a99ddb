"""PURE: the cron rule of report schedules (standard 5-field cron, evaluated by cronsim in each
report's zone, DST-safe). A leaf: config checks schedules with it, the scheduler runs by it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from cronsim import CronSim, CronSimError

# cronsim wants a weekday range to run upwards; cron reads "fri-sun" as Friday to Sunday (7).
_TO_SUNDAY = re.compile(r"\b(mon|tue|wed|thu|fri|sat|[1-6])-(sun|0)\b", re.IGNORECASE)


def cron_expression(schedule: str) -> str:
    """A report's 5-field schedule as cronsim reads it. Raises ValueError saying what is wrong."""
    fields = schedule.split()
    if len(fields) != 5:
        raise ValueError(
            f"{schedule!r} is not a cron expression: use five fields "
            '"minute hour day month weekday", e.g. "0 8 * * mon"'
        )
    fields[4] = _TO_SUNDAY.sub(r"\1-7", fields[4])
    expression = " ".join(fields)
    try:
        CronSim(expression, datetime(2000, 1, 1))  # parses the fields, evaluates nothing
    except CronSimError as exc:
        problem = str(exc).lower()  # "Bad day-of-week"
        raise ValueError(
            f"{schedule!r}: {problem} (minute 0-59, hour 0-23, day 1-31, month 1-12 or jan-dec, "
            "weekday 0-7 or sun-sat)"
        ) from None
    return expression


def runs_after(expression: str, zone: ZoneInfo, start: datetime) -> Iterator[datetime]:
    """The schedule's runs after `start` (aware), in UTC, earliest first."""
    for moment in CronSim(expression, start.astimezone(zone)):
        run = moment.astimezone(UTC)
        # Started inside autumn's repeated hour, cronsim (which counts fixed times in wall
        # clock time) may first give a run of that hour's first pass: already behind us.
        if run > start:
            yield run
