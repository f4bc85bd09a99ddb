"""Intake: a poll's pages -> records parsed, set aside (quarantined) or stored, in the poll's
one transaction with its decisions (a failed poll changes no lead)."""

from __future__ import annotations

import json
from datetime import datetime
from functools import partial
from typing import Any

import structlog

from referral_watch.config import Config
from referral_watch.cycle.decide import Decide
from referral_watch.cycle.lookups import Lookups
from referral_watch.cycle.ports import Api, Clock
from referral_watch.cycle.prefetch import Prefetch
from referral_watch.cycle.records import (
    UNDECODED,
    Seen,
    canonical_bytes,
    decode,
    id_in_text,
    lead_id_of,
    record_key,
    text_of,
    unparsable,
)
from referral_watch.cycle.result import Aside, CycleResult, crash_text, set_aside
from referral_watch.cycle.writer import Writer
from referral_watch.errors import ApiError, AuthError, StateError
from referral_watch.model import (
    Lead,
    MalformedReferral,
    Referral,
    deadline_of,
    parse_referral,
    record_digest,
    usable_id,
)
from referral_watch.redact import scrub
from referral_watch.state.journal import PollRecord
from referral_watch.state.store import Store

log = structlog.get_logger(__name__)

# A record's JSON text longer than this is set aside, not stored (characters).
RECORD_LIMIT = 256 * 1024
# The response window that computed the stored deadlines; another one means re-reading all.
WINDOW_META = "policy.response_window"


