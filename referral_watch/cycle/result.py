"""What one cycle did (``CycleResult``), and setting a record aside on the way: every stage
counts into the one result, and quarantines a record the same way."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

import structlog

from referral_watch.redact import scrub
from referral_watch.state.db import printable
from referral_watch.state.quarantine import Quarantine

log = structlog.get_logger(__name__)

# What a stage does, for "internal error while ..." messages.
STAGE_WORDS = {
    "poll": "polling",
    "deliver": "delivering",
    "ops": "telling operations",
    "prune": "pruning old leads",
}


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


def set_aside(
    store: Quarantine,
    key: str,
    stage: str,
    reason: str,
    now: datetime,
    result: CycleResult,
    *,
    lead_id: str | None = None,
    raw: str | None = None,
) -> None:
    """Quarantine one record: it is shown by `status`, operations hear of it once, and the
    rest of the cycle goes on."""
    key, reason = printable(key), printable(scrub(reason))
    result.quarantined += 1
    if stage in ("parse", "deadline", "store"):
        result.malformed += 1  # skipped by the poll
    log.error("referral.quarantined", lead=key, stage=stage, error=reason)
    store.quarantine(key, stage, reason, now, lead_id=lead_id, raw=raw)


@dataclass(frozen=True)
class Aside:
    """A record to set aside, found while reading a page: set aside (``apply``) with the
    page's writes, by whichever thread does them (cycle.writer)."""

    key: str
    stage: str
    reason: str
    lead_id: str | None = None
    raw: str | None = None

    def apply(self, store: Quarantine, now: datetime, result: CycleResult) -> None:
        set_aside(
            store,
            self.key,
            self.stage,
            self.reason,
            now,
            result,
            lead_id=self.lead_id,
            raw=self.raw,
        )


def crash_text(stage: str, exc: BaseException) -> str:
    detail = scrub(str(exc))[:200]
    what = STAGE_WORDS.get(stage, stage)
    return f"internal error while {what}: {type(exc).__name__}" + (f": {detail}" if detail else "")
