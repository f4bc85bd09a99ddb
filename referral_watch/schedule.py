"""Report schedules: standard cron in each report's own time zone, evaluated by cronsim.

One rule serves the scheduler's trigger, the catch-up at start and `check-config`. cronsim
(healthchecks' cron evaluator) counts weekdays as cron does (0 and 7 are Sunday), runs a job
when either day field matches if both are set, and handles clock changes as Debian's cron
does: a run at a fixed time inside the hour skipped in spring happens right after it, one in
the hour repeated in autumn happens once, and an hourly or finer schedule runs every real hour.

Also here: which scheduled run of a report is due, and the report's messages for the outbox.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from apscheduler.triggers.base import BaseTrigger

from referral_watch.cron import cron_expression, runs_after
from referral_watch.errors import ConfigError

if TYPE_CHECKING:
    from referral_watch.config import Config, ReportConfig
    from referral_watch.model import AuditEntry, Lead, Message
    from referral_watch.state.store import Store

# A report missed while the daemon was down is sent once at start if it is less late than this.
CATCH_UP = timedelta(days=1)


def last_run(expression: str, zone: ZoneInfo, after: datetime, now: datetime) -> datetime | None:
    """The last run in (after, now], or None.

    Counted forwards from `after`, not backwards from `now` (cronsim's reverse=True): started
    in autumn's repeated hour, counting back from the wall-clock time skips a fixed-time run of
    the first pass (02:30 CEST seen from 02:15 CET), and the catch-up would miss it.
    """
    found = None
    for run in runs_after(expression, zone, after):
        if run > now:
            break
        found = run
    return found


class CronTrigger(BaseTrigger):  # type: ignore[misc]  # APScheduler ships no type hints
    """An APScheduler trigger firing at a cron schedule's runs, by cronsim."""

    def __init__(self, schedule: str, timezone: str) -> None:
        self.expression = cron_expression(schedule)
        self.zone = ZoneInfo(timezone)

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        return next(runs_after(self.expression, self.zone, previous_fire_time or now), None)

    def __str__(self) -> str:
        return f"cron[{self.expression} {self.zone.key}]"


def report_trigger(report: ReportConfig) -> CronTrigger:
    return CronTrigger(report.schedule, report.timezone)


def report_triggers(config: Config) -> list[tuple[ReportConfig, CronTrigger]]:
    """Every report with its trigger, or a ConfigError naming each bad one."""
    problems: list[str] = []
    triggers: list[tuple[ReportConfig, CronTrigger]] = []
    seen: set[str] = set()
    for index, report in enumerate(config.reports):
        if report.name in seen:
            problems.append(f"reports[{index}].name: {report.name!r} is used twice")
        seen.add(report.name)
        try:
            triggers.append((report, report_trigger(report)))
        except ValueError as exc:  # a Config built without validation
            problems.append(f"reports[{index}].schedule: {exc}")
    if problems:
        raise ConfigError(problems, str(config.source) if config.source else None)
    return triggers


def last_key(report: ReportConfig) -> str:
    """The state's meta key holding the report's last scheduled run sent."""
    return f"report.{report.name}.last"


def due_run(report: ReportConfig, last: datetime | None, now: datetime) -> datetime | None:
    """The scheduled run of `report` to send now: the last one in the catch-up window that is
    later than `last` (the last one sent), or None."""
    window = now - CATCH_UP
    after = max(last or window, window)
    return last_run(cron_expression(report.schedule), ZoneInfo(report.timezone), after, now)


def queue_report(
    store: Store, config: Config, report: ReportConfig, due: datetime, now: datetime
) -> list[int]:
    """Put the report in the outbox for each of its channels and remember `due` as sent.
    Returns the outbox rows, for the cycle's delivery."""
    from referral_watch.state.db import ts

    leads = store.leads(include_resolved=True)
    events = store.claim_events()
    rows = []
    for channel in report.notify:
        message = _message(config, report, channel, leads, now, events)
        rows.append(store.enqueue_message("report", channel, message.title, message.body, now))
    store.set_meta(last_key(report), ts(due))
    return rows


def _message(
    config: Config,
    report: ReportConfig,
    channel: str,
    leads: list[Lead],
    now: datetime,
    claim_events: Sequence[AuditEntry] = (),
) -> Message:
    from referral_watch import policy  # Jinja2 and Babel: only when a report is due
    from referral_watch.render import messages as render
    from referral_watch.render.report import report_message, summarize

    settings = config.channels.get(channel)
    # A channel with `match` only hears about its own leads, in reports too.
    mine = [x for x in leads if settings is None or policy.channel_matches(settings, x.referral)]
    summary = summarize(mine, now, report.since, claim_events)
    return report_message(summary, render.style_for(config, channel))
