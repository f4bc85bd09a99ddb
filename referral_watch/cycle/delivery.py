"""Delivery as plan -> send -> record: the due outbox rows are planned into messages (plan.py,
pure), sent by the channel workers (sender.py) and settled by the recorder (recorder.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime

import structlog

from referral_watch.config import Config
from referral_watch.cycle import plan
from referral_watch.cycle.operations import Operations
from referral_watch.cycle.ports import Clock, Sender
from referral_watch.cycle.recorder import Failure, Recorder
from referral_watch.cycle.result import CycleResult
from referral_watch.cycle.sender import Dispatch
from referral_watch.errors import ReferralWatchError
from referral_watch.model import Batch, Message, PendingRow
from referral_watch.state.leads import LeadOutlines
from referral_watch.state.store import Store

log = structlog.get_logger(__name__)


class Delivery:
    def __init__(
        self,
        config: Config,
        store: Store,
        sender: Sender,
        clock: Clock,
        stop: threading.Event,
        may_send: Callable[[], bool],
        operations: Operations,
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.stop = stop
        self.recorder = Recorder(store, clock, operations)
        self.dispatch = Dispatch(config, store, sender, clock, stop, may_send, self.recorder)

    def deliver(self, result: CycleResult, only: Collection[int] | None = None) -> None:
        """Send what is due from the outbox (only the rows `only` names, when given)."""
        now = self.clock()
        rows = self.store.pending()
        if only is not None:
            rows = [row for row in rows if row.id in only]
        if not rows:
            if only is None:
                self.recorder.note_stuck(None)
            return
        outlines = self._delivery_leads(rows) if only is None else LeadOutlines()
        batches, held = plan.batches(
            rows,
            outlines.leads,
            self.config,
            now,
            news_only=only is not None,
            deadlines=outlines.deadlines,
        )
        del outlines  # a first cycle's: tens of thousands of deadlines
        if only is None:
            result.held = held
        if self.stop.is_set():
            log.info("delivery.stopped", left=len(batches))
            return
        by_id = {row.id: row for row in rows}
        jobs: dict[str, list[tuple[Batch, Message]]] = {}
        for batch in batches:
            made = self._made(batch, by_id, now, result)
            if made is not None:
                jobs.setdefault(made[0].channel, []).append(made)
        if jobs:
            self.dispatch.send_all(jobs, result)
        if only is None and not self.stop.is_set():
            stuck = [by_id[i].created for i in result.failed_rows if i in by_id]
            self.recorder.note_stuck(min(stuck) if stuck else None)

    def _made(
        self, batch: Batch, rows: Mapping[int, PendingRow], now: datetime, result: CycleResult
    ) -> tuple[Batch, Message] | None:
        """The batch and its message; a lead whose message cannot be made is set aside and
        a digest goes out without it."""
        while True:
            try:
                return batch, self._message(batch, now)
            except ReferralWatchError as exc:
                self.recorder.settle(batch, Failure(str(exc)), result)
                return None
            except Exception as exc:
                error = f"{type(exc).__name__}: {str(exc)[:120]}"
            unworded = [i for i in batch.lead_ids if not self._renders(batch, i, now)]
            salvage = plan.salvage(batch, rows, unworded)
            self.recorder.set_aside_rows(
                batch, salvage.lead_ids, salvage.row_ids, error, now, result
            )
            if salvage.rest is None:
                return None
            batch = salvage.rest

    def _renders(self, batch: Batch, lead_id: str, now: datetime) -> bool:
        try:
            self._message(plan.alone(batch, lead_id), now)
        except ReferralWatchError:
            return True  # not this lead's text
        except Exception:
            return False
        return True

    def _message(self, batch: Batch, now: datetime) -> Message:
        """Read what the batch's message needs from the state, then word it (plan.py)."""
        if not batch.lead_ids:
            return plan.message_for(
                batch, (), self.store.message_text(batch.row_ids[0]), self.config, now
            )
        found = {
            lead.id: lead
            for lead in self.store.leads(include_resolved=True, ids=list(batch.lead_ids))
        }
        known = [found[i] for i in batch.lead_ids if i in found]
        return plan.message_for(batch, known, ("", ""), self.config, now)

    def _delivery_leads(self, rows: Sequence[PendingRow]) -> LeadOutlines:
        """What delivery_batches needs to order and address the rows: deadlines and outlines
        of claimed leads (no JSON read), and whole leads only where the recipients come from
        the lead (to_assignees)."""
        ids = {row.lead_id for row in rows if row.lead_id is not None}
        outlines = self.store.lead_outlines(ids)
        assignees = {
            row.lead_id
            for row in rows
            if row.lead_id is not None
            and (channel := self.config.channels.get(row.channel)) is not None
            and channel.to_assignees
        }
        for lead in self.store.leads(include_resolved=True, ids=sorted(assignees)):
            outlines.leads[lead.id] = lead
        return outlines
