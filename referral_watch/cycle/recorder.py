"""Record: what happened to each message, settled on the thread that owns the state. Sent ->
delivered; refused -> retried next cycle, dropped after a day of refusals (operations told);
a message that broke the sender -> its leads set aside. No recursion: a result is recorded
once, and anything it leads to (an ops message) goes through the outbox."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog

from referral_watch import ops
from referral_watch.cycle.operations import Operations
from referral_watch.cycle.ports import Clock
from referral_watch.cycle.result import CycleResult, set_aside
from referral_watch.model import Batch
from referral_watch.redact import scrub
from referral_watch.state.db import ts
from referral_watch.state.outbox import STUCK_META
from referral_watch.state.store import Store

log = structlog.get_logger(__name__)

# A delivery failing for this long is dropped (and operations told).
GIVE_UP_AFTER = timedelta(days=1)


@dataclass(frozen=True)
class Failure:
    """A delivery outcome for a message that could not be sent at all."""

    error: str
    ok: bool = False
    crashed: bool = False  # the sender raised: the message, not the channel, is the problem


class Recorder:
    def __init__(self, store: Store, clock: Clock, operations: Operations) -> None:
        self.store = store
        self.clock = clock
        self.operations = operations

    def settle(self, batch: Batch, outcome: Any, result: CycleResult) -> None:
        """Record what happened to one message (on the thread that owns the store)."""
        if outcome.ok:
            self.store.delivered(batch.row_ids, self.clock())
            result.delivered += 1
            result.by_channel[(batch.channel, "ok")] += 1
            log.info(
                "delivery.sent",
                channel=batch.channel,
                kind=batch.kind,
                tier=batch.tier,
                leads=len(batch.lead_ids),
                digest=batch.digest,
            )
            return
        now = self.clock()
        error = scrub(outcome.error or "delivery failed")
        if getattr(outcome, "crashed", False) and batch.lead_ids:
            # Not the channel: this message broke the sender. Set its leads aside rather than
            # retry the same crash every cycle for a day.
            log.error("delivery.crashed", channel=batch.channel, kind=batch.kind, error=error)
            self.set_aside_rows(
                batch, batch.lead_ids, batch.row_ids, error, now, result, stage="send"
            )
            return
        result.failed += 1
        result.failed_rows.extend(batch.row_ids)
        result.by_channel[(batch.channel, "failed")] += 1
        result.failures.append(f"channel {batch.channel}: {error}")
        log.error("delivery.failed", channel=batch.channel, kind=batch.kind, error=error)
        dropped = self.store.failed(batch.row_ids, error, now, GIVE_UP_AFTER)
        if dropped and batch.kind != "ops":
            self._tell_dropped(batch, error, now)

    def _tell_dropped(self, batch: Batch, error: str, now: datetime) -> None:
        what = f"{batch.kind} {batch.tier or ''}".strip()
        leads = ", ".join(batch.lead_ids[:5]) or "no lead"
        reason = f"channel {batch.channel}: {what} about {leads}: {error}"
        log.error("delivery.dropped", channel=batch.channel, reason=reason)
        self.operations.enqueue(ops.DROPPED, reason, now, skip=batch.channel)

    def set_aside_rows(
        self,
        batch: Batch,
        lead_ids: Sequence[str],
        row_ids: Sequence[int],
        error: str,
        now: datetime,
        result: CycleResult,
        stage: str = "render",
    ) -> None:
        reason = f"its {batch.kind} message for {batch.channel} cannot be made ({error})"
        if stage == "send":
            reason = f"sending its {batch.kind} message to {batch.channel} failed ({error})"
        with self.store.transaction():
            for lead_id in lead_ids:
                set_aside(self.store, lead_id, stage, reason, now, result, lead_id=lead_id)
            self.store.set_aside(row_ids, scrub(reason))

    def note_stuck(self, since: datetime | None) -> None:
        """Remember since when a due delivery has been failing (for the health verdict)."""
        value = ts(since) if since else None
        if self.store.get_meta(STUCK_META) != value:
            with self.store.transaction():
                self.store.set_meta(STUCK_META, value)
