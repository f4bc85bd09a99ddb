"""The daemon: the same cycle as `run --once` on an APScheduler loop, plus signals, the state
lock, the /healthz + /metrics server and systemd notifications.

Scheduled reports (``[[reports]]``) run on the same scheduler, each on a cron trigger in its own
time zone (schedule.py); a lock keeps a report and a poll cycle from running at the same time."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from referral_watch import schedule, signals
from referral_watch.config import Config
from referral_watch.cycle.operations import tell_directly
from referral_watch.cycle.ports import Api, Clock, NoPolls, Sender, system_clock
from referral_watch.cycle.result import CycleResult
from referral_watch.cycle.runner import Cycle
from referral_watch.errors import ConfigError, ReferralWatchError, StateError
from referral_watch.metrics import Metrics
from referral_watch.ops import OpsState, health, ops_event
from referral_watch.state.db import from_ts, ts
from referral_watch.state.lock import InstanceLock
from referral_watch.state.replica import Leadership, work_name
from referral_watch.state.store import Store
from referral_watch.watchdog import (
    Progress,
    exit_leaving_the_work_behind,
    sd_notify,
    stuck_after,
    watchdog_interval,
)
from referral_watch.webhook_jobs import WebhookJobs

if TYPE_CHECKING:
    from referral_watch.web.server import WebServer

log = structlog.get_logger(__name__)

CYCLE_JOB = "cycle"
REPORT_JOB = "report:"  # + the report's name
# After SIGTERM, a poll in flight gets this long to end before it is left behind (nothing of an
# unfinished poll is kept); a message being sent is waited for up to SEND_WAIT.
STOP_GRACE = 2.0
SEND_WAIT = 60.0


class Daemon(WebhookJobs):
    def __init__(
        self,
        config: Config,
        *,
        reload: Callable[[], Config] | None = None,
        clock: Clock = system_clock,
        api_factory: Callable[[Config], Any] | None = None,
        sender_factory: Callable[[Config], Any] | None = None,
    ) -> None:
        self.config = config
        self.reload_config = reload
        self.clock = clock
        self.api_factory = api_factory or _default_api
        self.sender_factory = sender_factory or _default_sender
        self.stop = threading.Event()
        self.metrics = Metrics()
        self.last_success: datetime | None = None
        self.server: WebServer | None = None
        self.stuck_since: datetime | None = None  # a due delivery failing since then
        self._api: Any = None
        self._sender: Any = None
        self._scheduler: Any = None
        self.progress = Progress(stuck_after(config))  # one cycle or one report at a time
        self._retired: list[Any] = []  # API clients replaced by a reload, closed when idle
        self._reports_checked = False
        self.leadership: Leadership | None = None  # with state.url: the active lock
        self._state_failures = 0  # cycles in a row that could not use the state
        self._state_ops = OpsState()  # operations told about that (in memory: see above)
        self.receiver: Any = None  # the webhook endpoint (partner_center.webhooks.receiver)
        self.relay: Any = None  # webhooks.forward_to (partner_center.webhooks.relay)
        self.webhook_worker: Any = None

    # --- the role: active or standby (state.url, SPEC 16) --------------------------------

    @property
    def active(self) -> bool:
        """Whether this replica does the work (polls, webhooks, reports, deliveries): always
        with SQLite (the lock file keeps others away), while it holds the active lock with
        PostgreSQL. Checked again right before every send."""
        return self.leadership is None or self.leadership.active

    def _on_role(self, active: bool) -> None:
        self.metrics.active.set(int(active))
        log.warning("replica.role", role="active" if active else "standby")
        if active and self._scheduler is not None:
            self._scheduler.modify_job(CYCLE_JOB, next_run_time=datetime.now(UTC))  # take over now
        if active and self.webhook_worker is not None:
            self.webhook_worker.wake()  # events the standby stored wait for us
        if active and self.relay is not None:
            self.relay.wake()

    def _state_trouble(self, reason: str) -> None:
        """The state cannot be used (the database is down or unreachable): count it like a
        failed poll, and tell operations directly: the outbox is in that state too."""
        self._state_failures += 1
        self._tell_ops_directly(False, reason)

    def _state_fine(self) -> None:
        if self._state_failures:
            self._state_failures = 0
            self._tell_ops_directly(True, "")

    def _tell_ops_directly(self, ok: bool, reason: str) -> None:
        now = self.clock()
        event, state = ops_event(
            ok, self._state_failures, self._state_ops, self.config.operations, now
        )
        since = self._state_ops.alerting_since or now
        self._state_ops = state
        if event is None:
            return
        log.warning("ops.event", ops_event=event, failures=self._state_failures, reason=reason)
        tell_directly(
            self.config,
            self._current_sender(),
            event,
            reason,
            now,
            failures=self._state_failures,
            since=since,
        )

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Run as the only instance on a SQLite file, or as one replica on PostgreSQL."""
        state = self.config.state
        if state.url is None:
            with InstanceLock(self.config.lock_path):
                self.metrics.active.set(1)
                yield
            return
        self.leadership = Leadership(state.url, state.shown, on_change=self._on_role)
        self.metrics.active.set(0)
        self.leadership.start()
        try:
            yield
        finally:
            self.leadership.stop()

    def _store(self) -> Store:
        """The state, for work: on PostgreSQL named so a replica taking over can fence it."""
        owner = self.leadership.owner if self.leadership is not None else None
        return Store(self.config.state.location, name=work_name(owner) if owner else None)

    # --- one cycle, as a scheduler job ---------------------------------------------------

    def cycle(self) -> CycleResult | None:
        if not self.active:
            # A standby: the active replica polls. Unless none can reach the database.
            trouble = self.leadership.error if self.leadership is not None else None
            if trouble is not None:
                self._state_trouble(trouble)
            else:
                self._state_fine()
            return None
        with self.progress.working():
            result = self._guarded_cycle()
        if not self._reports_checked:
            # After the first poll, so a report that is sent late at least carries fresh data.
            self._reports_checked = True
            self.catch_up_reports()
        return result

    def _guarded_cycle(self) -> CycleResult | None:
        try:
            result = self._cycle()
            self._state_fine()
            return result
        except StateError as exc:  # e.g. the database connection was lost: retried next time
            log.error("cycle.error", error=str(exc))
            self._state_trouble(str(exc))
        except ReferralWatchError as exc:
            log.error("cycle.error", error=str(exc))
        except Exception:  # a bug must not end the loop: log it and try again next time
            log.exception("cycle.crashed")
        self.metrics.polls.labels("error").inc()
        return None

    def _cycle(self) -> CycleResult:
        self._close_retired()
        if self._api is None:
            self._api = self.progress.watched(self.api_factory(self.config))
        sender = self._current_sender()
        with self.metrics.poll_duration.time(), self._store() as store:
            result = self._new_cycle(store, self._api, sender).run()
            self._observe(store, result)
        return result

    def notify_now(self) -> None:
        """After an answer from the console: decide and deliver at once (on_resolved hears it
        now, not at the next poll), one delivery at a time like every other job. A standby
        leaves it to the active replica's next cycle."""
        if not self.active:
            return
        with self.progress.working():
            try:
                sender = self._current_sender()
                with Store(self.config.state.location) as store:
                    self._new_cycle(store, None, sender).notify_now()
            except ReferralWatchError as exc:
                log.error("notify_now.error", error=str(exc))
            except Exception:  # a bug must not cost the console its thread
                log.exception("notify_now.crashed")

    def _observe(self, store: Store, result: CycleResult) -> None:
        self.metrics.polls.labels("ok" if result.poll_ok else "failed").inc()
        self.metrics.sign_in_needed.set(int(result.needs_login))
        for (channel, outcome), count in result.by_channel.items():
            self.metrics.deliveries.labels(channel, outcome).inc(count)
        self.last_success = store.last_success()
        self.stuck_since = store.deliveries_stuck_since()
        if self.last_success:
            self.metrics.last_success.set(self.last_success.timestamp())
        self.metrics.backlog.set(store.backlog())
        self._observe_leads(store)

    def _observe_leads(self, store: Store) -> None:
        watched, soonest = store.watched_summary()
        self.metrics.watched.set(watched)
        left = float("inf") if soonest is None else (soonest - self.clock()).total_seconds()
        self.metrics.most_urgent.set(left)
        self.metrics.claimed.set(store.claimed_count(self.clock()))

    # --- scheduled reports -----------------------------------------------------------------

    def catch_up_reports(self) -> None:
        """At start: send each report whose run was missed while we were down (once, < 1 day)."""
        for report in self.config.reports:
            self.run_report(report.name, at_start=True)

    def run_report(self, name: str, *, at_start: bool = False) -> bool:
        """The report job: send `name` if a scheduled run of it is due and not yet sent.

        Idempotent per scheduled run (the last one sent is kept in the state's meta table), so
        the cron job and the catch-up at start never both send the same run.
        """
        if not self.active:
            return False  # a standby: the active replica sends reports
        with self.progress.working():
            try:
                return self._run_report(name, at_start)
            except ReferralWatchError as exc:
                log.error("report.error", report=name, error=str(exc))
            except Exception:  # a bug must not end the loop
                log.exception("report.crashed", report=name)
        return False

    def _run_report(self, name: str, at_start: bool) -> bool:
        report = next((r for r in self.config.reports if r.name == name), None)
        if report is None:  # removed by a reload since the job was scheduled
            return False
        now = self.clock()
        with self._store() as store:
            last = from_ts(store.get_meta(schedule.last_key(report)))
            if last is None and at_start:
                # Never run before: nothing was missed. Remember from when to count.
                store.set_meta(schedule.last_key(report), ts(now))
                return False
            due = schedule.due_run(report, last, now)
            if due is None:
                return False
            if at_start:
                log.info("report.catch_up", report=name, scheduled=due.isoformat())
            rows = schedule.queue_report(store, self.config, report, due, now)
            log.info("report.queued", report=name, channels=len(rows))
            self._deliver(store, rows)
        return True

    def _deliver(self, store: Store, rows: list[int]) -> None:
        """Deliver just-queued outbox rows the way every cycle delivers: a refusal stays in the
        outbox for the next cycle, a message dropped after a day of refusals tells ops."""
        result = self._new_cycle(store, self._api, self._current_sender()).deliver(rows)
        for (channel, outcome), count in result.by_channel.items():
            self.metrics.deliveries.labels(channel, outcome).inc(count)
        self.metrics.backlog.set(store.backlog())

    def _new_cycle(self, store: Store, api: Api | None, sender: Sender) -> Cycle:
        """This daemon's cycle: its clock and stop, and no send once it is not active."""
        return new_cycle(
            self.config,
            store,
            api,
            sender,
            clock=self.clock,
            stop=self.stop,
            may_send=lambda: self.active,
        )

    def _current_sender(self) -> Any:
        if self._sender is None:
            self._sender = self.progress.watched(self.sender_factory(self.config), sends=True)
        return self._sender  # a reload (SIGHUP) may replace it meanwhile

    def close(self) -> None:
        """Close the API clients, after the cycle in flight (if any) has finished."""
        with self.progress.lock:
            if self._api is not None:
                self._retired.append(self._api)
                self._api = None
            self._close_retired()

    def _close_retired(self) -> None:
        for client in self._retired:
            close = getattr(client, "close", None)
            if close is not None:
                close()
        self._retired.clear()

    # --- health --------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        if self.leadership is not None and not self.leadership.active:
            # A standby is healthy while it reaches the database and so can take over.
            ok = self.leadership.error is None
            return ok, {
                "status": "ok" if ok else "unreachable",
                "role": "standby",
                "interval_seconds": int(self.config.schedule.interval.total_seconds()),
            }
        relay_stuck = self.relay.stuck_since if self.relay is not None else None
        ok, reason = health(
            self.last_success,
            self.config.schedule.interval,
            self.clock(),
            self.stuck_since,
            relay_stuck,
        )
        stuck = not ok and reason.startswith(("deliveries", "webhook relay"))
        body: dict[str, Any] = {
            "status": "ok" if ok else "stuck" if stuck else "stale",
            "role": "active",
            "reason": reason,
            "last_success": self.last_success.isoformat() if self.last_success else None,
            "deliveries_stuck_since": self.stuck_since.isoformat() if self.stuck_since else None,
            "interval_seconds": int(self.config.schedule.interval.total_seconds()),
        }
        if self.config.webhooks is not None:
            last = self.receiver.last_event if self.receiver is not None else None
            body["last_webhook_event"] = last.isoformat() if last else None
        if self.relay is not None:
            body["relay_stuck_since"] = relay_stuck.isoformat() if relay_stuck else None
        return ok, body

    # --- the loop ------------------------------------------------------------------------

    def serve(self) -> int:
        from apscheduler.schedulers.blocking import BlockingScheduler

        schedule.report_triggers(self.config)  # a bad schedule is a config error, before anything
        with self._exclusive():
            with Store(self.config.state.location) as store:
                self.last_success = store.last_success()
                self.stuck_since = store.deliveries_stuck_since()
                self._observe_leads(store)  # what the state file knows, until the first cycle
            self._start_webhooks()
            self._start_server()
            scheduler = BlockingScheduler(timezone=UTC)
            self._scheduler = scheduler
            self._schedule(scheduler)
            watchdog = watchdog_interval()
            if watchdog:
                scheduler.add_job(self.watchdog, "interval", seconds=watchdog)
            signals.install(self._on_signal)
            sd_notify("READY=1")
            log.info(
                "daemon.started",
                interval=str(self.config.schedule.interval),
                state=self.config.state.shown,
                pid=os.getpid(),
            )
            try:
                scheduler.start()
            finally:
                self._stop_server()
                sd_notify("STOPPING=1")
                if self.webhook_worker is not None:
                    self.webhook_worker.stop()
                if self.relay is not None:
                    self.relay.join()  # after the POST in flight (stop is set)
                if not self.progress.wait_idle(STOP_GRACE, SEND_WAIT):
                    exit_leaving_the_work_behind()
                self.close()
                if self.receiver is not None:
                    self.receiver.close()
        log.info("daemon.stopped")
        return 0

    def watchdog(self) -> None:
        """The systemd watchdog job: ping only while the work in flight makes progress, so a
        wedged cycle gets the service restarted (the job itself runs only while the scheduler
        loop does)."""
        stuck = self.progress.stuck_for()
        if stuck is None:
            sd_notify("WATCHDOG=1")
            return
        # Each time (twice per WatchdogSec until systemd restarts us): it says how long.
        log.error(
            "watchdog.withheld",
            stuck_s=round(stuck),
            limit_s=round(self.progress.stuck_after),
            action="systemd restarts the service once WatchdogSec has passed",
        )

    def _schedule(self, scheduler: Any) -> None:
        interval = self.config.schedule.interval.total_seconds()
        scheduler.add_job(
            self.cycle,
            "interval",
            id=CYCLE_JOB,
            seconds=interval,
            jitter=int(self.config.schedule.jitter.total_seconds()) or None,
            next_run_time=datetime.now(UTC),
            max_instances=1,
            coalesce=True,
            misfire_grace_time=int(interval),
            replace_existing=True,
        )
        for report, trigger in schedule.report_triggers(self.config):
            scheduler.add_job(
                self.run_report,
                trigger,
                args=[report.name],
                id=REPORT_JOB + report.name,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=int(schedule.CATCH_UP.total_seconds()),
                replace_existing=True,
            )
        wanted = {REPORT_JOB + report.name for report in self.config.reports}
        for job in scheduler.get_jobs():
            if job.id.startswith(REPORT_JOB) and job.id not in wanted:
                job.remove()  # dropped from the config by a reload

    def _on_signal(self, signum: int) -> None:
        if signum == getattr(signal, "SIGHUP", None):
            self._on_reload()
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self._on_stop(signum)

    def _on_stop(self, signum: int) -> None:
        log.info("daemon.stopping", signal=signal.Signals(signum).name)
        self.stop.set()  # the cycle finishes the message in flight, then stops delivering
        if self._scheduler is not None and self._scheduler.running:  # not twice
            # wait=False: serve() then waits for a send in flight, not for a slow poll
            # (Progress.wait_idle).
            self._scheduler.shutdown(wait=False)

    def _on_reload(self) -> None:
        if self.reload_config is None:
            return
        try:
            config = self.reload_config()
            schedule.report_triggers(config)
        except ConfigError as exc:
            log.error("config.reload_failed", problems=exc.problems, kept="old configuration")
            return
        if config.state.location != self.config.state.location:
            log.error("config.reload_failed", problem="[state] cannot change while running")
            return
        self.config = config
        self.progress.stuck_after = stuck_after(config)
        if self._api is not None:
            self._retired.append(self._api)  # a cycle may be using it right now
        self._api = None
        self._sender = None
        if self._scheduler is not None:
            self._schedule(self._scheduler)
        log.info("config.reloaded")

    # --- the web server: /healthz, /metrics, the console -------------------------------

    def web_routes(self) -> list[Any]:
        """Routes other parts add to the web app (see referral_watch.web.app.build_app):
        the webhook endpoint, when [webhooks] is configured."""
        return [self.receiver.route()] if self.receiver is not None else []

    def _start_server(self) -> None:
        if self.config.server is None:
            return
        from referral_watch.web.app import build_app
        from referral_watch.web.server import WebServer

        server = WebServer(build_app(self, routes=self.web_routes()), self.config.server)
        server.start()
        self.server = server

    def _stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def new_cycle(
    config: Config,
    store: Store,
    api: Api | None = None,
    sender: Sender | None = None,
    *,
    clock: Clock = system_clock,
    stop: threading.Event | None = None,
    may_send: Callable[[], bool] | None = None,
) -> Cycle:
    """The one place a Cycle is put together: the daemon's jobs, `run --once`, the answer's
    on_resolved, the dry run and the demo. Without an api it only decides and delivers
    (NoPolls); without a sender it delivers to the config's channels (Notifier)."""
    if sender is None:
        from referral_watch.notify import Notifier

        sender = Notifier(config.channels)
    return Cycle(config, store, api or NoPolls(), sender, clock, stop, may_send)


def _default_api(config: Config) -> Any:
    from referral_watch.partner_center.auth import token_provider
    from referral_watch.partner_center.client import PartnerCenter

    return PartnerCenter(config.partner_center, token_provider(config))


def _default_sender(config: Config) -> Any:
    from referral_watch.notify import Notifier

    return Notifier(config.channels)


def serve(config: Config, reload: Callable[[], Config] | None = None) -> int:
    return Daemon(config, reload=reload).serve()
