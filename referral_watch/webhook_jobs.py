"""The daemon's webhook side (SPEC 15): the endpoint, the worker that handles the leads
verified events name (one batch at a time with poll cycles and reports), and the relay
(webhooks.forward_to). A part of Daemon, kept apart so that daemon.py reads as the scheduler."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import structlog

from referral_watch.config import Config
from referral_watch.cycle.operations import Operations
from referral_watch.cycle.ports import Api, Clock, Sender
from referral_watch.cycle.result import CycleResult
from referral_watch.errors import ReferralWatchError, StateError
from referral_watch.metrics import Metrics
from referral_watch.ops import DROPPED
from referral_watch.state.store import Store
from referral_watch.watchdog import Progress

if TYPE_CHECKING:
    from referral_watch.cycle.runner import Cycle

log = structlog.get_logger(__name__)


class WebhookJobs:
    """Daemon's webhook jobs (Daemon provides what is declared here)."""

    config: Config
    clock: Clock
    stop: threading.Event
    metrics: Metrics
    progress: Progress
    receiver: Any
    webhook_worker: Any
    relay: Any
    _api: Any
    api_factory: Callable[[Config], Any]

    if TYPE_CHECKING:

        @property
        def active(self) -> bool: ...

        def _store(self) -> Store: ...

        def _deliver(self, store: Store, rows: list[int]) -> None: ...

        def _current_sender(self) -> Any: ...

        def _new_cycle(self, store: Store, api: Api | None, sender: Sender) -> Cycle: ...

    def _start_webhooks(self) -> None:
        """The endpoint and its worker, when [webhooks] is configured."""
        if self.config.webhooks is None:
            return
        from referral_watch.partner_center.webhooks.receiver import Receiver
        from referral_watch.partner_center.webhooks.worker import WebhookWorker

        worker = WebhookWorker(
            self.handle_webhook_leads,
            self._pending_webhook_leads,
            digest_over=self.config.policy.digest_over,
            stop=self.stop,
        )
        self.relay = self._start_relay()
        self.receiver = Receiver(
            self.config,
            wake=worker.wake,
            count=self._count_webhook_event,
            clock=self.clock,
            relay_wake=self.relay.wake if self.relay is not None else lambda: None,
        )
        with Store(self.config.state.location) as store:
            self.receiver.last_event = store.last_webhook_event()
        self.webhook_worker = worker
        worker.start()

    def _start_relay(self) -> Any:
        """The relay (webhooks.forward_to): its own thread, sending while we are active."""
        assert self.config.webhooks is not None
        targets = self.config.webhooks.forward_to
        if not targets:
            return None
        from referral_watch.partner_center.webhooks.relay import Relay, RelayMetrics

        metrics = RelayMetrics(self.metrics.registry, targets, self.clock)
        relay = Relay(
            self.config.state.location,
            targets,
            active=lambda: self.active,
            stop=self.stop,
            on_dropped=self._relay_dropped,
            count=metrics.count,
            observe=metrics.observe,
            clock=self.clock,
        )
        relay.start()
        return relay

    def _relay_dropped(self, reason: str) -> None:
        """An event could not be relayed for a day: operations hear it, as of a dropped
        message (through the outbox: a refusal there is retried)."""
        with self.progress.working():
            try:
                now = self.clock()
                with self._store() as store:
                    rows = Operations(self.config, store).enqueue(DROPPED, reason, now)
                    self._deliver(store, rows)
            except ReferralWatchError as exc:
                log.error("relay.ops_unsent", error=str(exc)[:200])

    def _count_webhook_event(self, event: str, result: str) -> None:
        self.metrics.webhook_events.labels(event, result).inc()
        if event != "unverified":
            self.metrics.webhook_last_event.set(self.clock().timestamp())

    def _pending_webhook_leads(self) -> list[str]:
        with Store(self.config.state.location) as store:
            if self.receiver is not None and self.receiver.parked:
                try:
                    self.receiver.flush(store)
                except StateError as exc:  # still busy: try again in a moment
                    log.warning("webhook.flush_failed", error=str(exc), left=self.receiver.parked)
                    retry = threading.Timer(1.0, self.webhook_worker.wake)
                    retry.daemon = True
                    retry.start()
            return store.pending_webhook_leads()

    def handle_webhook_leads(self, lead_ids: Sequence[str]) -> CycleResult | None:
        """The worker's batch: these leads only, fetched by id, stored, decided, delivered;
        one at a time with poll cycles and reports (the daemon's work lock). A standby
        replica leaves them to the active one (the events wait in the shared state)."""
        if not self.active:
            return None
        with self.progress.working():
            try:
                return self._webhook_batch(lead_ids)
            except ReferralWatchError as exc:
                log.error("webhook.batch_failed", error=str(exc), leads=len(lead_ids))
            except Exception:  # a bug must not end the worker: the next poll covers the leads
                log.exception("webhook.batch_crashed", leads=len(lead_ids))
        return None

    def _webhook_batch(self, lead_ids: Sequence[str]) -> CycleResult:
        if self._api is None:
            self._api = self.progress.watched(self.api_factory(self.config))
        sender = self._current_sender()
        with self._store() as store:
            result = self._new_cycle(store, self._api, sender).handle_leads(lead_ids)
        for (channel, outcome), count in result.by_channel.items():
            self.metrics.deliveries.labels(channel, outcome).inc(count)
        return result
