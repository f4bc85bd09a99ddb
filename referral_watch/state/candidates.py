"""Which leads the policy may have something to say about at a moment (the steady cycle's
shortcut), without looking at every watched lead.

Each watched lead has a row in ``lead_quiet``: ``until``, the first moment at which one of its
tier points can be due, worked out from its deadline and its outbox rows (every row ever written
for it). The rows only grow (a row never becomes 'skipped' later; rows are deleted only with
their lead), so until something else changes, the lead needs no look before then. Whatever
changes the answer sets it back to unknown (''), and the next call works it out again:

- the lead is stored or changed by a poll (its deadline may move), or read again by id
  (``Leads`` upsert and refresh call ``unsettle``);
- the policy's tier points change (their fingerprint in ``meta``);
- the lead is a candidate now: the policy decides for it and may write rows.

Unknown sorts before every moment, so such a lead is never missed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from referral_watch.model import TIER, Alert
from referral_watch.state.db import Database, chunks, ts
from referral_watch.state.dialect import Postgres

Point = tuple[str, str, datetime, datetime | None]  # policy.tier_points: channel, tier, ...
Step = tuple[str, str, timedelta, timedelta | None]  # ... as durations: remaining, repeat

POINTS_META = "candidates.tier_points"  # the tier points lead_quiet was worked out for
UNKNOWN = ""
NEVER = ts(datetime.max.replace(tzinfo=UTC))
_EARLIEST = datetime.min.replace(tzinfo=UTC)
_LATEST = datetime.max.replace(tzinfo=UTC)


class Candidates(Database):
    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """As Database's; the moments of new leads decided in it (``settle_new``) are kept
        until the candidates are chosen in the same transaction, never past its end."""
        self._decided: dict[str, tuple[str, str]] = {}
        try:
            with super().transaction() as db:
                yield db
        finally:
            self._decided = {}

    def policy_candidates(
        self,
        points: Sequence[Point],
        now: datetime,
        *,
        expired_notices: bool = True,
        resolved_notices: bool = True,
    ) -> list[str]:
        """Ids of the leads the policy may have something to say about at ``now``, most urgent
        first: a superset of those ``policy.due_alerts`` returns alerts for.

        ``points`` are (channel, tier, cutoff, repeat_after) from ``policy.tier_points``: the
        tier is due for a lead whose deadline <= cutoff. A watched lead is a candidate when a due
        tier has no outbox row yet for that channel, or the tier repeats and no row of it that
        was not skipped is newer than repeat_after; a lead with a claim always is, and so is a
        lead whose expired or resolved notice is still owed. Every other lead has heard all that
        is due, so a steady cycle reads (and parses) none of them: their ``lead_quiet.until`` is
        later than now. Writes lead_quiet: call inside the cycle's transaction.
        """
        if not self.dialect.in_transaction(self.db):  # it writes: all of it or nothing
            with self.transaction():
                return self.policy_candidates(
                    points,
                    now,
                    expired_notices=expired_notices,
                    resolved_notices=resolved_notices,
                )
        moment = ts(now)
        self._settle(_steps(points, now))
        # The few ids first (lead_quiet's and the claims' own index), then those leads by id:
        # no plan ever starts from every watched lead, with or without a table's statistics.
        due = [
            str(row[0])
            for row in self.db.execute("SELECT lead_id FROM lead_quiet WHERE until <= ?", (moment,))
        ]
        tier_due = self._watched(due, "AND deadline >= ?", (moment,))
        claimed = [str(row[0]) for row in self.db.execute("SELECT lead_id FROM claims")]
        selects: list[str] = []
        params: list[Any] = []
        if expired_notices:
            selects += [
                "SELECT id, deadline FROM leads "
                "WHERE resolution IS NULL AND deadline < ? AND expired_notified = 0",
                "SELECT id, deadline FROM leads "
                "WHERE resolution = 'expired' AND expired_notified = 0",
            ]
            params.append(moment)
        if resolved_notices:
            selects.append(  # (resolution >= '': not NULL, through the index)
                "SELECT id, deadline FROM leads WHERE resolution >= '' "
                "AND resolution NOT IN ('expired', 'gone') AND resolution_notified = 0"
            )
        # The policy decides for these now and may write rows for them: worked out again next
        # time, from the rows as they will be then.
        self.unsettle([lead_id for lead_id, _ in tier_due])
        found = dict(tier_due)
        found.update(self._watched(claimed, "AND deadline >= ?", (moment,)))
        if selects:
            rows = self.db.execute(" UNION ".join(selects), params)
            found.update((str(row[0]), str(row[1])) for row in rows)
        return sorted(found, key=lambda lead_id: (found[lead_id], lead_id))

    def unsettle(self, lead_ids: Sequence[str], *, written: bool = False) -> None:
        """These leads were stored or changed, or are decided for now: when their next tier
        point falls due is worked out again at the next call (``written``: their rows were
        already set unknown by the statement that stored them)."""
        decided = self.__dict__.get("_decided", {})
        for lead_id in lead_ids:
            decided.pop(lead_id, None)
        if written:
            return
        for chunk in chunks(lead_ids):
            marks = ", ".join([f"(?, '{UNKNOWN}')"] * len(chunk))
            self.db.execute(
                f"INSERT INTO lead_quiet (lead_id, until) VALUES {marks} "
                f"ON CONFLICT (lead_id) DO UPDATE SET until = '{UNKNOWN}'",
                chunk,
            )

    def settle_new(
        self,
        points: Sequence[Point],
        now: datetime,
        deadlines: Mapping[str, datetime],
        alerts: Sequence[Alert],
    ) -> None:
        """Leads first stored in this transaction and decided just now (``deadlines``, by id):
        when their next tier point falls due, from the alerts in hand, which ``record`` wrote
        as their only outbox rows (one each, created ``now``), without reading them back.
        Kept in memory and written when the candidates are chosen in this transaction (one
        statement, not one per page); a lead stored again meanwhile is unknown again."""
        if not self.dialect.in_transaction(self.db):
            return  # nothing to keep them in: their rows stay unknown, worked out later
        steps = _steps(points, now)
        fingerprint = _fingerprint(steps)
        created = ts(now)
        sent: dict[str, dict[tuple[str, str], str | None]] = {lead_id: {} for lead_id in deadlines}
        for alert in alerts:
            if alert.kind == TIER and alert.lead_id in sent and alert.tier is not None:
                heard = sent[alert.lead_id]
                key = (alert.channel, alert.tier)
                heard[key] = created if not alert.skipped else heard.get(key)
        plan = _Plan(steps)
        decided = self.__dict__.setdefault("_decided", {})
        for lead_id, deadline in deadlines.items():
            decided[lead_id] = (fingerprint, plan.quiet_until(deadline, sent[lead_id]))

    def _same_points(self, steps: list[Step]) -> None:
        """When the tier points changed since the moments were worked out: all unknown. Then
        the moments of the new leads decided in this transaction (for these points) go in."""
        fingerprint = _fingerprint(steps)
        if self.get_meta(POINTS_META) != fingerprint:
            self.db.execute("UPDATE lead_quiet SET until = ? WHERE until != ?", (UNKNOWN, UNKNOWN))
            self.set_meta(POINTS_META, fingerprint)
        decided, self._decided = self.__dict__.get("_decided", {}), {}
        self._write(
            [(lead_id, until) for lead_id, (f, until) in decided.items() if f == fingerprint]
        )

    def _settle(self, steps: list[Step]) -> None:
        """Work out lead_quiet.until for the watched leads where it is unknown (all of them
        when the tier points changed)."""
        self._same_points(steps)
        unknown = [
            str(row[0])
            for row in self.db.execute("SELECT lead_id FROM lead_quiet WHERE until = ?", (UNKNOWN,))
        ]
        if not unknown:
            return
        watched = self._watched(unknown, "", ())
        gone = list(set(unknown) - {lead_id for lead_id, _ in watched})
        for chunk in chunks(gone):  # answered or pruned meanwhile: nothing to work out
            marks = ",".join("?" * len(chunk))
            self.db.execute(f"DELETE FROM lead_quiet WHERE lead_id IN ({marks})", chunk)
        sent: dict[str, dict[tuple[str, str], str | None]] = {lead_id: {} for lead_id, _ in watched}
        for chunk in chunks(list(sent)):
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(
                f"""SELECT lead_id, channel, tier,
                           max(CASE WHEN state != 'skipped' THEN created END)
                    FROM outbox WHERE lead_id IN ({marks}) AND kind = 'tier'
                    GROUP BY lead_id, channel, tier""",
                chunk,
            )
            for lead_id, channel, tier, last in rows:
                sent[lead_id][(channel, tier)] = last
        plan = _Plan(steps)
        settled = [
            (lead_id, plan.quiet_until(datetime.fromisoformat(deadline), sent[lead_id]))
            for lead_id, deadline in watched
        ]
        self._write(settled)

    def _watched(
        self, lead_ids: Sequence[str], where: str, params: Sequence[Any]
    ) -> list[tuple[str, str]]:
        """(id, deadline) of those of these leads that are watched and meet ``where``."""
        found: list[tuple[str, str]] = []
        for chunk in chunks(lead_ids):
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(
                f"SELECT id, deadline FROM leads WHERE id IN ({marks}) "
                f"AND resolution IS NULL {where}",
                [*chunk, *params],
            )
            found += [(str(row[0]), str(row[1])) for row in rows]
        return found

    def _write(self, settled: list[tuple[str, str]]) -> None:
        """These moments into the rows there are (a lead answered meanwhile has none)."""
        if isinstance(self.dialect, Postgres) and len(settled) > 1000:
            # A first cycle's tens of thousands: COPYed (psycopg writes the rows in C, as they
            # come; two arrays of them cost ~90 ms of Python and ~7 MiB at 20,000), then one
            # UPDATE from the copy.
            self.db.execute(
                "CREATE TEMPORARY TABLE IF NOT EXISTS lead_quiet_in "
                "(LIKE lead_quiet) ON COMMIT DELETE ROWS"
            )
            self.db.execute("TRUNCATE lead_quiet_in")
            self.db.copy("lead_quiet_in", ["lead_id", "until"], settled)
            self.db.execute(
                "UPDATE lead_quiet SET until = i.until FROM lead_quiet_in i "
                "WHERE lead_quiet.lead_id = i.lead_id"
            )
            return
        if isinstance(self.dialect, Postgres):
            if settled:  # one statement, the moments as two arrays: no statement per 500
                self.db.execute(
                    "UPDATE lead_quiet SET until = s.until "
                    "FROM unnest(?::text[], ?::text[]) AS s (lead_id, until) "
                    "WHERE lead_quiet.lead_id = s.lead_id",
                    [list(column) for column in zip(*settled, strict=True)],
                )
            return
        for part in chunks(settled):
            marks = ", ".join(["(?, ?)"] * len(part))
            self.db.execute(
                f"""WITH settled (lead_id, until) AS (VALUES {marks})
                    UPDATE lead_quiet SET until = settled.until
                    FROM settled WHERE lead_quiet.lead_id = settled.lead_id""",
                [value for row in part for value in row],
            )


class _Plan:
    """quiet_until for many leads: what depends only on which points have rows is worked out
    once per set of points."""

    def __init__(self, steps: list[Step]) -> None:
        self.steps = steps
        self.plans: dict[frozenset[tuple[str, str]], tuple[timedelta | None, list[Step]]] = {}

    def quiet_until(self, end: datetime, sent: dict[tuple[str, str], str | None]) -> str:
        """The first moment a tier point can be due for a watched lead with deadline ``end``
        whose outbox holds rows for the (channel, tier) keys of ``sent`` (each with the time
        of its newest row that was not skipped, or None): NEVER when none can be before the
        deadline. A point is due at t when deadline <= t + remaining and either no row of it
        exists, or it repeats and no row that was not skipped is newer than t - repeat."""
        keys = frozenset(sent)
        plan = self.plans.get(keys)
        if plan is None:
            missing = [step[2] for step in self.steps if step[:2] not in keys]
            repeating = [step for step in self.steps if step[:2] in keys and step[3] is not None]
            plan = self.plans[keys] = (max(missing) if missing else None, repeating)
        longest, repeating = plan
        soonest = _LATEST if longest is None else _shifted(end, -longest)
        for channel, tier, remaining, repeat in repeating:
            due = _shifted(end, -remaining)
            last = sent[(channel, tier)]
            if last is not None and repeat is not None:
                due = max(due, _shifted(datetime.fromisoformat(last), repeat))
            soonest = min(soonest, due)
        return NEVER if soonest > end else ts(soonest)


def _fingerprint(steps: list[Step]) -> str:
    return json.dumps(
        [
            [c, t, r.total_seconds(), None if p is None else p.total_seconds()]
            for c, t, r, p in steps
        ]
    )


def _steps(points: Sequence[Point], now: datetime) -> list[Step]:
    return [
        (channel, tier, cutoff - now, None if repeat_after is None else now - repeat_after)
        for channel, tier, cutoff, repeat_after in points
    ]


def _shifted(moment: datetime, by: timedelta) -> datetime:
    try:
        return moment + by
    except OverflowError:
        return _LATEST if by > timedelta(0) else _EARLIEST
