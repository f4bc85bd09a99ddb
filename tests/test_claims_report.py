"""The report's claims part (SPEC 17): time to claim and time to answer, per person and for the
team, median and 90th percentile, in every format. Pure: leads and audit events are given."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta

import pytest

from referral_watch.model import AuditEntry, Lead, Referral
from referral_watch.render.channels import Style
from referral_watch.render.claim_report import claim_stats
from referral_watch.render.report import render_report, report_message, summarize

NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
H = timedelta(hours=1)
D = timedelta(days=1)


def lead(lead_id: str, seen: timedelta, answered: timedelta | None = None) -> Lead:
    """First seen ``seen`` before NOW; answered ``answered`` before NOW (None: waiting)."""
    ref = Referral(id=lead_id, name="", customer=f"Customer {lead_id}", created=NOW - seen)
    return Lead(
        referral=ref,
        deadline=NOW - seen + 14 * D,
        first_seen=NOW - seen,
        last_seen=NOW - (answered or timedelta(0)),
        resolution="accepted" if answered is not None else None,
        resolved_at=NOW - answered if answered is not None else None,
    )


def event(lead_id: str, action: str, who: str, before: timedelta) -> AuditEntry:
    result = {"claim": "claimed", "take-over": "taken over", "unclaim": "unclaimed"}
    return AuditEntry(
        lead_id, NOW - before, who, who.split("@")[0].title(), "command", action,
        result.get(action, "lapsed"),
    )  # fmt: skip


LEADS = [
    lead(
        "a", seen=5 * D, answered=2 * D
    ),  # Ann claimed 1h after it was seen, answered 3d - 1h later
    lead("b", seen=4 * D, answered=1 * D),  # Ann claimed after 3h; answered 3d - 3h later
    lead("c", seen=3 * D),  # Bob claimed after 5h, still waiting
    lead("d", seen=3 * D, answered=1 * D),  # Bob claimed after 1h, unclaimed: nobody's answer
]
EVENTS = [
    event("a", "claim", "ann@contoso.com", 5 * D - H),
    event("b", "claim", "ann@contoso.com", 4 * D - 3 * H),
    event("c", "claim", "bob@contoso.com", 3 * D - 5 * H),
    event("d", "claim", "bob@contoso.com", 3 * D - 1 * H),
    event("d", "unclaim", "ops", 2 * D),
]


def test_time_to_claim_and_to_answer_per_person_and_for_the_team() -> None:
    stats = claim_stats(LEADS, EVENTS, NOW - 7 * D, NOW)
    assert stats is not None
    people = {p.email: p for p in stats.people}
    ann, bob = people["ann@contoso.com"], people["bob@contoso.com"]
    assert (ann.claimed.count, ann.claimed.median) == (2, 2 * H)  # 1h and 3h
    assert (ann.answered.count, ann.answered.median) == (2, 3 * D - 2 * H)
    assert ann.answered.p90 == 3 * D - H - timedelta(hours=0.2)  # 3d-3h .. 3d-1h at 90%
    assert (bob.claimed.count, bob.claimed.median) == (2, 3 * H)
    assert bob.answered.count == 0 and bob.answered.median is None
    assert stats.claimed.count == 4 and stats.answered.count == 2
    assert "ops" not in people  # an unclaim is not a claim


def test_no_claims_in_the_period_no_claims_part() -> None:
    assert claim_stats(LEADS, [], NOW - 7 * D, NOW) is None
    assert claim_stats(LEADS, EVENTS, NOW - H, NOW) is None
    assert summarize(LEADS, NOW, 7 * D).claims is None


@pytest.mark.parametrize("fmt", ["text", "markdown", "json", "csv"])
def test_every_format_shows_the_claims(fmt: str) -> None:
    text = render_report(summarize(LEADS, NOW, 7 * D, EVENTS), fmt)
    if fmt == "json":
        claims = json.loads(text)["claims"]
        assert claims["team"]["time_to_claim"] == {
            "count": 4,
            "median_seconds": 2 * 3600,  # 1h, 1h, 3h, 5h
            "p90_seconds": round((4.4 * H).total_seconds()),
        }
        assert [p["email"] for p in claims["per_person"]] == ["ann@contoso.com", "bob@contoso.com"]
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        mine = {(r["metric"], r["key"]): r["value"] for r in rows}
        assert mine[("claims", "ann@contoso.com")] == "2"
        assert mine[("answered_while_claimed", "")] == "2"
        assert mine[("claim_median_seconds", "bob@contoso.com")] == str(3 * 3600)
    else:
        assert "Ann" in text and "Bob" in text
        assert "time to claim" in text.lower() or "to claim" in text


def test_the_channel_report_is_localized() -> None:
    summary = summarize(LEADS, NOW, 7 * D, EVENTS)
    nl = report_message(summary, Style(locale="nl-NL"), compact=False).body
    assert "tijd tot oppakken" in nl and "het hele team: 4 opgepakt" in nl
