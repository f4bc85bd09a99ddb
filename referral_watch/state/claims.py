"""Claims (SPEC 17): the current claim on each lead, and every claim, take-over, lapse and
unclaim in the audit (who, when, via).

A claim row stays after it lapses (the team's "lapsed" notice is worded from it) until the lead
is claimed again, unclaimed or pruned; ``lapsed_at`` says the lapse was recorded. The writes
run in the state's write transaction (SQLite's BEGIN IMMEDIATE, PostgreSQL's advisory lock), so
the holder read before a claim is still the holder when it is written: two people claiming at
once are served one after the other, and the second one hears who has it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from referral_watch.model import CLAIMED, TIER, Claim
from referral_watch.state.db import Database, chunks, ts

# The claim columns, in Claim's order.
_COLUMNS = "lead_id, email, name, at, lapses_at, via, note"

# Audit actions (AuditEntry.action) and their results.
CLAIM, TAKE_OVER, UNCLAIM, LAPSE = "claim", "take-over", "unclaim", "lapse"
RESULTS = {CLAIM: "claimed", TAKE_OVER: "taken over", UNCLAIM: "unclaimed", LAPSE: "lapsed"}


@dataclass(frozen=True)
class Written:
    """What a claim write did: whether it is now the person's, and the claim it met."""

    won: bool
    previous: Claim | None  # the claim in force before (replaced, or the one that refused us)


def claim_from(row: Any, prefix: str = "") -> Claim | None:
    """A Claim from a row holding the claim columns (``prefix``ed), or None when it has none."""
    names = [f"{prefix}{name.strip()}" for name in _COLUMNS.split(",")]
    return claim_of_values(tuple(row[name] for name in names))


def claim_of_values(values: Sequence[Any]) -> Claim | None:
    """A Claim from the claim columns' values in _COLUMNS order; None when they are NULL (a
    LEFT JOIN that found no claim)."""
    lead_id, email, name, at, lapses_at, via, note = values
    if email is None:
        return None
    return Claim(
        lead_id=lead_id,
        email=email,
        name=name or "",
        at=datetime.fromisoformat(at),
        lapses_at=datetime.fromisoformat(lapses_at),
        via=via or "",
        note=note or "",
    )


# For the leads' queries: the claim's columns as c_<column> (LEFT JOIN claims c).
CLAIM_COLUMNS = ", ".join(f"c.{name.strip()} AS c_{name.strip()}" for name in _COLUMNS.split(","))


class Claims(Database):
    def claim_of(self, lead_id: str) -> Claim | None:
        """The lead's claim row (lapsed or not; ``Claim.holds`` says which)."""
        row = self.db.execute(
            f"SELECT {_COLUMNS} FROM claims WHERE lead_id = ?", (lead_id,)
        ).fetchone()
        return None if row is None else claim_from(row)

    def put_claim(self, claim: Claim, now: datetime, *, take_over: bool = False) -> Written:
        """Make ``claim`` the lead's claim unless another person's claim holds at ``now`` and
        ``take_over`` is not asked for; the claim (or take-over) goes to the audit."""
        with self.transaction():
            previous = self.claim_of(claim.lead_id)
            holding = previous if previous is not None and previous.holds(now) else None
            other = holding is not None and holding.email.lower() != claim.email.lower()
            if other and not take_over:
                return Written(False, holding)
            self.db.execute(
                f"""INSERT INTO claims ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)
                    ON CONFLICT (lead_id) DO UPDATE SET email = excluded.email,
                        name = excluded.name, at = excluded.at, lapses_at = excluded.lapses_at,
                        via = excluded.via, note = excluded.note, lapsed_at = NULL""",
                (
                    claim.lead_id,
                    claim.email,
                    claim.name,
                    ts(claim.at),
                    ts(claim.lapses_at),
                    claim.via,
                    claim.note,
                ),
            )
            detail = f"from {holding.name or holding.email}" if other and holding else ""
            action = TAKE_OVER if other else CLAIM
            self._audit_claim(claim, action, claim.email, claim.name, claim.via, now, detail)
        return Written(True, holding)

    def drop_claim(
        self, lead_id: str, who: str, name: str, via: str, now: datetime, owner_channel: str | None
    ) -> Claim | None:
        """Unclaim: the claim row goes (it is in the audit), and so do the owner's messages and
        the "taken by" notice still waiting in the outbox. Returns the claim that held, if any."""
        with self.transaction():
            previous = self.claim_of(lead_id)
            if previous is None:
                return None
            self.db.execute("DELETE FROM claims WHERE lead_id = ?", (lead_id,))
            self._drop_pending(lead_id, owner_channel, notices=True)
            held = previous.holds(now)
            detail = "" if held else "the claim had lapsed already"
            self._audit_claim(previous, UNCLAIM, who, name, via, now, detail)
        return previous if held else None

    def lapse_claims(
        self, lead_ids: Sequence[str], now: datetime, owner_channel: str | None
    ) -> list[Claim]:
        """Record the lapse of the claims on these leads that ran out by ``now`` unanswered
        (call inside the transaction that wrote the lapse notices): an audit row each, and the
        owner's messages still waiting are superseded (escalation goes to the team again)."""
        lapsed: list[Claim] = []
        for chunk in chunks(list(lead_ids)):
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(
                f"""SELECT {", ".join("c." + c.strip() for c in _COLUMNS.split(","))}
                    FROM claims c JOIN leads l ON l.id = c.lead_id
                    WHERE c.lead_id IN ({marks}) AND c.lapsed_at IS NULL AND c.lapses_at <= ?
                      AND l.resolution IS NULL""",
                [*chunk, ts(now)],
            ).fetchall()
            lapsed += [claim for claim in (claim_from(row) for row in rows) if claim]
        for claim in lapsed:
            self.db.execute(
                "UPDATE claims SET lapsed_at = ? WHERE lead_id = ?", (ts(now), claim.lead_id)
            )
            self._drop_pending(claim.lead_id, owner_channel, notices=False)
            self._audit_claim(claim, LAPSE, claim.email, claim.name, "lapse_after", now, "")
        return lapsed

    def claimed_count(self, now: datetime) -> int:
        """Waiting leads whose claim holds now (``referral_watch_leads_claimed``)."""
        row = self.db.execute(
            """SELECT count(*) FROM claims c JOIN leads l ON l.id = c.lead_id
               WHERE l.resolution IS NULL AND c.lapses_at > ? AND l.deadline >= ?""",
            (ts(now), ts(now)),
        ).fetchone()
        return int(row[0])

    def _drop_pending(self, lead_id: str, owner_channel: str | None, *, notices: bool) -> None:
        if owner_channel is not None:
            self.db.execute(
                "UPDATE outbox SET state = 'superseded' WHERE lead_id = ? AND channel = ? "
                "AND kind = ? AND +state = 'pending'",
                (lead_id, owner_channel, TIER),
            )
        if notices:
            self.db.execute(
                "UPDATE outbox SET state = 'superseded' WHERE lead_id = ? AND kind = ? "
                "AND +state = 'pending'",
                (lead_id, CLAIMED),
            )

    def _audit_claim(
        self,
        claim: Claim,
        action: str,
        who: str,
        name: str,
        via: str,
        now: datetime,
        detail: str,
    ) -> None:
        self.db.execute(
            "INSERT INTO audit (lead_id, at, who, name, via, action, result, reason, detail) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (claim.lead_id, ts(now), who, name, via, action, RESULTS[action], claim.note, detail),
        )
