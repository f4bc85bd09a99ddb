"""The cycle's stages alone, each on a real state file with fake edges: intake (pages -> stored,
set aside), decide (the per-lead guard), delivery (plan -> send -> record) with a fake sender."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from referral_watch import policy
from referral_watch.cycle.decide import Decide
from referral_watch.cycle.delivery import Delivery
from referral_watch.cycle.intake import Intake
from referral_watch.cycle.operations import Operations
from referral_watch.cycle.result import CycleResult
from referral_watch.model import Lead, Referral, parse_referral
from referral_watch.sandbox.records import make_referral
from referral_watch.state.store import Store

from stages import CONFIG, NOW, FakeApi, FakeSender


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state.db") as opened:
        yield opened


def record(customer: str, hours_old: float, **fields: Any) -> dict[str, Any]:
    return make_referral(customer=customer, created=NOW - timedelta(hours=hours_old), **fields)


def intake(store: Store, api: FakeApi) -> Intake:
    return Intake(CONFIG, store, api, lambda: NOW, Decide(CONFIG, store))


# --- intake ---------------------------------------------------------------------------------


def test_intake_stores_new_leads_and_decides_for_them(store: Store) -> None:
    good = record("Good Co", 2)
    api = FakeApi([[good, {"name": "no id at all"}]])
    result = CycleResult()
    intake(store, api).poll(NOW, result)
    assert result.poll_ok
    assert (result.fetched, result.new, result.malformed) == (2, 1, 1)
    assert [lead.id for lead in store.leads()] == [good["id"]]
    assert result.queued == 1  # the "new" tier for the team
    (aside,) = store.quarantined()
    assert aside.stage == "parse"
    assert store.last_poll() is not None and store.last_poll().ok  # type: ignore[union-attr]


def test_an_unchanged_lead_is_not_stored_or_decided_again(store: Store) -> None:
    api = FakeApi([[record("Steady Co", 2)]])
    intake(store, api).poll(NOW, CycleResult())
    again = CycleResult()
    intake(store, api).poll(NOW + timedelta(minutes=15), again)
    assert (again.fetched, again.new, again.queued) == (1, 0, 0)


def test_a_lead_missing_from_a_poll_is_looked_up_and_kept_while_it_awaits_an_answer(
    store: Store,
) -> None:
    lead = record("Unclear Inc", 2)
    intake(store, FakeApi([[lead]])).poll(NOW, CycleResult())
    later = NOW + timedelta(hours=1)
    api = FakeApi([[]], by_id={lead["id"]: {**lead, "substatus": "None"}})
    result = CycleResult()
    Intake(CONFIG, store, api, lambda: later, Decide(CONFIG, store)).poll(later, result)
    assert result.resolved == 0
    assert [x.id for x in store.leads()] == [lead["id"]]  # "None" is no answer


@pytest.mark.parametrize(
    ("substatus", "awaiting"),
    [("Pending", True), ("Received", True), ("None", True), ("", True), ("Accepted", False),
     ("Declined", False), ("Expired", False), ("Won", False)],
)  # fmt: skip
def test_one_rule_says_whether_a_referral_still_awaits_an_answer(
    substatus: str, awaiting: bool
) -> None:
    referral = Referral(id="x", name="", customer="C", created=NOW, substatus=substatus)
    assert referral.awaiting_answer is awaiting


# --- decide ---------------------------------------------------------------------------------


def stored(store: Store, *records: dict[str, Any]) -> list[str]:
    referrals = [parse_referral(r) for r in records]
    with store.transaction():
        store.upsert(referrals, lambda r: r.created + timedelta(days=14), NOW)
    return [r.id for r in referrals]


def test_decide_sets_aside_the_lead_the_policy_fails_on_and_decides_the_others(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    good, poison = stored(store, record("Good Co", 1), record("Poison Co", 1))
    real = policy.due_alerts

    def fails_on_poison(leads: list[Lead], *args: Any, **kwargs: Any) -> Any:
        if any(lead.id == poison for lead in leads):
            raise ValueError("cannot decide")
        return real(leads, *args, **kwargs)

    monkeypatch.setattr(policy, "due_alerts", fails_on_poison)
    result = CycleResult()
    with store.transaction():
        queued = Decide(CONFIG, store).leads([good, poison], NOW, result)
    assert queued == 1
    assert {row.lead_id for row in store.pending()} == {good}
    (aside,) = store.quarantined()
    assert (aside.lead_id, aside.stage, result.quarantined) == (poison, "decide", 1)


def test_decide_for_candidates_alerts_each_lead_once(store: Store) -> None:
    stored(store, record("First Co", 1), record("Second Co", 3))
    decide = Decide(CONFIG, store)
    with store.transaction():
        assert decide.candidates(NOW, CycleResult()) == 2
    with store.transaction():
        assert decide.candidates(NOW, CycleResult()) == 0  # nothing due twice


# --- delivery: plan -> send -> record --------------------------------------------------------


def delivery(store: Store, sender: FakeSender) -> Delivery:
    return Delivery(
        CONFIG,
        store,
        sender,
        lambda: NOW,
        threading.Event(),
        lambda: True,
        Operations(CONFIG, store),
    )


def queued_alerts(store: Store, *customers: str) -> None:
    stored(store, *(record(customer, 1) for customer in customers))
    with store.transaction():
        Decide(CONFIG, store).candidates(NOW, CycleResult())


def test_delivery_sends_each_message_and_records_it_delivered(store: Store) -> None:
    queued_alerts(store, "First Co", "Second Co")
    sender = FakeSender()
    result = CycleResult()
    delivery(store, sender).deliver(result)
    assert sorted(channel for channel, _ in sender.sent) == ["team", "team"]
    assert result.delivered == 2
    assert store.pending() == []


def test_a_refused_message_stays_in_the_outbox_for_the_next_cycle(store: Store) -> None:
    queued_alerts(store, "Refused Co")
    result = CycleResult()
    delivery(store, FakeSender(refusing={"team"})).deliver(result)
    assert (result.failed, result.delivered) == (1, 0)
    assert len(store.pending()) == 1
    sender = FakeSender()
    delivery(store, sender).deliver(CycleResult())
    assert len(sender.sent) == 1  # the next cycle sends it


def test_a_message_that_breaks_the_sender_sets_its_lead_aside(store: Store) -> None:
    queued_alerts(store, "Breaking Co")
    result = CycleResult()
    delivery(store, FakeSender(broken={"team"})).deliver(result)
    assert store.pending() == []
    (aside,) = store.quarantined()
    assert aside.stage == "send"
    assert result.failed == 0  # the message, not the channel, was the problem
