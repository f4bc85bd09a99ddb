"""The daemon: the same cycle as `run --once` on an APScheduler loop, plus signals, the state
lock, the /healthz + /metrics server and systemd notifications."""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

import structlog

from referral_watch.config import Config
from referral_watch.cycle import Clock, Cycle, CycleResult, system_clock
from referral_watch.errors import ConfigError, ReferralWatchError
from referral_watch.ops import healthy
from referral_watch.store import InstanceLock, Store

log = structlog.get_logger(__name__)

CYCLE_JOB = "cycle"


class Metrics:
    """Prometheus metrics; every name starts with referral_watch_."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.polls = Counter(
            "referral_watch_polls", "Polls by result", ["result"], registry=self.registry
        )
        self.poll_duration = Histogram(
            "referral_watch_poll_duration_seconds",
            "Duration of a whole cycle",
            registry=self.registry,
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300),
        )
        self.watched = Gauge(
            "referral_watch_watched_leads", "Leads waiting for an answer", registry=self.registry
        )
        self.deliveries = Counter(
            "referral_watch_deliveries",
            "Messages by channel and result",
            ["channel", "result"],
            registry=self.registry,
        )
        self.backlog = Gauge(
            "referral_watch_outbox_backlog", "Messages waiting in the outbox", registry=self.registry
        )
        self.last_success = Gauge(
            "referral_watch_last_success_timestamp_seconds",
            "Unix time of the last successful poll",
            registry=self.registry,
        )
        self.most_urgent = Gauge(
            "referral_watch_most_urgent_remaining_seconds",
            "Time left on the most urgent watched lead (negative once past)",
            registry=self.registry,
        )

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))


class Daemon:
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
        self.server: ThreadingHTTPServer | None = None
        self._api: Any = None
        self._sender: Any = None
        self._scheduler: Any = None

    # --- one cycle, as a scheduler job ---------------------------------------------------

    def cycle(self) -> CycleResult | None:
        try:
            return self._cycle()
        except ReferralWatchError as exc:
            log.error("cycle.error", error=str(exc))
        except Exception:  # a bug must not end the loop: log it and try again next time
            log.exception("cycle.crashed")
        self.metrics.polls.labels("error").inc()
        return None

    def _cycle(self) -> CycleResult:
        if self._api is None:
            self._api = self.api_factory(self.config)
        if self._sender is None:
            self._sender = self.sender_factory(self.config)
        with self.metrics.poll_duration.time(), Store(self.config.state.path) as store:
            result = Cycle(
                self.config, store, self._api, self._sender, self.clock, self.stop
            ).run()
            self._observe(store, result)
        return result

    def _observe(self, store: Store, result: CycleResult) -> None:
        self.metrics.polls.labels("ok" if result.poll_ok else "failed").inc()
        for (channel, outcome), count in result.by_channel.items():
            self.metrics.deliveries.labels(channel, outcome).inc(count)
        self.last_success = store.last_success()
        if self.last_success:
            self.metrics.last_success.set(self.last_success.timestamp())
        self.metrics.backlog.set(store.backlog())
        leads = store.leads()
        self.metrics.watched.set(len(leads))
        if leads:
            soonest = min(lead.deadline for lead in leads)
            self.metrics.most_urgent.set((soonest - self.clock()).total_seconds())

    # --- health --------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        ok = healthy(self.last_success, self.config.schedule.interval, self.clock())
        return ok, {
            "status": "ok" if ok else "stale",
            "last_success": self.last_success.isoformat() if self.last_success else None,
            "interval_seconds": int(self.config.schedule.interval.total_seconds()),
        }

    # --- the loop ------------------------------------------------------------------------

    def serve(self) -> int:
        from apscheduler.schedulers.blocking import BlockingScheduler

        with InstanceLock(self.config.lock_path):
            with Store(self.config.state.path) as store:
                self.last_success = store.last_success()
            self._start_server()
            scheduler = BlockingScheduler(timezone=UTC)
            self._scheduler = scheduler
            self._schedule(scheduler)
            watchdog = _watchdog_interval()
            if watchdog:
                scheduler.add_job(sd_notify, "interval", seconds=watchdog, args=["WATCHDOG=1"])
            self._install_signals()
            sd_notify("READY=1")
            log.info(
                "daemon.started",
                interval=str(self.config.schedule.interval),
                state=str(self.config.state.path),
                pid=os.getpid(),
            )
            try:
                scheduler.start()
            finally:
                self._stop_server()
                sd_notify("STOPPING=1")
        log.info("daemon.stopped")
        return 0

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

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, self._on_reload)

    def _on_stop(self, signum: int, _: FrameType | None) -> None:
        log.info("daemon.stopping", signal=signal.Signals(signum).name)
        self.stop.set()  # the cycle finishes the message in flight, then stops delivering
        if self._scheduler is not None:
            # wait=False: we are in the signal handler on the main thread; the running job
            # finishes on its worker thread, which the interpreter joins before exiting.
            self._scheduler.shutdown(wait=False)

    def _on_reload(self, _: int, __: FrameType | None) -> None:
        if self.reload_config is None:
            return
        try:
            config = self.reload_config()
        except ConfigError as exc:
            log.error("config.reload_failed", problems=exc.problems, kept="old configuration")
            return
        if config.state.path != self.config.state.path:
            log.error("config.reload_failed", problem="state.path cannot change while running")
            return
        self.config = config
        self._api = None
        self._sender = None
        if self._scheduler is not None:
            self._schedule(self._scheduler)
        log.info("config.reloaded")

    # --- the health and metrics server ---------------------------------------------------

    def _start_server(self) -> None:
        if self.config.server is None:
            return
        daemon = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                import json

                if self.path.split("?")[0] == "/healthz":
                    ok, body = daemon.health()
                    self._answer(200 if ok else 503, "application/json", json.dumps(body).encode())
                elif self.path.split("?")[0] == "/metrics":
                    from prometheus_client import CONTENT_TYPE_LATEST

                    self._answer(200, CONTENT_TYPE_LATEST, daemon.metrics.render())
                else:
                    self._answer(404, "text/plain", b"not found: try /healthz or /metrics\n")

            def _answer(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        server_cfg = self.config.server
        family = socket.AF_INET6 if ":" in server_cfg.host else socket.AF_INET

        class Server(ThreadingHTTPServer):
            address_family = family
            daemon_threads = True

        try:
            self.server = Server((server_cfg.host, server_cfg.port), Handler)
        except OSError as exc:
            raise ReferralWatchError(
                f"cannot listen on {server_cfg.listen} ([server] listen): {exc.strerror}"
            ) from None
        threading.Thread(target=self.server.serve_forever, name="http", daemon=True).start()
        log.info("server.listening", listen=server_cfg.listen)

    def _stop_server(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def _default_api(config: Config) -> Any:
    from referral_watch.auth import token_provider
    from referral_watch.partner_center import PartnerCenter

    return PartnerCenter(config.partner_center, token_provider(config))


def _default_sender(config: Config) -> Any:
    from referral_watch.notify import Notifier

    return Notifier(config.channels)


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) how we are; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("systemd.notify_failed", error=str(exc))


def _watchdog_interval() -> float | None:
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or not usec.isdigit():
        return None
    return max(1.0, int(usec) / 2_000_000)


def serve(config: Config, reload: Callable[[], Config] | None = None) -> int:
    return Daemon(config, reload=reload).serve()

