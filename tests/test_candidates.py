"""The steady cycle's shortcut (Store.policy_candidates): a lead that has heard everything due
is left alone until its next tier (or repeat) can fall due, and looked at again as soon as
something about it changes: its deadline, the tiers configured, a lead read again by id."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from test_store import NOW, _back_to, referral

from referral_watch.model import TIER, Alert, parse_referral
from referral_watch.state.store import Store

D = timedelta(days=1)
H = timedelta(hours=1)


def tiers(now: datetime, *, final_repeat: timedelta | None = None) -> list[tuple]:  # type: ignore[type-arg]
    """new at 14 days left, reminder at 7, final at 12 hours (repeating if told), to team."""
    repeat_after = None if final_repeat is None else now - final_repeat
    return [
        ("team", "new", now + 14 * D, None),
        ("team", "reminder", now + 7 * D, None),
        ("team", "final", now + 12 * H, repeat_after),
    ]


def store_lead(store: Store, lead_id: str, left: timedelta, now: datetime = NOW) -> None:
    """A lead (created a day ago) whose deadline is `left` after `now`."""
    with store.transaction():
        store.upsert([parse_referral(referral(lead_id))], lambda _r: now + left, now)


def heard(store: Store, lead_id: str, *names: str, at: datetime = NOW) -> None:
    with store.transaction():
        store.record([Alert(lead_id, TIER, "team", name, 0) for name in names], at)


def candidates(store: Store, now: datetime, **points: timedelta | None) -> list[str]:
    with store.transaction():
        return store.policy_candidates(tiers(now, **points), now)


def test_a_lead_that_heard_its_tier_waits_for_the_next_one(state_location: Path | str) -> None:
    with Store(state_location) as store:
        store_lead(store, "a", 10 * D)  # new is due; reminder in 3 days
        assert candidates(store, NOW) == ["a"]
        heard(store, "a", "new")
        assert candidates(store, NOW) == []
        assert candidates(store, NOW + 3 * D - H) == []
        assert candidates(store, NOW + 3 * D) == ["a"]  # the reminder falls due
        heard(store, "a", "reminder", at=NOW + 3 * D)
        assert candidates(store, NOW + 3 * D) == []
        assert candidates(store, NOW + 10 * D - 12 * H) == ["a"]  # the final one


def test_a_repeating_tier_brings_its_lead_back_when_the_repeat_is_due(
    state_location: Path | str,
) -> None:
    with Store(state_location) as store:
        store_lead(store, "a", 6 * H)
        heard(store, "a", "new", "reminder", "final")
        assert candidates(store, NOW + H, final_repeat=4 * H) == []
        assert candidates(store, NOW + 4 * H, final_repeat=4 * H) == ["a"]


def test_a_changed_deadline_is_looked_at_again(state_location: Path | str) -> None:
    with Store(state_location) as store:
        store_lead(store, "a", 10 * D)
        heard(store, "a", "new")
        assert candidates(store, NOW) == []
        store_lead(store, "a", 5 * D)  # the record changed: the reminder is due now
        assert candidates(store, NOW) == ["a"]
        heard(store, "a", "reminder")
        assert candidates(store, NOW) == []
        with store.transaction():  # read again by id: the deadline moved again
            store.refresh(parse_referral(referral("a")), NOW + 6 * H)
        assert candidates(store, NOW) == ["a"]


def test_a_tier_added_to_the_policy_reaches_the_leads_that_already_heard_the_others(
    state_location: Path | str,
) -> None:
    with Store(state_location) as store:
        store_lead(store, "a", 10 * D)
        heard(store, "a", "new")
        assert candidates(store, NOW) == []
        with store.transaction():
            extra = [*tiers(NOW), ("team", "early", NOW + 11 * D, None)]
            assert store.policy_candidates(extra, NOW) == ["a"]


def test_a_state_from_before_the_shortcut_looks_at_its_leads_once(
    state_location: Path | str,
) -> None:
    with Store(state_location) as store:
        store_lead(store, "a", 10 * D)
        store_lead(store, "b", 9 * D)
        heard(store, "a", "new")
    _back_to(state_location, 8)
    with Store(state_location) as store:
        assert candidates(store, NOW) == ["b"]
        heard(store, "b", "new")
        assert candidates(store, NOW) == []
        assert candidates(store, NOW + 2 * D) == ["b"]  # b's reminder; a's comes a day later


def test_a_new_lead_decided_at_once_waits_for_its_next_tier_unless_stored_again(
    state_location: Path | str,
) -> None:
    with Store(state_location) as store:
        with store.transaction():  # a first cycle: stored, decided from the referral in hand
            store.upsert([parse_referral(referral("a"))], lambda _r: NOW + 10 * D, NOW)
            store.upsert([parse_referral(referral("b"))], lambda _r: NOW + 10 * D, NOW)
            alerts = [Alert(lead, TIER, "team", "new", 0) for lead in ("a", "b")]
            store.record(alerts, NOW, new_leads=True)
            store.settle_new(tiers(NOW), NOW, {"a": NOW + 10 * D, "b": NOW + 10 * D}, alerts)
            # a later page brings b again, changed: its reminder is due by the new deadline
            store.upsert([parse_referral(referral("b"))], lambda _r: NOW + 5 * D, NOW)
            assert store.policy_candidates(tiers(NOW), NOW) == ["b"]
            store.record([Alert("b", TIER, "team", "reminder", 0)], NOW)
        assert candidates(store, NOW + 3 * D - H) == []
        assert candidates(store, NOW + 3 * D) == ["a"]
