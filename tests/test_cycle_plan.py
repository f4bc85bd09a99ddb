"""cycle/plan.py, the pure delivery plan: batches, a message's wording, what is left of a digest."""

from __future__ import annotations

from datetime import timedelta

import pytest

from referral_watch.cycle import plan
from referral_watch.errors import ReferralWatchError
from referral_watch.model import TIER, Batch, Lead, PendingRow, Referral

from stages import CONFIG, NOW


def lead(lead_id: str, customer: str, days_left: float) -> Lead:
    created = NOW - timedelta(days=14 - days_left)
    referral = Referral(id=lead_id, name="", customer=customer, created=created)
    return Lead(referral, NOW + timedelta(days=days_left), first_seen=created, last_seen=NOW)


def row(row_id: int, lead_id: str | None, kind: str = TIER, tier: str | None = "new") -> PendingRow:
    return PendingRow(row_id, lead_id, kind, "team", tier, NOW)


def test_news_for_operations_goes_out_row_by_row_and_is_never_held() -> None:
    rows = [row(1, None, "ops", None), row(2, None, "report", None)]
    batches, held = plan.batches(rows, {}, CONFIG, NOW, news_only=True)
    assert [(b.kind, b.row_ids, b.lead_ids) for b in batches] == [
        ("ops", (1,), ()),
        ("report", (2,), ()),
    ]
    assert held == 0


def test_lead_alerts_are_batched_by_the_policy() -> None:
    leads = {f"l{n}": lead(f"l{n}", f"Customer {n}", 10 + n) for n in range(2)}
    rows = [row(n + 1, f"l{n}") for n in range(2)]
    batches, held = plan.batches(rows, leads, CONFIG, NOW)
    assert held == 0
    assert sorted(b.lead_ids for b in batches) == [("l0",), ("l1",)]  # under digest_over


@pytest.mark.parametrize(
    ("digest", "unworded", "aside_leads", "aside_rows", "rest"),
    [
        (True, ["b"], ["b"], [2], ((1, 3), ("a", "c"))),  # the digest goes out without b
        (True, [], ["a", "b", "c"], [1, 2, 3], None),  # each renders alone: all set aside
        (True, ["a", "b", "c"], ["a", "b", "c"], [1, 2, 3], None),  # nothing left
        (False, ["a"], ["a"], [1], None),  # a single alert: set aside whole
    ],
)
def test_salvage_sets_aside_only_what_cannot_be_worded(
    digest: bool,
    unworded: list[str],
    aside_leads: list[str],
    aside_rows: list[int],
    rest: tuple[tuple[int, ...], tuple[str, ...]] | None,
) -> None:
    ids = ("a", "b", "c") if digest else ("a",)
    batch = Batch("team", TIER, "new", tuple(range(1, len(ids) + 1)), ids, digest=digest)
    rows = {n + 1: row(n + 1, lead_id) for n, lead_id in enumerate(ids)}
    found = plan.salvage(batch, rows, unworded)
    assert (found.lead_ids, found.row_ids) == (aside_leads, aside_rows)
    assert (None if found.rest is None else (found.rest.row_ids, found.rest.lead_ids)) == rest


def test_a_message_about_no_lead_keeps_its_fixed_text() -> None:
    batch = Batch("team", "ops", None, (7,), ())
    message = plan.message_for(batch, [], ("Title", "Body"), CONFIG, NOW)
    assert (message.title, message.body) == ("Title", "Body")


def test_a_message_whose_leads_are_gone_cannot_be_made() -> None:
    batch = Batch("team", TIER, "new", (1,), ("gone",))
    with pytest.raises(ReferralWatchError, match="no longer in the state"):
        plan.message_for(batch, [], ("", ""), CONFIG, NOW)


def test_an_alert_is_worded_from_the_leads_given() -> None:
    batch = Batch("team", TIER, "new", (1,), ("l1",))
    message = plan.message_for(batch, [lead("l1", "Fabrikam Inc", 13)], ("", ""), CONFIG, NOW)
    assert "Fabrikam Inc" in message.title + message.body


def test_a_lead_of_a_digest_alone_is_a_single_alert() -> None:
    digest = Batch("team", TIER, "new", (1, 2), ("a", "b"), digest=True, more=3)
    alone = plan.alone(digest, "b")
    assert (alone.lead_ids, alone.digest, alone.more) == (("b",), False, 0)
