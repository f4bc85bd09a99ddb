"""Send: each channel's messages in order, channels side by side (at most PARALLEL_CHANNELS at
once). Workers only claim and send; every outcome goes back to the thread that owns the state
(the recorder settles it there), and a channel's next message waits until its previous one is
recorded, so a crash repeats at most one message per channel.

Claims (SPEC 16): a message's outbox rows are taken by this process right before its send, and
sent only while the claim is young and this replica may still send."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import structlog

from referral_watch.config import Config
from referral_watch.cycle.ports import Clock, Sender
from referral_watch.cycle.recorder import Failure, Recorder
from referral_watch.cycle.result import CycleResult
from referral_watch.errors import StateError
from referral_watch.model import Batch, Message
from referral_watch.state.outbox import CLAIM_LEASE
from referral_watch.state.store import Store

log = structlog.get_logger(__name__)

# Channels delivered to at the same time (each channel still gets one message at a time).
PARALLEL_CHANNELS = 4

# The shortest claim lease: longer than a standby takes to replace a paused active one (up to
# ~10 s: the server ends a lock session 8 s after its last check, standbys try every 2 s). So
# the message a paused active had in flight is still its own when the standby takes over, and
# the paused one, woken, records it as sent before the lease lets the new active take it. (At
# 5 s, the new active's first cycle raced the woken one's record, and sent it again.)
LEASE_FLOOR = timedelta(seconds=15)


@dataclass
class Claim:
    """A channel worker's request to claim a message's rows before sending it."""

    batch: Batch
    done: threading.Event = field(default_factory=threading.Event)
    granted: bool = False
    at: float = 0.0  # time.monotonic() of the claim


Outcomes = queue.Queue["Claim | tuple[Batch, Any, threading.Event] | None"]


class Dispatch:
    def __init__(
        self,
        config: Config,
        store: Store,
        sender: Sender,
        clock: Clock,
        stop: threading.Event,
        may_send: Callable[[], bool],
        recorder: Recorder,
    ) -> None:
        self.config = config
        self.store = store
        self.sender = sender
        self.clock = clock
        self.stop = stop
        self.may_send = may_send  # asked right before each send
        self.recorder = recorder

    def send_all(self, jobs: dict[str, list[tuple[Batch, Message]]], result: CycleResult) -> None:
        """Send each channel's messages in order, channels side by side (at most
        PARALLEL_CHANNELS at once). A channel's next message waits until this thread has
        recorded the previous one, so a crash repeats at most one message per channel."""
        outcomes: Outcomes = queue.Queue()
        unsettled: list[tuple[Batch, Any]] = []
        try:
            self._run_workers(jobs, outcomes, unsettled, result)
        except StateError:
            # The state went away mid-burst (a paused replica wakes up to find its connection
            # ended by the one that took over): the workers have stopped; record what they
            # sent on a new connection, so no replica sends it again. Then fail as usual.
            while not outcomes.empty():
                item = outcomes.get()
                if isinstance(item, tuple):
                    unsettled.append(item[:2])
            self._record_elsewhere([batch for batch, outcome in unsettled if outcome.ok])
            raise

    def _run_workers(
        self,
        jobs: dict[str, list[tuple[Batch, Message]]],
        outcomes: Outcomes,
        unsettled: list[tuple[Batch, Any]],
        result: CycleResult,
    ) -> None:
        abort = threading.Event()
        workers = min(PARALLEL_CHANNELS, len(jobs))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deliver") as pool:
            for channel_jobs in jobs.values():
                pool.submit(self._channel_worker, channel_jobs, outcomes, abort)
            finished = 0
            try:
                while finished < len(jobs):
                    item = outcomes.get()
                    if item is None:
                        finished += 1
                        continue
                    if isinstance(item, Claim):
                        self._claim(item)
                        continue
                    batch, outcome, recorded = item
                    unsettled.append((batch, outcome))
                    try:
                        self.recorder.settle(batch, outcome, result)
                        unsettled.pop()
                    finally:
                        recorded.set()
            except BaseException:
                abort.set()  # workers stop after the message in flight
                raise

    def _record_elsewhere(self, batches: Sequence[Batch]) -> None:
        if not batches or not isinstance(self.store.path, str):
            return  # a SQLite file has no other connection to try
        now = self.clock()
        try:
            with Store(self.store.path) as again:
                for batch in batches:
                    again.delivered(batch.row_ids, now)
        except StateError as exc:
            log.error("delivery.unrecorded", messages=len(batches), error=str(exc))

    def _claim(self, claim: Claim) -> None:
        """Take the message's outbox rows for this process (on the thread owning the store)."""
        try:
            claim.granted = self.store.claim(claim.batch.row_ids, self.clock(), self._lease)
            claim.at = time.monotonic()
        finally:
            claim.done.set()

    def _channel_worker(
        self,
        jobs: list[tuple[Batch, Message]],
        outcomes: Outcomes,
        abort: threading.Event,
    ) -> None:
        try:
            for index, (batch, message) in enumerate(jobs):
                if self.stop.is_set() or abort.is_set():
                    log.info("delivery.stopped", channel=batch.channel, left=len(jobs) - index)
                    return
                claim = Claim(batch)
                outcomes.put(claim)
                while not claim.done.wait(0.05):
                    if abort.is_set():
                        return
                if not claim.granted:
                    log.info("delivery.claimed_elsewhere", channel=batch.channel, kind=batch.kind)
                    continue
                if not self._still_ours(claim):
                    log.warning("delivery.stopped", channel=batch.channel, reason="not active")
                    return
                try:
                    outcome = self.sender.send(batch.channel, message, recipients=batch.recipients)
                except Exception as exc:  # a sender bug must not lose the others' results
                    error = f"unexpected {type(exc).__name__}: {str(exc)[:120]}"
                    outcome = Failure(error, crashed=True)
                recorded = threading.Event()
                outcomes.put((batch, outcome, recorded))
                while not recorded.wait(0.05):
                    if abort.is_set():
                        return
        finally:
            outcomes.put(None)

    @property
    def _lease(self) -> timedelta:
        """A claim's lease: long enough for one send, and never longer than an interval (so a
        message claimed by a replica that died is sent by the next one at its next cycle),
        but at least LEASE_FLOOR."""
        return max(LEASE_FLOOR, min(CLAIM_LEASE, self.config.schedule.interval))

    def _still_ours(self, claim: Claim) -> bool:
        """Right before a send: this replica may still send, and its claim is young enough
        that no other replica can have taken it over (a process paused between claiming and
        sending finds its claim too old when it wakes)."""
        young = time.monotonic() - claim.at < self._lease.total_seconds() / 2
        return young and not self.stop.is_set() and self.may_send()