class Intake:
    def __init__(
        self, config: Config, store: Store, api: Api, clock: Clock, decide: Decide
    ) -> None:
        self.config = config
        self.store = store
        self.api = api
        self.clock = clock
        self.decide = decide
        self.lookups = Lookups(config, store, api, self.parse, self.deadline)
        self._held_back: set[str] = set()  # quarantined keys at the start of this poll

    def deadline(self, referral: Referral) -> datetime:
        return deadline_of(referral, self.config.policy.response_window)

    def poll(self, now: datetime, result: CycleResult) -> None:
        """Poll, store and decide in one transaction: a failed poll changes no lead."""
        try:
            with self.store.transaction(), Prefetch(self.api.pages) as pages:
                # Fetching has begun: reading the stored digests overlaps the first request.
                self._held_back = self.store.quarantined_keys()
                stored, count = self.store.watched_digests()
                if not self._stored_deadlines_current():
                    stored = set()  # re-read every record: the deadlines need computing again
                seen = Seen(stored, count, self.store.digests)
                with Writer() as writer:  # this thread reads a page while it stores the last
                    for page in pages:
                        fresh, again, asides = self._changed(page, result, now, seen)
                        if fresh or again or asides:  # (a steady page seldom has any)
                            pages.engage()  # the next pages are read meanwhile
                            seen.before_writing()
                            writer.submit(partial(self._store, fresh, again, asides, now, result))
                self.lookups.conclude_absent(now, result, among=seen.unmet())
                # What the poll kept of every lead (a first cycle's tens of thousands of ids and
                # digests) is done with: its memory serves the decisions below.
                del stored, seen
                self.store.mark_expired(now)
                result.queued += self.decide.candidates(now, result)
                result.poll_ok = True
                self.store.record_poll(self._poll_record(now, result))
        except (ApiError, AuthError) as exc:
            result.needs_login = isinstance(exc, AuthError) and exc.needs_login
            self._poll_failed(now, result, scrub(str(exc)))
        except StateError:
            raise
        except Exception as exc:  # a bug on the way: rolled back, and the cycle has failed
            error = crash_text("poll", exc)
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
        seen: Seen,
    ) -> tuple[list[Referral], list[Referral], list[Aside]]:
        """The records of one page that need storing: (first seen in this poll, repeated, to
        set aside). Writes nothing: the page is stored by the poll's writer (``_store``).

        A watched lead whose record has the digest of the stored one (the same bytes) is only
        marked seen: no decoding, no parsing, no writing. That is nearly every lead in a steady
        cycle. A record that cannot be watched is set aside (quarantined) and the others go on.
        """
        served = hasattr(page, "digests")  # a PartnerCenter page: its items' bytes as served
        count = len(page) if served else len(page.records)
        result.fetched += count
        fresh: list[Referral] = []
        again: list[Referral] = []
        asides: list[Aside] = []
        # The page's digests at once (cheaper); a record page's bytes are its canonical JSON.
        digests: list[str] = page.digests if served else []
        if served and seen.all_unchanged(digests):
            return [], [], []  # (a steady poll's pages, nearly all)
        records: list[Any] = [] if served else page.records
        unchanged = seen.unchanged  # the same lead's same bytes: only marked met
        for index in range(count):
            record: Any = UNDECODED
            data: bytes | memoryview | None = None
            if served:
                digest = digests[index]
            else:
                record = records[index]
                data = canonical_bytes(record)
                if data is None:
                    reason = "unreadable record (cannot be serialized)"
                    asides.append(Aside(record_key(repr(record)[:10_000]), "parse", reason))
                    continue
                digest = record_digest(data)
            if unchanged(digest):
                continue
            if (earlier := seen.met(digest)) is not None:
                log.info("poll.duplicate", lead=earlier)  # paging shifted
                continue
            # (A stored record met after another copy of the lead rewrote it is stored again:
            # the last copy in the poll wins, whatever it is.)
            if data is None:
                data = page.raw(index)
            found, repeated = self._read(page, index, record, data, digest, seen)
            if isinstance(found, Aside):
                asides.append(found)
            else:
                (again if repeated else fresh).append(found)
        return fresh, again, asides

    def _store(
        self,
        fresh: list[Referral],
        again: list[Referral],
        asides: list[Aside],
        now: datetime,
        result: CycleResult,
    ) -> None:
        """A page's writes: its records set aside, then its leads stored and decided."""
        for aside in asides:
            aside.apply(self.store, now, result)
        if fresh:
            result.queued += self._store_fresh(fresh, now, result)
        if again:
            self._upsert(again, now, result)

    def _read(
        self,
        page: Any,
        index: int,
        record: Any,
        data: bytes | memoryview,
        digest: str,
        seen: Seen,
    ) -> tuple[Referral | Aside, bool]:
        """A new or changed record of a page: (decoded and parsed, or what to set aside;
        whether its lead came earlier in this poll)."""
        raw, problem = text_of(page, index, data)
        if record is UNDECODED and not problem:
            record, problem = decode(page, index)
        lead_id = lead_id_of(record) if record is not None else id_in_text(raw)
        if lead_id is None:
            reason = problem or unparsable(record, raw)
            key = record_key(raw) if raw else "record:" + digest[:16]
            return Aside(key, "parse", reason, raw=raw or None), False
        repeated = seen.repeated(lead_id)
        seen.note(digest, lead_id)  # seen, even when set aside: not "gone"
        return self.read(record, raw, lead_id, problem), repeated

    def parse(self, record: Any, raw: str | None, result: CycleResult) -> Referral | None:
        """One record from elsewhere than a poll's page (a webhook's lead): the referral, or
        None when it is set aside like a poll's record would be."""
        now = self.clock()
        if raw is None:
            try:
                raw = json.dumps(record, separators=(",", ":"), sort_keys=True)
            except (ValueError, TypeError, RecursionError):
                reason = "unreadable record (cannot be serialized)"
                set_aside(
                    self.store, record_key(repr(record)[:10_000]), "parse", reason, now, result
                )
                return None
        lead_id = lead_id_of(record)
        if lead_id is None:
            reason = unparsable(record, raw)
            set_aside(self.store, record_key(raw), "parse", reason, now, result, raw=raw)
            return None
        return self.admit(record, raw, lead_id, "", now, result)

    def admit(
        self, record: Any, raw: str, lead_id: str, problem: str, now: datetime, result: CycleResult
    ) -> Referral | None:
        """The referral, when the record can be watched; else it is set aside (with why)."""
        found = self.read(record, raw, lead_id, problem)
        if isinstance(found, Aside):
            found.apply(self.store, now, result)
            return None
        return found

    def read(self, record: Any, raw: str, lead_id: str, problem: str) -> Referral | Aside:
        """The referral, when the record can be watched; else what to set aside, and why."""
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
                    self.deadline(referral)
                    return referral
                except (OverflowError, ValueError) as exc:
                    stage, problem = "deadline", f"no deadline can be computed ({exc})"
        return Aside(lead_id, stage, problem, lead_id=lead_id, raw=raw)

    def _upsert(self, referrals: list[Referral], now: datetime, result: CycleResult) -> list[bool]:
        """Store referrals; one the state file cannot hold is set aside, not the whole poll."""

        def rejected(referral: Referral, exc: BaseException) -> None:
            reason = f"cannot be stored ({type(exc).__name__}: {str(exc)[:120]})"
            set_aside(self.store, referral.id, "store", reason, now, result, lead_id=referral.id)

        flags = self.store.upsert_each(referrals, self.deadline, now, rejected=rejected)
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
            Lead(ref, self.deadline(ref), first_seen=now, last_seen=now)
            for ref, is_new in zip(referrals, flags, strict=True)
            if is_new
        ]
        result.new += len(new)
        return self.decide.new_leads(new, now, result)

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
