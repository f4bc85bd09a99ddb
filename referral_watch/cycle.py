"""One poll cycle: fetch every page -> store -> decide -> deliver.

`run --once`, the daemon and the demo all call `Cycle.run`; only the clock and the loop differ.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import structlog

from referral_watch import jsontext, ops, policy
from referral_watch.config import Config
from referral_watch.errors import ApiError, AuthError, ReferralWatchError, StateError, scrub
from referral_watch.model import (
    Batch,
    Lead,
    MalformedReferral,
    Message,
    PendingRow,
    Referral,
    deadline_of,
    parse_referral,
    usable_id,
)
from referral_watch.state.db import from_ts, printable, ts
from referral_watch.state.journal import PollRecord
from referral_watch.state.outbox import CLAIM_LEASE, STUCK_META
from referral_watch.state.store import Store

# What a stage does, for "internal error while ..." messages.
STAGE_WORDS = {
    "poll": "polling",
    "deliver": "delivering",
    "ops": "telling operations",
    "prune": "pruning old leads",
}
# A record's JSON text longer than this is set aside, not stored (characters).
RECORD_LIMIT = 256 * 1024
# Operations hear of at most this many newly quarantined records by name in one message.
QUARANTINE_NAMED = 20

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]

# A delivery failing for this long is dropped (and operations told).
GIVE_UP_AFTER = timedelta(days=1)

# Channels delivered to at the same time (each channel still gets one message at a time).
PARALLEL_CHANNELS = 4
# Pages fetched ahead while the store works on the current one.
PREFETCH_PAGES = 2
# Leads read, decided and recorded at a time: bounds memory in a first cycle of 50,000 leads.
POLICY_CHUNK = 500
# The response window that computed the stored deadlines; another one means re-reading all.
WINDOW_META = "policy.response_window"

# Substatuses that still wait for the partner's answer.
WAITING = frozenset({"pending", "received"})
# What a webhook's lead is checked against when partner_center.filter is beyond the subset
# the evaluator understands (referral_watch.partner_center.odata).
DEFAULT_FILTER = "direction eq 'Incoming' and substatus eq 'Pending'"


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
    quarantined: int = 0  # records set aside in this cycle (see Store.quarantine)
    crashed: str | None = None  # the stage that raised an unexpected exception
    error: str | None = None
    needs_login: bool = False
    failures: list[str] = field(default_factory=list)
    by_channel: Counter[tuple[str, str]] = field(default_factory=Counter)
    failed_rows: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Exit 0 for `run --once`: the poll and every delivery succeeded."""
        return (
            self.poll_ok and self.failed == 0 and self.lookup_failures == 0 and self.crashed is None
        )

    @property
    def cycle_ok(self) -> bool:
        """For operations: the poll succeeded and no stage threw."""
        return self.poll_ok and self.crashed is None


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
        self.api = api
        self.sender = sender
        self.clock = clock
        self.stop = stop or threading.Event()
        # Asked right before each send: a replica that lost the active lock sends nothing more.
        self.may_send = may_send or (lambda: True)
        self._filter: Callable[[dict[str, Any]], bool] | None = None  # for webhook leads
        self._held_back: set[str] = set()  # quarantined keys at the start of this poll

    # --- the cycle ----------------------------------------------------------------------

    def run(self) -> CycleResult:
        began = time.monotonic()
        result = CycleResult()
        now = self.clock()
        self._poll(now, result)
        self._guarded("deliver", result, lambda: self._deliver(result))
        told: list[int] = []
        self._guarded("ops", result, lambda: told.extend(self._tell_operations(result, now)))
        if told:  # the news about this cycle goes out in this cycle
            self._guarded("deliver", result, lambda: self._deliver(result, only=told))
        self._heartbeat(result.cycle_ok)  # a cycle that threw pings fail_url, like a failed poll
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
            result.queued = self._decide(now, result)
        self._deliver(result)
        return result

    def _prune(self, now: datetime) -> None:
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
            error = self._crash_text(stage, exc)
            log.exception("cycle.stage_failed", stage=stage, error=error)
            result.crashed = result.crashed or stage
            result.error = result.error or error
            result.failures.append(error)
            with self.store.transaction():
                self.store.fail_last_poll(error)
                if stage == "deliver" and self.store.get_meta(STUCK_META) is None:
                    oldest = self.store.oldest_pending()
                    self.store.set_meta(STUCK_META, ts(oldest) if oldest else None)

    @staticmethod
    def _crash_text(stage: str, exc: BaseException) -> str:
        detail = scrub(str(exc))[:200]
        what = STAGE_WORDS.get(stage, stage)
        return f"internal error while {what}: {type(exc).__name__}" + (
            f": {detail}" if detail else ""
        )

    def _deadline(self, referral: Referral) -> datetime:
        return deadline_of(referral, self.config.policy.response_window)

    def _poll(self, now: datetime, result: CycleResult) -> None:
        """Poll, store and decide in one transaction: a failed poll changes no lead."""
        try:
            with self.store.transaction(), _Prefetch(self.api.pages) as pages:
                # Fetching has begun: reading the stored texts overlaps the first request.
                self._held_back = self.store.quarantined_keys()
                stored = self.store.fingerprints()
                if not self._stored_deadlines_current():
                    stored = {}  # re-read every record: the deadlines need computing again
                seen = _Seen()
                for page in pages:
                    fresh, again = self._changed(page, result, now, stored, seen)
                    result.queued += self._store_fresh(fresh, now, result)
                    self._upsert(again, now, result)
                self._conclude_absent(now, result, seen.ids)
                self.store.mark_expired(now)
                result.queued += self._decide(now, result)
                result.poll_ok = True
                self.store.record_poll(self._poll_record(now, result))
        except (ApiError, AuthError) as exc:
            result.needs_login = isinstance(exc, AuthError) and exc.needs_login
            self._poll_failed(now, result, scrub(str(exc)))
        except StateError:
            raise
        except Exception as exc:  # a bug on the way: rolled back, and the cycle has failed
            error = self._crash_text("poll", exc)
            log.exception("cycle.stage_failed", stage="poll", error=error)
            result.crashed = "poll"
            self._poll_failed(now, result, error)

    def _poll_failed(self, now: datetime, result: CycleResult, error: str) -> None:
        result.poll_ok = False
        result.queued = 0  # rolled back with the rest of the poll
        result.quarantined = 0  # the same
        result.error = error
        log.error("poll.failed", error=error, needs_login=result.needs_login)
        with self.store.transaction():
            self.store.record_poll(self._poll_record(now, result))

    def _stored_deadlines_current(self) -> bool:
        """Whether stored deadlines were computed with today's response window, so a record
        that did not change needs no re-reading. Call inside the poll's transaction."""
        window = str(int(self.config.policy.response_window.total_seconds()))
        if self.store.get_meta(WINDOW_META) == window:
            return True
        self.store.set_meta(WINDOW_META, window)
        return False

    def _changed(
        self,
        page: Any,
        result: CycleResult,
        now: datetime,
        stored: dict[int, str],
        seen: _Seen,
    ) -> tuple[list[Referral], list[Referral]]:
        """The records of one page that need storing: (first seen in this poll, repeated).

        A watched lead whose record has the same text as the stored one is only marked seen:
        no decoding, no parsing, no rewriting. That is nearly every lead in a steady cycle.
        A record that cannot be watched is set aside (quarantined) and the others go on.
        """
        texts: list[str] | None = getattr(page, "texts", None)
        count = len(texts) if texts is not None else len(page.records)
        result.fetched += count
        fresh: list[Referral] = []
        again: list[Referral] = []
        for index in range(count):
            record, raw = _record_and_text(page, texts, index)
            if raw is None:
                reason = "unreadable record (cannot be serialized)"
                self._set_aside(_record_key(repr(record)[:10_000]), "parse", reason, now, result)
                continue
            fingerprint = hash(raw)  # 64 bits: a false "unchanged" is not a practical risk
            if fingerprint in seen.texts:
                log.info("poll.duplicate", lead=seen.texts[fingerprint])  # paging shifted
                continue
            known = stored.get(fingerprint)
            if known is not None and known not in seen.ids:
                seen.note(fingerprint, known)  # unchanged: nothing to store
                continue
            # (A stored text met after another copy of the lead rewrote it is stored again:
            # the last copy in the poll wins, whatever it is.)
            problem = ""
            if record is _UNDECODED:
                record, problem = _decode(page, index)
            lead_id = _lead_id(record) if record is not None else _id_in_text(raw)
            if lead_id is None:
                reason = problem or _unparsable(record, raw)
                self._set_aside(_record_key(raw), "parse", reason, now, result, raw=raw)
                continue
            repeated = lead_id in seen.ids
            seen.note(fingerprint, lead_id)  # seen, even when set aside: not "gone"
            referral = self._admit(record, raw, lead_id, problem, now, result)
            if referral is not None:
                (again if repeated else fresh).append(referral)
        return fresh, again

    def _parse(self, record: Any, raw: str | None, result: CycleResult) -> Referral | None:
        """One record from elsewhere than a poll's page (a webhook's lead): the referral, or
        None when it is set aside like a poll's record would be."""
        now = self.clock()
        if raw is None:
            try:
                raw = json.dumps(record, separators=(",", ":"), sort_keys=True)
            except (ValueError, TypeError, RecursionError):
                reason = "unreadable record (cannot be serialized)"
                self._set_aside(_record_key(repr(record)[:10_000]), "parse", reason, now, result)
                return None
        lead_id = _lead_id(record)
        if lead_id is None:
            reason = _unparsable(record, raw)
            self._set_aside(_record_key(raw), "parse", reason, now, result, raw=raw)
            return None
        return self._admit(record, raw, lead_id, "", now, result)

    def _admit(
        self, record: Any, raw: str, lead_id: str, problem: str, now: datetime, result: CycleResult
    ) -> Referral | None:
        """The referral, when the record can be watched; else it is set aside (with why)."""
        stage = "parse"
        if not usable_id(lead_id):
            problem = f"record has an id that is not usable text: {lead_id[:40]!r}"
        elif len(raw) > RECORD_LIMIT:
            problem = f"record is {len(raw) // 1024} KiB, over the {RECORD_LIMIT // 1024} KiB limit"
        if not problem:
            try:
                referral = parse_referral(record, raw)
            except MalformedReferral as exc:
                problem = str(exc)
            except Exception as exc:  # odd JSON the parser missed: the class, not the sample
                problem = f"unreadable record ({type(exc).__name__})"
            else:
                try:
                    self._deadline(referral)
                    return referral
                except (OverflowError, ValueError) as exc:
                    stage, problem = "deadline", f"no deadline can be computed ({exc})"
        self._set_aside(lead_id, stage, problem, now, result, lead_id=lead_id, raw=raw)
        return None

    def _set_aside(
        self,
        key: str,
        stage: str,
        reason: str,
        now: datetime,
        result: CycleResult,
        *,
        lead_id: str | None = None,
        raw: str | None = None,
    ) -> None:
        """Quarantine one record: it is shown by `status`, operations hear of it once, and
        the rest of the cycle goes on."""
        key, reason = printable(key), printable(scrub(reason))
        result.quarantined += 1
        if stage in ("parse", "deadline", "store"):
            result.malformed += 1  # skipped by the poll
        log.error("referral.quarantined", lead=key, stage=stage, error=reason)
        self.store.quarantine(key, stage, reason, now, lead_id=lead_id, raw=raw)

    def _upsert(self, referrals: list[Referral], now: datetime, result: CycleResult) -> list[bool]:
        """Store referrals; one the state file cannot hold is set aside, not the whole poll."""

        def rejected(referral: Referral, exc: BaseException) -> None:
            reason = f"cannot be stored ({type(exc).__name__}: {str(exc)[:120]})"
            self._set_aside(referral.id, "store", reason, now, result, lead_id=referral.id)

        flags = self.store.upsert_each(referrals, self._deadline, now, rejected=rejected)
        back = [r.id for r in referrals if r.id in self._held_back]
        if back and self.store.release(back):  # changed, and now it goes through
            log.info("referral.released", leads=len(back))
        return flags

    def _store_fresh(self, referrals: list[Referral], now: datetime, result: CycleResult) -> int:
        """Store a page's new and changed leads, and decide at once for the new ones: a lead
        first seen now has no history, silence or notice yet, so the referral in hand is all
        the policy needs (no reading it back). Returns the number of rows to deliver."""
        flags = self._upsert(referrals, now, result)
        new = [
            Lead(ref, self._deadline(ref), first_seen=now, last_seen=now)
            for ref, is_new in zip(referrals, flags, strict=True)
            if is_new
        ]
        result.new += len(new)
        new.sort(key=lambda lead: lead.deadline)  # most urgent first, as _decide orders them
        return self.store.record(self._due(new, {}, now, result), now, new_leads=True)

    def _due(
        self, leads: list[Lead], history: Mapping[str, Any], now: datetime, result: CycleResult
    ) -> list[Any]:
        """policy.due_alerts, lead by lead when the batch fails: a lead the policy cannot
        decide for is set aside, and the others are decided as usual."""
        try:
            return policy.due_alerts(leads, dict(history), self.config, now)
        except Exception as exc:
            if len(leads) == 1:
                reason = f"no decision can be made ({type(exc).__name__}: {str(exc)[:120]})"
                lead_id = leads[0].id
                self._set_aside(lead_id, "decide", reason, now, result, lead_id=lead_id)
                return []
        alerts: list[Any] = []
        for lead in leads:
            alerts += self._due([lead], {lead.id: history.get(lead.id, [])}, now, result)
        return alerts

    def _decide(self, now: datetime, result: CycleResult) -> int:
        """Decide for the leads that may need an alert and write the decisions to the outbox.
        Returns the number of rows to deliver. Call inside the poll's transaction."""
        policy_config = self.config.policy
        candidates = self.store.policy_candidates(
            policy.tier_points(self.config, now),
            now,
            expired_notices=bool(policy_config.on_expired),
            resolved_notices=bool(policy_config.on_resolved),
        )
        queued = 0
        for start in range(0, len(candidates), POLICY_CHUNK):
            chunk = candidates[start : start + POLICY_CHUNK]
            leads = self.store.leads(for_policy=True, ids=chunk)
            alerts = self._due(leads, self.store.history(chunk), now, result)
            queued += self.store.record(alerts, now)
        return queued

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

    def _conclude_absent(
        self, now: datetime, result: CycleResult, seen: Collection[str] = ()
    ) -> None:
        """After a complete poll: ask about each watched lead that was not in it."""
        for lead_id in self.store.absent_since(now, seen=seen):
            try:
                record = self.api.get(lead_id)
            except ApiError as exc:
                if exc.code == "unreadableRecord":  # it answers, but with nothing usable
                    self._set_aside(lead_id, "parse", str(exc), now, result, lead_id=lead_id)
                    continue
                result.lookup_failures += 1
                result.failures.append(scrub(f"lookup of {lead_id}: {exc}"))
                log.error("lead.lookup_failed", lead=lead_id, error=scrub(str(exc)))
                continue
            if record is None:
                self.store.resolve(lead_id, "gone", now)
                result.resolved += 1
                log.info("lead.resolved", lead=lead_id, resolution="gone")
                continue
            try:
                referral = parse_referral(record)
            except Exception as exc:  # MalformedReferral, or odd JSON the parser missed
                reason = str(exc) if isinstance(exc, MalformedReferral) else type(exc).__name__
                self._set_aside(lead_id, "parse", reason, now, result, lead_id=lead_id)
                continue
            self._looked_up(referral, now, result)

    def _looked_up(self, referral: Referral, now: datetime, result: CycleResult) -> None:
        substatus = referral.substatus.lower()
        # Still new (Pending, or Received: opened but not answered): the 14 days still run.
        # "None" (or nothing) is no answer either: keep watching, and say so.
        if referral.is_pending or substatus in WAITING or substatus in ("", "none"):
            if substatus in ("", "none"):
                log.warning("lead.lookup_no_substatus", lead=referral.id, substatus=substatus)
            self.store.refresh(referral, self._deadline(referral))
            return
        # accepted, declined, won, lost or expired (any other substatus is kept as given)
        self.store.resolve(referral.id, substatus, now, referral.raw)
        result.resolved += 1
        log.info("lead.resolved", lead=referral.id, resolution=substatus)

    # --- leads named by webhook events ------------------------------------------------

    def handle_leads(self, lead_ids: Sequence[str]) -> CycleResult:
        """Webhook events named these leads: fetch each by id and handle it like a poll result
        for that one lead (store, decide, deliver), without polling the rest.

        Not a poll: it records no poll and concludes nothing about other leads. A lead that
        cannot be fetched now is left to the next poll (the safety net)."""
        began = time.monotonic()
        result = CycleResult(poll_ok=True)
        now = self.clock()
        records = self._fetch_each(lead_ids, result)
        with self.store.transaction():
            handled = [lead_id for lead_id, _ in records]
            for lead_id, record in records:
                self._handle_one(lead_id, record, now, result)
            self.store.mark_expired(now)
            result.queued += self._decide_for(handled, now)
            self.store.webhook_events_handled(handled, now)
            failed = [lead_id for lead_id in lead_ids if lead_id not in set(handled)]
            self.store.webhook_events_handled(failed, now, error=result.error or "not fetched")
        self._deliver(result)
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

    def _fetch_each(
        self, lead_ids: Sequence[str], result: CycleResult
    ) -> list[tuple[str, dict[str, Any] | None]]:
        """(id, the record or None for 404) of each lead Partner Center answered for."""
        records: list[tuple[str, dict[str, Any] | None]] = []
        for lead_id in lead_ids:
            try:
                records.append((lead_id, self.api.get(lead_id)))
            except (ApiError, AuthError) as exc:
                result.lookup_failures += 1
                result.error = str(exc)
                result.failures.append(f"lookup of {lead_id}: {exc}")
                log.error("webhook.lookup_failed", lead=lead_id, error=str(exc))
        result.fetched = sum(record is not None for _, record in records)
        return records

    def _handle_one(
        self, lead_id: str, record: dict[str, Any] | None, now: datetime, result: CycleResult
    ) -> None:
        known = self.store.known(lead_id)
        if record is None:
            if known:
                self.store.resolve(lead_id, "gone", now)
                result.resolved += 1
                log.info("lead.resolved", lead=lead_id, resolution="gone")
            return
        referral = self._parse(record, None, result)
        if referral is None:
            return
        if self._watched(record):
            flags = self.store.upsert_each([referral], self._deadline, now)
            result.new += sum(flags)
            return
        if not known:
            return  # a referral the poll's filter leaves out (outgoing, ...): not ours to watch
        substatus = referral.substatus.lower()
        if referral.is_pending or substatus in WAITING or not substatus:
            self.store.refresh(referral, self._deadline(referral))  # as a by-id lookup does
            return
        self.store.resolve(lead_id, substatus, now, referral.raw)
        result.resolved += 1
        log.info("lead.resolved", lead=lead_id, resolution=substatus)

    def _watched(self, record: dict[str, Any]) -> bool:
        """Whether the poll's filter (partner_center.filter) would return this record."""
        if self._filter is None:
            from referral_watch.partner_center.odata import FilterError, compile_filter

            try:
                self._filter = compile_filter(self.config.partner_center.filter)
            except FilterError:
                log.warning("webhook.filter_unsupported", fallback=DEFAULT_FILTER)
                self._filter = compile_filter(DEFAULT_FILTER)
        return self._filter(record)

    def _decide_for(self, lead_ids: Sequence[str], now: datetime) -> int:
        """Decide for these leads only and write the decisions to the outbox."""
        queued = 0
        for start in range(0, len(lead_ids), POLICY_CHUNK):
            chunk = list(lead_ids[start : start + POLICY_CHUNK])
            leads = self.store.leads(for_policy=True, ids=chunk)
            alerts = policy.due_alerts(leads, self.store.history(chunk), self.config, now)
            queued += self.store.record(alerts, now)
        return queued

    # --- operations alerts --------------------------------------------------------------

    def _tell_operations(self, result: CycleResult, now: datetime) -> list[int]:
        """Queue what operations should hear after this cycle; returns the outbox row ids."""
        state = ops.OpsState(
            alerting_since=from_ts(self.store.get_meta("ops.alerting_since")),
            last_alert=from_ts(self.store.get_meta("ops.last_alert")),
        )
        failures = self.store.failures_in_a_row()
        event, new_state = ops.ops_event(
            result.cycle_ok, failures, state, self.config.operations, now
        )
        told = self._tell_quarantined(now)
        if event is None:
            return told
        reason = result.error or ""
        log.warning("ops.event", ops_event=event, failures=failures, reason=reason)
        told += self._enqueue_ops(
            event, reason, now, failures=failures, since=state.alerting_since or now
        )
        with self.store.transaction():
            self.store.set_meta(
                "ops.alerting_since",
                ts(new_state.alerting_since) if new_state.alerting_since else None,
            )
            self.store.set_meta(
                "ops.last_alert", ts(new_state.last_alert) if new_state.last_alert else None
            )
        return told

    def _tell_quarantined(self, now: datetime) -> list[int]:
        """One message naming the records set aside since operations last heard: each
        record is told once, however many cycles it stays bad."""
        items = self.store.quarantined(unnotified=True)
        if not items:
            return []
        lines = [f"{q.key} ({q.stage}): {q.reason}" for q in items[:QUARANTINE_NAMED]]
        if len(items) > QUARANTINE_NAMED:
            lines.append(f"... and {len(items) - QUARANTINE_NAMED} more (see `status`)")
        log.warning("ops.event", ops_event=ops.QUARANTINED, records=len(items))
        told = self._enqueue_ops(ops.QUARANTINED, "\n".join(lines), now, failures=len(items))
        with self.store.transaction():
            self.store.mark_quarantine_notified(q.key for q in items)
        return told

    # --- delivery -----------------------------------------------------------------------

    def deliver(self, row_ids: Collection[int]) -> CycleResult:
        """Deliver these outbox rows now (a report the daemon just queued), settled like every
        message: a refused one stays in the outbox for the next cycle, a dropped one tells ops."""
        result = CycleResult()
        self._deliver(result, only=set(row_ids))
        return result

    def _deliver(self, result: CycleResult, only: Collection[int] | None = None) -> None:
        """Send what is due from the outbox (only the rows `only` names, when given)."""
        now = self.clock()
        rows = self.store.pending()
        if only is not None:
            rows = [row for row in rows if row.id in only]
        if not rows:
            if only is None:
                self._note_stuck(None)
            return
        if only is None:
            batches = policy.delivery_batches(rows, self._delivery_leads(rows), self.config, now)
            result.held = len(rows) - sum(len(b.row_ids) for b in batches)
        else:  # news for operations: never held nor batched, and independent of lead logic
            batches = [Batch(r.channel, r.kind, r.tier, (r.id,), ()) for r in rows]
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
            self._send_all(jobs, result)
        if only is None and not self.stop.is_set():
            stuck = [by_id[i].created for i in result.failed_rows if i in by_id]
            self._note_stuck(min(stuck) if stuck else None)

    def _note_stuck(self, since: datetime | None) -> None:
        """Remember since when a due delivery has been failing (for the health verdict)."""
        value = ts(since) if since else None
        if self.store.get_meta(STUCK_META) != value:
            with self.store.transaction():
                self.store.set_meta(STUCK_META, value)

    def _made(
        self, batch: Batch, rows: Mapping[int, PendingRow], now: datetime, result: CycleResult
    ) -> tuple[Batch, Message] | None:
        """The batch and its message; a lead whose message cannot be made is set aside and
        a digest goes out without it."""
        try:
            return batch, self._message(batch, now)
        except ReferralWatchError as exc:
            self._settle(batch, _Failure(str(exc)), result)
            return None
        except Exception as exc:
            error = f"{type(exc).__name__}: {str(exc)[:120]}"
        bad = [lead_id for lead_id in batch.lead_ids if not self._renders(batch, lead_id, now)]
        if not batch.digest or not bad:
            bad = list(batch.lead_ids)
        bad_rows = [i for i in batch.row_ids if rows[i].lead_id in bad] if batch.digest else []
        self._set_aside_rows(batch, bad, bad_rows or list(batch.row_ids), error, now, result)
        rest = [i for i in batch.row_ids if i not in bad_rows]
        if not bad_rows or not rest:
            return None
        lead_ids = tuple(i for i in batch.lead_ids if i not in bad)
        return self._made(replace(batch, row_ids=tuple(rest), lead_ids=lead_ids), rows, now, result)

    def _renders(self, batch: Batch, lead_id: str, now: datetime) -> bool:
        alone = replace(batch, lead_ids=(lead_id,), digest=False, more=0)
        try:
            self._message(alone, now)
        except ReferralWatchError:
            return True  # not this lead's text
        except Exception:
            return False
        return True

    def _set_aside_rows(
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
                self._set_aside(lead_id, stage, reason, now, result, lead_id=lead_id)
            self.store.set_aside(row_ids, scrub(reason))

    def _delivery_leads(self, rows: Sequence[PendingRow]) -> Mapping[str, Lead]:
        """What delivery_batches needs to order and address the rows: outlines (no JSON read),
        and whole leads only where the recipients come from the lead (to_assignees)."""
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
            outlines.whole[lead.id] = lead
        return outlines

    def _send_all(self, jobs: dict[str, list[tuple[Batch, Message]]], result: CycleResult) -> None:
        """Send each channel's messages in order, channels side by side (at most
        PARALLEL_CHANNELS at once). A channel's next message waits until this thread has
        recorded the previous one, so a crash repeats at most one message per channel."""
        outcomes: _Outcomes = queue.Queue()
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
        outcomes: _Outcomes,
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
                    if isinstance(item, _Claim):
                        self._claim(item)
                        continue
                    batch, outcome, recorded = item
                    unsettled.append((batch, outcome))
                    try:
                        self._settle(batch, outcome, result)
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

    def _claim(self, claim: _Claim) -> None:
        """Take the message's outbox rows for this process (on the thread owning the store)."""
        try:
            claim.granted = self.store.claim(claim.batch.row_ids, self.clock(), self._lease)
            claim.at = time.monotonic()
        finally:
            claim.done.set()

    def _channel_worker(
        self,
        jobs: list[tuple[Batch, Message]],
        outcomes: _Outcomes,
        abort: threading.Event,
    ) -> None:
        try:
            for index, (batch, message) in enumerate(jobs):
                if self.stop.is_set() or abort.is_set():
                    log.info("delivery.stopped", channel=batch.channel, left=len(jobs) - index)
                    return
                claim = _Claim(batch)
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
                    outcome = _Failure(error, crashed=True)
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
        message claimed by a replica that died is sent by the next one at its next cycle)."""
        return max(timedelta(seconds=5), min(CLAIM_LEASE, self.config.schedule.interval))

    def _still_ours(self, claim: _Claim) -> bool:
        """Right before a send: this replica may still send, and its claim is young enough
        that no other replica can have taken it over (a process paused between claiming and
        sending finds its claim too old when it wakes)."""
        young = time.monotonic() - claim.at < self._lease.total_seconds() / 2
        return young and not self.stop.is_set() and self.may_send()

    def _settle(self, batch: Batch, outcome: Any, result: CycleResult) -> None:
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
            self._set_aside_rows(
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
        self._enqueue_ops(ops.DROPPED, reason, now, skip=batch.channel)

    def _enqueue_ops(
        self,
        event: str,
        reason: str,
        now: datetime,
        *,
        skip: str | None = None,
        failures: int = 0,
        since: datetime | None = None,
    ) -> list[int]:
        """Put a message about referral-watch itself in the outbox for each operations
        channel (but `skip`, the channel that just failed); returns the row ids."""
        from referral_watch.render import (
            messages as render,  # Jinja2 and Babel: only when there is news
        )

        reason = scrub(reason)
        ids = []
        for channel in self.config.operations.notify:
            if channel == skip:
                continue
            style = render.style_for(self.config, channel)
            message = render.render_ops(event, reason, now, style, failures=failures, since=since)
            ids.append(self.store.enqueue_message("ops", channel, message.title, message.body, now))
        return ids

    def _message(self, batch: Batch, now: datetime) -> Message:
        from referral_watch.render import (
            messages as render,  # Jinja2 and Babel: only when there is news
        )

        style = render.style_for(self.config, batch.channel)
        if not batch.lead_ids:
            title, body = self.store.message_text(batch.row_ids[0])
            return Message(title, body, kind=batch.kind)
        tier = self.config.policy.tier(batch.tier) if batch.tier else None
        found = {
            lead.id: lead
            for lead in self.store.leads(include_resolved=True, ids=list(batch.lead_ids))
        }
        known = [found[i] for i in batch.lead_ids if i in found]
        if not known:
            raise ReferralWatchError("the lead is no longer in the state file")
        if batch.digest:
            message = render.render_digest(known, batch.kind, tier, batch.more, now, style)
        else:
            message = render.render_alert(known[0], batch.kind, tier, now, style)
            known = known[:1]
        about = tuple((lead, render.lead_link(style, lead.id)) for lead in known)
        return replace(message, kind=batch.kind, tier=batch.tier, about=about)

    def _heartbeat(self, poll_ok: bool) -> None:
        """Ping the dead-man's switch: `url` after a good poll, `fail_url` after a failed one.
        The URLs hold the check's key, so only the outcome is logged."""
        beat = self.config.heartbeat
        url = None if beat is None else beat.url if poll_ok else beat.fail_url
        if beat is None or url is None:
            return
        import httpx

        ping = "success" if poll_ok else "fail"
        try:
            response = httpx.get(url, timeout=beat.timeout.total_seconds())
        except httpx.HTTPError as exc:
            log.warning("heartbeat.failed", ping=ping, error=type(exc).__name__)
            return
        if response.is_error:
            log.warning("heartbeat.refused", ping=ping, status=response.status_code)


