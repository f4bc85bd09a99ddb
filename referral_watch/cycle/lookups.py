"""By-id lookups: a watched lead the poll did not return, and the leads webhook events named.
Both settle a record the same way (``settle``): still awaiting an answer -> kept current and
watched; answered, expired, ... -> resolved; 404 -> gone."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from datetime import datetime
from typing import Any

import structlog

from referral_watch.config import Config
from referral_watch.cycle.ports import Api
from referral_watch.cycle.result import CycleResult, set_aside
from referral_watch.errors import ApiError, AuthError
from referral_watch.model import MalformedReferral, Referral, parse_referral
from referral_watch.redact import scrub
from referral_watch.state.store import Store

log = structlog.get_logger(__name__)

# What a webhook's lead is checked against when partner_center.filter is beyond the subset
# the evaluator understands (referral_watch.partner_center.odata).
DEFAULT_FILTER = "direction eq 'Incoming' and substatus eq 'Pending'"

Parse = Callable[[Any, "str | None", CycleResult], "Referral | None"]


class Lookups:
    def __init__(
        self,
        config: Config,
        store: Store,
        api: Api,
        parse: Parse,
        deadline: Callable[[Referral], datetime],
    ) -> None:
        self.config = config
        self.store = store
        self.api = api
        self.parse = parse  # a record from elsewhere than a page: parsed, or set aside
        self.deadline = deadline
        self._filter: Callable[[dict[str, Any]], bool] | None = None  # for webhook leads

    def settle(self, referral: Referral, now: datetime, result: CycleResult) -> None:
        """A known lead's record as Partner Center has it now: still awaiting an answer ->
        keep its data current (the 14 days still run); else resolve it as its substatus says
        (accepted, declined, won, lost or expired; any other substatus is kept as given)."""
        substatus = referral.substatus.lower()
        if referral.awaiting_answer:
            if substatus in ("", "none"):
                log.warning("lead.lookup_no_substatus", lead=referral.id, substatus=substatus)
            self.store.refresh(referral, self.deadline(referral))
            return
        self.store.resolve(referral.id, substatus, now, referral.raw)
        result.resolved += 1
        log.info("lead.resolved", lead=referral.id, resolution=substatus)

    def gone(self, lead_id: str, now: datetime, result: CycleResult) -> None:
        """Partner Center no longer knows the lead (404)."""
        self.store.resolve(lead_id, "gone", now)
        result.resolved += 1
        log.info("lead.resolved", lead=lead_id, resolution="gone")

    # --- after a complete poll ---------------------------------------------------------

    def conclude_absent(
        self,
        now: datetime,
        result: CycleResult,
        seen: Collection[str] = (),
        among: Sequence[str] | None = None,
    ) -> None:
        """After a complete poll: ask about each watched lead that was not in it (``among``:
        the leads watched when it began, see Store.absent_since)."""
        for lead_id in self.store.absent_since(now, seen=seen, among=among):
            try:
                record = self.api.get(lead_id)
            except ApiError as exc:
                if exc.code == "unreadableRecord":  # it answers, but with nothing usable
                    set_aside(self.store, lead_id, "parse", str(exc), now, result, lead_id=lead_id)
                    continue
                result.lookup_failures += 1
                result.failures.append(scrub(f"lookup of {lead_id}: {exc}"))
                log.error("lead.lookup_failed", lead=lead_id, error=scrub(str(exc)))
                continue
            if record is None:
                self.gone(lead_id, now, result)
                continue
            try:
                referral = parse_referral(record)
            except Exception as exc:  # MalformedReferral, or odd JSON the parser missed
                reason = str(exc) if isinstance(exc, MalformedReferral) else type(exc).__name__
                set_aside(self.store, lead_id, "parse", reason, now, result, lead_id=lead_id)
                continue
            self.settle(referral, now, result)

    # --- leads named by webhook events --------------------------------------------------

    def fetch_each(
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

    def handle_one(
        self, lead_id: str, record: dict[str, Any] | None, now: datetime, result: CycleResult
    ) -> None:
        """A webhook's lead, handled like a poll result for that one lead."""
        known = self.store.known(lead_id)
        if record is None:
            if known:
                self.gone(lead_id, now, result)
            return
        referral = self.parse(record, None, result)
        if referral is None:
            return
        if self._watched(record):
            flags = self.store.upsert_each([referral], self.deadline, now)
            result.new += sum(flags)
            return
        if not known:
            return  # a referral the poll's filter leaves out (outgoing, ...): not ours to watch
        self.settle(referral, now, result)  # as a by-id lookup after a poll does

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
