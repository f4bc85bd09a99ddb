"""One cycle: intake (poll -> store -> decide, one transaction) -> deliver -> tell operations
-> heartbeat -> prune. A webhook batch and `notify_now` run the same stages on fewer leads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from datetime import datetime, timedelta

import structlog

from referral_watch.config import Config
from referral_watch.cycle.decide import Decide
from referral_watch.cycle.delivery import Delivery
from referral_watch.cycle.intake import Intake
from referral_watch.cycle.operations import Operations
from referral_watch.cycle.ports import Api, Clock, Sender, system_clock
from referral_watch.cycle.result import CycleResult, crash_text
from referral_watch.errors import StateError
from referral_watch.state.db import ts
from referral_watch.state.outbox import STUCK_META
from referral_watch.state.store import Store

log = structlog.get_logger(__name__)

# Forgetting answered leads (state.keep_resolved) is not urgent: a cycle prunes the state only
# when the last prune was this long ago (or the clock went back), not at every poll.
PRUNE_EVERY = timedelta(hours=1)


class Cycle:
    def __init__(
        self,
        config: Config,
        store: Store,
        api: Api,
        sender: Sender,
        clock: Clock = system_clock,
        stop: threading.Event | None = None,
        may_send: Callable[[], bool] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.stop = stop or threading.Event()
        # Asked right before each send: a replica that lost the active lock sends nothing more.
        may_send = may_send or (lambda: True)
        self.decide = Decide(config, store)
        self.intake = Intake(config, store, api, clock, self.decide)
        self.operations = Operations(config, store)
        self.delivery = Delivery(config, store, sender, clock, self.stop, may_send, self.operations)

    def run(self) -> CycleResult:
        began = time.monotonic()
        result = CycleResult()
        now = self.clock()
        self.intake.poll(now, result)
        self._guarded("deliver", result, lambda: self.delivery.deliver(result))
        told: list[int] = []
        self._guarded("ops", result, lambda: told.extend(self.operations.tell(result, now)))
        if told:  # the news about this cycle goes out in this cycle
            self._guarded("deliver", result, lambda: self.delivery.deliver(result, only=told))
        self.operations.heartbeat(result.cycle_ok)  # a cycle that threw pings fail_url too
        if result.poll_ok:
            self._guarded("prune", result, lambda: self._prune(now))
        log.info(
            "cycle.done",
            ok=result.ok,
            fetched=result.fetched,
            new=result.new,
            malformed=result.malformed,
            resolved=result.resolved,
            alerts=result.queued,
            delivered=result.delivered,
            failed=result.failed,
            held=result.held,
            quarantined=result.quarantined,
            error=result.error,
            duration_s=round(time.monotonic() - began, 3),
        )
        return result

    def notify_now(self) -> CycleResult:
        """Decide and deliver without polling: after an answer given through referral-watch,
        `on_resolved` hears at once rather than at the next poll."""
        result = CycleResult(poll_ok=True)
        now = self.clock()
        with self.store.transaction():
            result.queued = self.decide.candidates(now, result)
        self.delivery.deliver(result)
        return result

    def handle_leads(self, lead_ids: Sequence[str]) -> CycleResult:
        """Webhook events named these leads: fetch each by id and handle it like a poll result
        for that one lead (store, decide, deliver), without polling the rest.

        Not a poll: it records no poll and concludes nothing about other leads. A lead that
        cannot be fetched now is left to the next poll (the safety net)."""
        began = time.monotonic()
        result = CycleResult(poll_ok=True)
        now = self.clock()
        lookups = self.intake.lookups
        records = lookups.fetch_each(lead_ids, result)
        with self.store.transaction():
            handled = [lead_id for lead_id, _ in records]
            for lead_id, record in records:
                lookups.handle_one(lead_id, record, now, result)
            self.store.mark_expired(now)
            result.queued += self.decide.leads(handled, now, result)
            self.store.webhook_events_handled(handled, now)
            failed = [lead_id for lead_id in lead_ids if lead_id not in set(handled)]
            self.store.webhook_events_handled(failed, now, error=result.error or "not fetched")
        self.delivery.deliver(result)
        log.info(
            "webhook.handled",
            leads=len(lead_ids),
            fetched=result.fetched,
            new=result.new,
            resolved=result.resolved,
            alerts=result.queued,
            delivered=result.delivered,
            failed=result.failed + result.lookup_failures,
            duration_s=round(time.monotonic() - began, 3),
        )
        return result

    def deliver(self, row_ids: Collection[int]) -> CycleResult:
        """Deliver these outbox rows now (a report the daemon just queued), settled like every
        message: a refused one stays in the outbox for the next cycle, a dropped one tells ops."""
        result = CycleResult()
        self.delivery.deliver(result, only=set(row_ids))
        return result

    def _prune(self, now: datetime) -> None:
        last = self.store.pruned_at()
        if last is not None and last <= now < last + PRUNE_EVERY:
            return
        pruned = self.store.prune(now, self.config.state.keep_resolved)
        if pruned:
            log.info("state.pruned", leads=pruned)

    def _guarded(self, stage: str, result: CycleResult, work: Callable[[], None]) -> None:
        """Run one stage; an unexpected exception in it fails the cycle (operations hear of
        it after `after_failures` such cycles) instead of ending it: the stages after it
        still run. A state file that cannot be used ends the cycle as before."""
        try:
            work()
        except StateError:
            raise
        except Exception as exc:
            error = crash_text(stage, exc)
            log.exception("cycle.stage_failed", stage=stage, error=error)
            result.crashed = result.crashed or stage
            result.error = result.error or error
            result.failures.append(error)
            with self.store.transaction():
                self.store.fail_last_poll(error)
                if stage == "deliver" and self.store.get_meta(STUCK_META) is None:
                    oldest = self.store.oldest_pending()
                    self.store.set_meta(STUCK_META, ts(oldest) if oldest else None)