_Outcomes = queue.Queue["_Claim | tuple[Batch, Any, threading.Event] | None"]


@dataclass
class _Claim:
    """A channel worker's request to claim a message's rows before sending it."""

    batch: Batch
    done: threading.Event = field(default_factory=threading.Event)
    granted: bool = False
    at: float = 0.0  # time.monotonic() of the claim


class NoPolls:
    """The Api of a Cycle that only decides and delivers (``Cycle.notify_now``)."""

    def pages(self) -> list[Any]:
        return []

    def get(self, referral_id: str) -> None:
        return None


@dataclass(frozen=True)
class _Failure:
    """A delivery outcome for a message that could not be sent at all."""

    error: str
    ok: bool = False
    crashed: bool = False  # the sender raised: the message, not the channel, is the problem


@dataclass
class _Seen:
    """What this poll has received so far: record texts (by hash) and lead ids."""

    texts: dict[int, str] = field(default_factory=dict)
    ids: set[str] = field(default_factory=set)

    def note(self, fingerprint: int, lead_id: str) -> None:
        self.texts[fingerprint] = lead_id
        self.ids.add(lead_id)


_UNDECODED = object()


def _record_and_text(page: Any, texts: list[str] | None, index: int) -> tuple[Any, str | None]:
    """(the record, or _UNDECODED when only its text is at hand; its JSON text, or None when
    it has none). Pages from PartnerCenter carry texts; other sources are serialized
    canonically (the same text parse_referral would store)."""
    if texts is not None:
        return _UNDECODED, texts[index]
    record = page.records[index]
    try:
        return record, json.dumps(record, separators=(",", ":"), sort_keys=True)
    except (ValueError, TypeError, RecursionError):
        return record, None


