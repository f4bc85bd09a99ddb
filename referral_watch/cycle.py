"""One poll cycle: fetch every page -> store -> decide -> deliver.

`run --once`, the daemon and the demo all call `Cycle.run`; only the clock and the loop differ.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import structlog

from referral_watch import ops, policy, render
from referral_watch.config import Config
from referral_watch.errors import ApiError, AuthError, ReferralWatchError
from referral_watch.model import (
    Batch,
    Lead,
    MalformedReferral,
    Message,
    Referral,
    deadline_of,
    parse_referral,
)
from referral_watch.store import PollRecord, Store, from_ts, ts

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]

# A delivery failing for this long is dropped (and operations told).
GIVE_UP_AFTER = timedelta(days=1)

# Substatuses that still wait for the partner's answer.
WAITING = frozenset({"pending", "received"})


def system_clock() -> datetime:
    return datetime.now(UTC)


class Api(Protocol):
    def pages(self) -> Iterable[Any]: ...

    def get(self, referral_id: str) -> dict[str, Any] | None: ...


class Sender(Protocol):
    def send(self, channel: str, message: Message, *, recipients: Any = ()) -> Any: ...


@dataclass
class CycleResult:
    poll_ok: bool = False
    fetched: int = 0
    new: int = 0
    malformed: int = 0
    resolved: int = 0
    lookup_failures: int = 0
    queued: int = 0
    delivered: int = 0
    failed: int = 0
    held: int = 0
    error: str | None = None
    needs_login: bool = False
    failures: list[str] = field(default_factory=list)
    by_channel: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        """Exit 0 for `run --once`: the poll and every delivery succeeded."""
        return self.poll_ok and self.failed == 0 and self.lookup_failures == 0


class Cycle:
    def __init__(
        self,
        config: Config,
        store: Store,
        api: Api,
        sender: Sender,
        clock: Clock = system_clock,
        stop: threading.Event | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.api = api
        self.sender = sender
        self.clock = clock
        self.stop = stop or threading.Event()

    # --- the cycle ----------------------------------------------------------------------

    def run(self) -> CycleResult:
        began = time.monotonic()
        result = CycleResult()
        now = self.clock()
        self._poll(now, result)
        self._tell_operations(result, now)
        self._deliver(result)
        if result.poll_ok:
            self._heartbeat()
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
            error=result.error,
            duration_s=round(time.monotonic() - began, 3),
        )
        return result

    def _deadline(self, referral: Referral) -> datetime:
        return deadline_of(referral, self.config.policy.response_window)

    def _poll(self, now: datetime, result: CycleResult) -> None:
        """Poll, store and decide in one transaction: a failed poll changes no lead."""
        try:
            with self.store.transaction():
                for page in self.api.pages():
                    referrals = self._parse(page.records, result)
                    result.fetched += len(page.records)
                    result.new += self.store.upsert(referrals, self._deadline, now)
                self._conclude_absent(now, result)
                self.store.mark_expired(now)
                alerts = policy.due_alerts(
                    self.store.leads(for_policy=True), self.store.history(), self.config, now
                )
                result.queued = self.store.record(alerts, now)
                result.poll_ok = True
                self.store.insert_poll(self._poll_record(now, result))
        except (ApiError, AuthError) as exc:
            result.poll_ok = False
            result.error = str(exc)
            result.needs_login = isinstance(exc, AuthError) and exc.needs_login
            log.error("poll.failed", error=str(exc), needs_login=result.needs_login)
            self.store.record_poll(self._poll_record(now, result))

    def _poll_record(self, now: datetime, result: CycleResult) -> PollRecord:
        return PollRecord(
            started=now,
            finished=max(now, self.clock()),
            ok=result.poll_ok,
            fetched=result.fetched,
            new=result.new,
            skipped=result.malformed,
            error=result.error,
            needs_login=result.needs_login,
        )

    def _parse(self, records: list[Any], result: CycleResult) -> list[Referral]:
        referrals = []
        for record in records:
            try:
                referrals.append(parse_referral(record))
            except MalformedReferral as exc:
                result.malformed += 1
                log.error("referral.malformed", error=str(exc))
        return referrals

    def _conclude_absent(self, now: datetime, result: CycleResult) -> None:
        """After a complete poll: ask about each watched lead that was not in it."""
        for lead_id in self.store.absent_since(now):
            try:
                record = self.api.get(lead_id)
            except ApiError as exc:
                result.lookup_failures += 1
                result.failures.append(f"lookup of {lead_id}: {exc}")
                log.error("lead.lookup_failed", lead=lead_id, error=str(exc))
                continue
            if record is None:
                self.store.resolve(lead_id, "gone", now)
                result.resolved += 1
                log.info("lead.resolved", lead=lead_id, resolution="gone")
                continue
            try:
                referral = parse_referral(record)
            except MalformedReferral as exc:
                result.lookup_failures += 1
                log.error("lead.lookup_malformed", lead=lead_id, error=str(exc))
                continue
            substatus = referral.substatus.lower()
            # Still new (Pending, or Received: opened but not answered): the 14 days still run.
            if referral.is_pending or substatus in WAITING or not substatus:
                self.store.refresh(referral, self._deadline(referral))
                continue
            # accepted, declined, won, lost or expired (any other substatus is kept as given)
            self.store.resolve(lead_id, substatus, now, referral.raw)
            result.resolved += 1
            log.info("lead.resolved", lead=lead_id, resolution=substatus)

    # --- operations alerts --------------------------------------------------------------

    def _tell_operations(self, result: CycleResult, now: datetime) -> None:
        state = ops.OpsState(
            alerting_since=from_ts(self.store.get_meta("ops.alerting_since")),
            last_alert=from_ts(self.store.get_meta("ops.last_alert")),
        )
        failures = self.store.failures_in_a_row()
        event, new_state = ops.ops_event(
            result.poll_ok, failures, state, self.config.operations, now
        )
        if event is None:
            return
        reason = result.error or ""
        log.warning("ops.event", ops_event=event, failures=failures, reason=reason)
        for channel in self.config.operations.notify:
            message = render.render_ops(
                event,
                reason,
                now,
                render.style_for(self.config, channel),
                failures=failures,
                since=state.alerting_since or now,
            )
            self.store.enqueue_message("ops", channel, message.title, message.body, now)
        with self.store.transaction():
            self.store.set_meta(
                "ops.alerting_since",
                ts(new_state.alerting_since) if new_state.alerting_since else None,
            )
            self.store.set_meta(
                "ops.last_alert", ts(new_state.last_alert) if new_state.last_alert else None
            )

    # --- delivery -----------------------------------------------------------------------

    def _deliver(self, result: CycleResult) -> None:
        now = self.clock()
        rows = self.store.pending()
        if not rows:
            return
        leads = {lead.id: lead for lead in self.store.leads(include_resolved=True)}
        batches = policy.delivery_batches(rows, leads, self.config, now)
        result.held = len(rows) - sum(len(b.row_ids) for b in batches)
        for batch in batches:
            if self.stop.is_set():
                log.info("delivery.stopped", left=len(batches))
                break
            self._send(batch, leads, result)

    def _send(self, batch: Batch, leads: dict[str, Lead], result: CycleResult) -> None:
        now = self.clock()
        try:
            message = self._message(batch, leads, now)
        except ReferralWatchError as exc:
            message = None
            error = str(exc)
        if message is not None:
            outcome = self.sender.send(batch.channel, message, recipients=batch.recipients)
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
            error = outcome.error or "delivery failed"
        result.failed += 1
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
        for channel in self.config.operations.notify:
            if channel == batch.channel:
                continue
            message = render.render_ops(
                ops.DROPPED, reason, now, render.style_for(self.config, channel)
            )
            self.store.enqueue_message("ops", channel, message.title, message.body, now)

    def _message(self, batch: Batch, leads: dict[str, Lead], now: datetime) -> Message:
        style = render.style_for(self.config, batch.channel)
        if not batch.lead_ids:
            title, body = self.store.message_text(batch.row_ids[0])
            return Message(title, body)
        tier = self.config.policy.tier(batch.tier) if batch.tier else None
        known = [leads[i] for i in batch.lead_ids if i in leads]
        if not known:
            raise ReferralWatchError("the lead is no longer in the state file")
        if batch.digest:
            return render.render_digest(known, batch.kind, tier, batch.more, now, style)
        return render.render_alert(known[0], batch.kind, tier, now, style)

    def _heartbeat(self) -> None:
        beat = self.config.heartbeat
        if beat is None:
            return
        import httpx

        try:
            httpx.get(beat.url, timeout=beat.timeout.total_seconds()).raise_for_status()
        except httpx.HTTPError as exc:
            log.warning("heartbeat.failed", error=type(exc).__name__)
