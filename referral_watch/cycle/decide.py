"""Decide: which alerts are due for which leads, written to the outbox in the same transaction
as the poll (or the webhook batch) that made them. One path for polls and webhook leads, with
the per-lead guard: a lead the policy fails on is set aside alone, the others are decided."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from referral_watch import policy
from referral_watch.config import Config
from referral_watch.cycle.result import CycleResult, set_aside
from referral_watch.model import Alert, Lead
from referral_watch.state.store import Store

# Leads read, decided and recorded at a time: bounds memory in a first cycle of 50,000 leads.
POLICY_CHUNK = 500


class Decide:
    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store

    def due(
        self, leads: list[Lead], history: Mapping[str, Any], now: datetime, result: CycleResult
    ) -> list[Alert]:
        """policy.due_alerts, lead by lead when the batch fails: a lead the policy cannot
        decide for is set aside, and the others are decided as usual."""
        try:
            return policy.due_alerts(leads, dict(history), self.config, now)
        except Exception as exc:
            if len(leads) == 1:
                reason = f"no decision can be made ({type(exc).__name__}: {str(exc)[:120]})"
                lead_id = leads[0].id
                set_aside(self.store, lead_id, "decide", reason, now, result, lead_id=lead_id)
                return []
        alerts: list[Alert] = []
        for lead in leads:
            alerts += self.due([lead], {lead.id: history.get(lead.id, [])}, now, result)
        return alerts

    def new_leads(self, leads: list[Lead], now: datetime, result: CycleResult) -> int:
        """Decide at once for leads first stored now: they have no history, silence or notice
        yet, so the leads in hand are all the policy needs. Returns the rows to deliver."""
        leads.sort(key=lambda lead: lead.deadline)  # most urgent first, as candidates are
        alerts = self.due(leads, {}, now, result)
        queued = self.store.record(alerts, now, new_leads=True)
        # Their next tier's moment from these alerts (their only rows), not read back later.
        deadlines = {lead.id: lead.deadline for lead in leads}
        self.store.settle_new(policy.tier_points(self.config, now), now, deadlines, alerts)
        return queued

    def candidates(self, now: datetime, result: CycleResult) -> int:
        """Decide for the leads that may need an alert (a poll). Returns the rows to deliver.
        Call inside the poll's transaction."""
        policy_config = self.config.policy
        ids = self.store.policy_candidates(
            policy.tier_points(self.config, now),
            now,
            expired_notices=bool(policy_config.on_expired),
            resolved_notices=bool(policy_config.on_resolved),
        )
        return self.leads(ids, now, result)

    def leads(self, lead_ids: Sequence[str], now: datetime, result: CycleResult) -> int:
        """Decide for these leads only (a webhook batch's, or a poll's candidates) and write
        the decisions to the outbox. Returns the number of rows to deliver."""
        queued = 0
        for start in range(0, len(lead_ids), POLICY_CHUNK):
            chunk = list(lead_ids[start : start + POLICY_CHUNK])
            leads = self.store.leads(for_policy=True, ids=chunk)
            alerts = self.due(leads, self.store.history(chunk), now, result)
            queued += self.store.record(alerts, now)
            if self.config.claims is not None:  # their lapse notices are in: end those claims
                self.store.lapse_claims(chunk, now, self.config.claims.owner_channel)
        return queued