def _decode(page: Any, index: int) -> tuple[Any, str]:
    """(the record, "") or (None, why it cannot be decoded)."""
    try:
        return page.record(index), ""
    except RecursionError:
        return None, "unreadable record (JSON nested too deeply)"
    except ValueError as exc:
        return None, f"unreadable record (not JSON: {str(exc)[:80]})"


def _record_key(raw: str) -> str:
    """The quarantine key of a record without a usable id: the same record, the same key."""
    return "record:" + hashlib.sha256(raw.encode("utf-8", "replace")).hexdigest()[:16]


def _unparsable(record: Any, raw: str) -> str:
    try:
        parse_referral(record, raw)
    except MalformedReferral as exc:
        return str(exc)
    except Exception as exc:
        return f"unreadable record ({type(exc).__name__})"
    return "record has no id"


def _lead_id(record: Any) -> str | None:
    if isinstance(record, dict):
        lead_id = record.get("id")
        if lead_id is None:  # any case: "ID", "Id"
            lead_id = next((v for k, v in record.items() if str(k).lower() == "id"), None)
    else:
        lead_id = None
    return lead_id.strip() if isinstance(lead_id, str) and lead_id.strip() else None


def _id_in_text(raw: str) -> str | None:
    """The id of a record too deep (or too odd) to decode, read from its text."""
    lead_id = jsontext.member(raw, "id")
    return lead_id.strip() if isinstance(lead_id, str) and lead_id.strip() else None


