"""Claims in the state (SPEC 17), on SQLite and on PostgreSQL: the current claim per lead, every
claim, take-over, lapse and unclaim in the audit, and what they do to the outbox."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from referral_watch.model import TIER, Alert, Claim, parse_referral
from referral_watch.state.schema import SCHEMA_VERSION
from referral_watch.state.store import Store

NOW = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
D = timedelta(days=1)


def referral(ref_id: str) -> dict[str, object]:
    return {
        "id": ref_id,
        "createdDateTime": (NOW - D).strftime("%Y-%m-%dT%H:%M:%S.0000000Z"),
        "substatus": "Pending",
        "status": "New",
        "customerProfile": {"name": f"Customer {ref_id}"},
    }


def stored(where: Path | str, *ids: str) -> None:
    with Store(where) as store, store.transaction():
        store.upsert([parse_referral(referral(i)) for i in ids], lambda r: r.created + 14 * D, NOW)


def claim(email: str, at: datetime = NOW, lead: str = "L1") -> Claim:
    return Claim(lead, email, email.split("@")[0].title(), at, at + 2 * D, "command", "a note")


def test_a_second_person_is_refused_until_a_take_over_and_all_is_audited(
    state_location: Path | str,
) -> None:
    stored(state_location, "L1")
    with Store(state_location) as store:
        assert store.put_claim(claim("ann@contoso.com"), NOW).won
        refused = store.put_claim(claim("bob@contoso.com", NOW + 1 * D), NOW + 1 * D)
        assert not refused.won and refused.previous == claim("ann@contoso.com")
        assert store.lead("L1").claim == claim("ann@contoso.com")  # type: ignore[union-attr]
        taken = store.put_claim(claim("bob@contoso.com", NOW + D), NOW + D, take_over=True)
        assert taken.won and taken.previous == claim("ann@contoso.com")
        assert store.claimed_count(NOW + D) == 1
        assert store.drop_claim("L1", "ops", "ops", "command", NOW + D, "owners") is not None
        assert store.lead("L1").claim is None  # type: ignore[union-attr]
        events = [(e.action, e.who, e.result, e.detail) for e in store.audit("L1")]
        assert events == [
            ("claim", "ann@contoso.com", "claimed", ""),
            ("take-over", "bob@contoso.com", "taken over", "from Ann"),
            ("unclaim", "ops", "unclaimed", ""),
        ]
        assert [e.action for e in store.claim_events()] == ["claim", "take-over", "unclaim"]


def test_a_lapse_is_recorded_once_and_drops_the_owners_waiting_messages(
    state_location: Path | str,
) -> None:
    stored(state_location, "L1", "L2")
    with Store(state_location) as store:
        store.put_claim(claim("ann@contoso.com"), NOW)
        with store.transaction():
            store.record([Alert("L1", TIER, "owners", "reminder", 1)], NOW)
        assert store.claimed_count(NOW + D) == 1
        assert store.policy_candidates([], NOW + D) == ["L1"]  # claimed: always looked at
        with store.transaction():
            assert store.lapse_claims(["L1", "L2"], NOW + D, "owners") == []  # not yet
            (lapsed,) = store.lapse_claims(["L1", "L2"], NOW + 3 * D, "owners")
            assert lapsed.email == "ann@contoso.com"
            assert store.lapse_claims(["L1"], NOW + 4 * D, "owners") == []  # once
        assert store.pending() == []  # the owner's reminder went with the claim
        assert store.claimed_count(NOW + 3 * D) == 0
        lead = store.lead("L1")
        assert lead is not None and lead.claim is not None  # kept for the lapse notice's words
        assert lead.claimed(NOW + 3 * D) is None
        assert [e.action for e in store.audit("L1")] == ["claim", "lapse"]
        # another claim after the lapse is nobody's take-over
        assert store.put_claim(claim("bob@contoso.com", NOW + 3 * D), NOW + 3 * D).won
        assert store.audit("L1")[-1].action == "claim"


def test_pruning_a_resolved_lead_drops_its_claim(state_location: Path | str) -> None:
    stored(state_location, "L1")
    with Store(state_location) as store:
        store.put_claim(claim("ann@contoso.com"), NOW)
        with store.transaction():
            store.resolve("L1", "accepted", NOW)
        assert store.prune(NOW + 100 * D, 90 * D) == 1
        assert store.claim_of("L1") is None


def test_a_state_from_before_lead_claims_gains_them_and_keeps_its_leads(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    stored(path, "old-lead")
    db = sqlite3.connect(path)
    db.execute("DROP TABLE claims")
    db.execute("DROP TABLE lead_quiet")  # schema 9
    db.execute("PRAGMA user_version = 7")
    db.commit()
    db.close()
    with Store(path) as store:
        assert [lead.id for lead in store.leads()] == ["old-lead"]
        assert store.put_claim(claim("ann@contoso.com", lead="old-lead"), NOW).won
        assert store.dialect.version(store.db) == SCHEMA_VERSION == 9