class _Prefetch:
    """The API's pages, with the next ones already being fetched on another thread while the
    caller stores this one: a poll then takes about as long as the API itself. Fetching starts
    on entering; leaving stops it after the request in flight.

    An error on any page is raised in the caller's thread, after the pages before it.
    """

    def __init__(self, pages: Callable[[], Iterable[Any]], depth: int = PREFETCH_PAGES) -> None:
        self._pages = pages
        self._ahead: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
        self._halt = threading.Event()

    def __enter__(self) -> Iterator[Any]:
        threading.Thread(target=self._fetch, name="poll-prefetch", daemon=True).start()
        return self._received()

    def __exit__(self, *exc: object) -> None:
        self._halt.set()

    def _received(self) -> Iterator[Any]:
        while True:
            kind, item = self._ahead.get()
            if kind == "page":
                yield item
            elif kind == "error":
                raise item
            else:
                return

    def _fetch(self) -> None:
        try:
            for page in self._pages():
                if not self._put("page", page):
                    return
            self._put("end", None)
        except BaseException as exc:  # handed to the caller, raised in its thread
            self._put("error", exc)

    def _put(self, kind: str, item: Any) -> bool:
        while not self._halt.is_set():
            try:
                self._ahead.put((kind, item), timeout=0.05)
                return True
            except queue.Full:
                continue
        return False
