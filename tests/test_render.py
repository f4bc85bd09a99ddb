"""Message wording: what the team reads, in English and Dutch, in every channel's form.

Everything here is pure: ``now`` is fixed, time zones are real IANA zones (including both sides
of a DST change), and the catalogs are the packaged .po files.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
from babel.messages.catalog import Catalog
from babel.messages.extract import extract_from_file
from babel.messages.pofile import read_po
from hypothesis import given, settings
from hypothesis import strategies as st

from referral_watch.config import Config, TierConfig
from referral_watch.config.loader import parse_config
from referral_watch.model import EXPIRED, RESOLVED, TIER, Lead, parse_referral
from referral_watch.render import messages as render
from referral_watch.render.messages import (
    SLACK_MAX,
    TEAMS_MAX,
    Style,
    money_text,
    render_alert,
    render_digest,
    style_for,
    time_left_text,
    when_text,
)
from referral_watch.render.notices import render_ops, render_test, report_headings
from referral_watch.render.template_check import check_templates

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "referral_watch"
NL_PO = PACKAGE / "locale" / "nl" / "LC_MESSAGES" / "messages.po"
POT = PACKAGE / "locale" / "messages.pot"

NOW = datetime(2026, 10, 24, 22, 0, tzinfo=UTC)
EN = Style(locale="en-US", timezone="UTC")
NL = Style(locale="nl-NL", timezone="Europe/Amsterdam")
TEAMS = Style(locale="en-US", timezone="UTC", compact=True, max_length=TEAMS_MAX)
SLACK = Style(locale="en-US", timezone="UTC", max_length=SLACK_MAX)
FINAL = TierConfig(name="final", remaining="12h", notify=["team"])  # type: ignore[arg-type]
URGENT = TierConfig(name="urgent", remaining="2d", notify=["team"])  # type: ignore[arg-type]


def make_lead(
    *,
    remaining: timedelta | None = timedelta(hours=3, minutes=58),
    deadline: datetime | None = None,
    customer: str = "Fabrikam Customer Inc",
    value: Any = 25000,
    currency: str = "USD",
    notes: str = "Wants to move 40 servers to Azure before year end.",
    team: list[dict[str, Any]] | None = None,
    co_sell: bool = False,
    resolution: str | None = None,
    ref_id: str = "8a7b6c5d-0000-4000-8000-000000000001",
    solutions: tuple[str, ...] = ("Azure Migrate",),
    products: tuple[str, ...] = ("AZURE-VM",),
) -> Lead:
    """A lead built from API-shaped JSON, as the poller would see it."""
    details: dict[str, Any] = {"notes": notes, "currency": currency}
    if value is not None:
        details["dealValue"] = value
    details["requirements"] = {
        "solutions": [{"id": f"s{i}", "name": name} for i, name in enumerate(solutions)],
        "products": [{"id": p} for p in products],
    }
    data: dict[str, Any] = {
        "id": ref_id,
        "name": "Migration",
        "createdDateTime": "2026-10-11T01:30:00.0000000Z",
        "status": "New",
        "substatus": "Pending",
        "type": "Shared" if co_sell else "Independent",
        "qualification": "SalesQualified",
        "direction": "Incoming",
        "customerProfile": {"name": customer, "address": {"country": "NL"}},
        "details": details,
        "team": team
        if team is not None
        else [{"firstName": "Alice", "lastName": "Smith", "email": "alice@example.com"}],
        "inviteContext": {"invitedBy": {"organizationId": "msft"}},
    }
    referral = parse_referral(data)
    if deadline is None:
        assert remaining is not None
        deadline = NOW + remaining
    return Lead(
        referral,
        deadline=deadline,
        first_seen=referral.created,
        last_seen=NOW,
        resolution=resolution,
    )


def config_text(extra_tier: str = "", channels: str = "") -> str:
    return f"""
[auth]
method = "env"

[partner_center]
link_template = "https://partner.microsoft.com/dashboard/referrals/v2/leads/{{id}}"

[[policy.tiers]]
name = "new"
remaining = "14d"
notify = ["team"]

[[policy.tiers]]
name = "final"
remaining = "12h"
notify = ["team", "nl"]
{extra_tier}

[channels]
team = "mailtos://user:pass@smtp.example.com?to=sales@example.com"
nl = {{ url = "json://127.0.0.1:9/hook", locale = "nl-NL", timezone = "Europe/Amsterdam" }}
{channels}

[messages]
locale = "en-US"
timezone = "America/Los_Angeles"
"""


def parse(text: str) -> Config:
    return parse_config(text, env={})


# --- the words themselves ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("remaining", "en", "nl"),
    [
        (timedelta(hours=3, minutes=58, seconds=59), "3h 58m", "3u 58m"),
        (timedelta(days=6, hours=4, minutes=30), "6d 4h", "6d 4u"),
        (timedelta(days=14), "14d", "14d"),
        (timedelta(hours=2), "2h", "2u"),
        (timedelta(minutes=45), "45m", "45m"),
        (timedelta(seconds=30), "<1m", "<1m"),
        (timedelta(0), "<1m", "<1m"),
        (timedelta(hours=-2), "expired 2h ago", "2u geleden verlopen"),
        (timedelta(days=-1, hours=-3), "expired 1d 3h ago", "1d 3u geleden verlopen"),
    ],
)
def test_time_left_text(remaining: timedelta, en: str, nl: str) -> None:
    assert time_left_text(remaining, "en-US") == en
    assert time_left_text(remaining, "nl-NL") == nl


@pytest.mark.parametrize(
    ("amount", "currency", "locale", "expected"),
    [
        (Decimal("25000"), "USD", "en-US", "25,000 USD"),
        (Decimal("25000"), "USD", "nl-NL", "25.000 USD"),
        (Decimal("25000.5"), "EUR", "en-US", "25,000.50 EUR"),
        (Decimal("25000.5"), "EUR", "nl-NL", "25.000,50 EUR"),
        (Decimal("1234567.00"), "GBP", "nl", "1.234.567 GBP"),
        (Decimal("990"), "", "en-US", "990"),
        (None, "USD", "en-US", ""),
    ],
)
def test_money_text(amount: Decimal | None, currency: str, locale: str, expected: str) -> None:
    assert money_text(amount, currency, locale) == expected


@pytest.mark.parametrize(
    ("value", "locale", "expected"),
    [
        ("25000", "en-US", "25,000 USD"),
        ("25,000.50", "en-US", "25,000.50 USD"),
        ("25000.50", "nl-NL", "25.000,50 USD"),
        (1e6, "en-US", "1,000,000 USD"),
    ],
)
def test_deal_value_given_as_a_string_or_number(value: Any, locale: str, expected: str) -> None:
    lead = make_lead(value=value, currency="usd")
    body = render_alert(lead, TIER, FINAL, NOW, replace(EN, locale=locale)).body
    assert expected in body


# --- titles and bodies, en and nl ------------------------------------------------------------


@pytest.mark.parametrize(
    ("remaining", "kind", "co_sell", "resolution", "en", "nl"),
    [
        (
            timedelta(hours=3, minutes=58),
            TIER,
            False,
            None,
            "Lead expires in 3h 58m: Fabrikam Customer Inc",
            "Lead verloopt over 3u 58m: Fabrikam Customer Inc",
        ),
        (
            timedelta(days=13, hours=23),
            TIER,
            False,
            None,
            "Lead expires in 13d 23h: Fabrikam Customer Inc",
            "Lead verloopt over 13d 23u: Fabrikam Customer Inc",
        ),
        (
            timedelta(days=1, hours=20),
            TIER,
            True,
            None,
            "Co-sell opportunity expires in 1d 20h: Fabrikam Customer Inc",
            "Co-sell-kans verloopt over 1d 20u: Fabrikam Customer Inc",
        ),
        (
            timedelta(minutes=-5),
            TIER,  # a reminder delivered after the deadline does not say "expires in"
            False,
            None,
            "Lead expired unanswered: Fabrikam Customer Inc",
            "Lead onbeantwoord verlopen: Fabrikam Customer Inc",
        ),
        (
            timedelta(hours=-2),
            EXPIRED,
            False,
            None,
            "Lead expired unanswered: Fabrikam Customer Inc",
            "Lead onbeantwoord verlopen: Fabrikam Customer Inc",
        ),
        (
            timedelta(hours=-2),
            EXPIRED,
            True,
            None,
            "Co-sell opportunity expired unanswered: Fabrikam Customer Inc",
            "Co-sell-kans onbeantwoord verlopen: Fabrikam Customer Inc",
        ),
        (
            timedelta(days=3),
            RESOLVED,
            False,
            "accepted",
            "Lead accepted: Fabrikam Customer Inc",
            "Lead geaccepteerd: Fabrikam Customer Inc",
        ),
        (
            timedelta(days=3),
            RESOLVED,
            False,
            "declined",
            "Lead declined: Fabrikam Customer Inc",
            "Lead afgewezen: Fabrikam Customer Inc",
        ),
        (
            timedelta(days=3),
            RESOLVED,
            True,
            "won",
            "Co-sell opportunity won: Fabrikam Customer Inc",
            "Co-sell-kans gewonnen: Fabrikam Customer Inc",
        ),
        (
            timedelta(days=3),
            RESOLVED,
            False,
            "gone",
            "Lead closed: Fabrikam Customer Inc",
            "Lead afgesloten: Fabrikam Customer Inc",
        ),
    ],
)
def test_alert_titles(
    remaining: timedelta,
    kind: str,
    co_sell: bool,
    resolution: str | None,
    en: str,
    nl: str,
) -> None:
    lead = make_lead(remaining=remaining, co_sell=co_sell, resolution=resolution)
    tier = FINAL if kind == TIER else None
    assert render_alert(lead, kind, tier, NOW, EN).title == en
    assert render_alert(lead, kind, tier, NOW, NL).title == nl


def test_tier_alert_body_in_english() -> None:
    message = render_alert(make_lead(), TIER, FINAL, NOW, EN)
    assert message.body == (
        "**Fabrikam Customer Inc** needs an answer in Partner Center within **3h 58m**.\n"
        "\n"
        "- **Customer:** Fabrikam Customer Inc\n"
        "- **Deal value:** 25,000 USD\n"
        "- **Kind:** Lead\n"
        "- **Created:** Sun, Oct 11, 2026, 1:30 AM UTC\n"
        "- **Deadline:** Sun, Oct 25, 2026, 1:58 AM UTC\n"
        "- **Time left:** 3h 58m\n"
        "- **Notes:** Wants to move 40 servers to Azure before year end.\n"
        "- **Products/solutions:** Azure Migrate, AZURE-VM\n"
        "- **Assigned team:** Alice Smith\n"
        "- **Referral id:** 8a7b6c5d-0000-4000-8000-000000000001\n"
        "\n"
        "[Open in Partner Center](https://partner.microsoft.com/dashboard/referrals/v2/leads)"
    )


def test_tier_alert_body_in_dutch_in_amsterdam_time() -> None:
    lead = make_lead(co_sell=True)
    style = replace(NL, link_template="https://crm.example.com/leads/{id}")
    message = render_alert(lead, TIER, FINAL, NOW, style)
    assert message.title == "Co-sell-kans verloopt over 3u 58m: Fabrikam Customer Inc"
    assert message.body == (
        "**Fabrikam Customer Inc** moet binnen **3u 58m** een antwoord krijgen in Partner Center.\n"
        "\n"
        "- **Klant:** Fabrikam Customer Inc\n"
        "- **Dealwaarde:** 25.000 USD\n"
        "- **Soort:** Co-sell-kans\n"
        "- **Aangemaakt:** zo 11 okt 2026, 03:30 CEST\n"
        "- **Deadline:** zo 25 okt 2026, 02:58 CET\n"
        "- **Resterende tijd:** 3u 58m\n"
        "- **Notities:** Wants to move 40 servers to Azure before year end.\n"
        "- **Producten/oplossingen:** Azure Migrate, AZURE-VM\n"
        "- **Toegewezen team:** Alice Smith\n"
        "- **Referral-ID:** 8a7b6c5d-0000-4000-8000-000000000001\n"
        "\n"
        "[Openen in Partner Center]"
        "(https://crm.example.com/leads/8a7b6c5d-0000-4000-8000-000000000001)"
    )


@pytest.mark.parametrize(
    ("style", "expected"),
    [
        (
            EN,
            [
                "**Fabrikam Customer Inc** was not answered before its deadline; "
                "Partner Center archives it as expired.",
                "- **Deadline:** Sat, Oct 24, 2026, 8:00 PM UTC",
                "- **Time left:** expired 2h ago",
            ],
        ),
        (
            NL,
            [
                "**Fabrikam Customer Inc** is niet voor de deadline beantwoord; "
                "Partner Center archiveert de lead als verlopen.",
                "- **Deadline:** za 24 okt 2026, 22:00 CEST",
                "- **Resterende tijd:** 2u geleden verlopen",
            ],
        ),
    ],
)
def test_expired_notice(style: Style, expected: list[str]) -> None:
    body = render_alert(make_lead(remaining=timedelta(hours=-2)), EXPIRED, None, NOW, style).body
    for line in expected:
        assert line in body.splitlines()


@pytest.mark.parametrize(
    ("style", "resolution", "expected"),
    [
        (EN, "accepted", ["- **Outcome:** accepted", "no more reminders."]),
        (EN, "lost", ["- **Outcome:** lost"]),
        (NL, "declined", ["- **Uitkomst:** afgewezen", "geen herinneringen meer."]),
        (NL, "gone", ["- **Uitkomst:** niet meer in Partner Center"]),
    ],
)
def test_resolved_notice(style: Style, resolution: str, expected: list[str]) -> None:
    lead = make_lead(remaining=timedelta(days=2), resolution=resolution)
    body = render_alert(lead, RESOLVED, None, NOW, style).body
    for text in expected:
        assert text in body
    assert "Time left" not in body and "Resterende tijd" not in body


# --- time zones on both sides of a DST change -----------------------------------------------


@pytest.mark.parametrize(
    ("zone", "now", "deadline", "locale", "shown", "left"),
    [
        # Amsterdam: 03:00 CEST becomes 02:00 CET at 2026-10-25T01:00Z; 02:30 happens twice.
        (
            "Europe/Amsterdam",
            datetime(2026, 10, 24, 21, 30, tzinfo=UTC),
            datetime(2026, 10, 25, 0, 30, tzinfo=UTC),
            "nl-NL",
            "zo 25 okt 2026, 02:30 CEST",
            "3u",
        ),
        (
            "Europe/Amsterdam",
            datetime(2026, 10, 24, 21, 30, tzinfo=UTC),
            datetime(2026, 10, 25, 1, 30, tzinfo=UTC),
            "nl-NL",
            "zo 25 okt 2026, 02:30 CET",
            "4u",
        ),
        (
            "Europe/Amsterdam",
            datetime(2026, 10, 24, 21, 30, tzinfo=UTC),
            datetime(2026, 10, 25, 1, 30, tzinfo=UTC),
            "en-US",
            "Sun, Oct 25, 2026, 2:30 AM CET",
            "4h",
        ),
        # Los Angeles: 02:00 PDT becomes 01:00 PST at 2026-11-01T09:00Z; 01:30 happens twice.
        (
            "America/Los_Angeles",
            datetime(2026, 11, 1, 7, 0, tzinfo=UTC),
            datetime(2026, 11, 1, 8, 30, tzinfo=UTC),
            "en-US",
            "Sun, Nov 1, 2026, 1:30 AM PDT",
            "1h 30m",
        ),
        (
            "America/Los_Angeles",
            datetime(2026, 11, 1, 7, 0, tzinfo=UTC),
            datetime(2026, 11, 1, 9, 30, tzinfo=UTC),
            "en-US",
            "Sun, Nov 1, 2026, 1:30 AM PST",
            "2h 30m",
        ),
        (
            "America/Los_Angeles",
            datetime(2026, 11, 1, 7, 0, tzinfo=UTC),
            datetime(2026, 11, 1, 9, 30, tzinfo=UTC),
            "nl-NL",
            "zo 1 nov 2026, 01:30 PST",
            "2u 30m",
        ),
    ],
)
def test_deadlines_across_dst_name_the_zone(
    zone: str, now: datetime, deadline: datetime, locale: str, shown: str, left: str
) -> None:
    style = Style(locale=locale, timezone=zone)
    message = render_alert(make_lead(deadline=deadline), TIER, FINAL, now, style)
    assert f" {left}: " in message.title  # real time left, not the wall-clock difference
    assert shown in message.body
    assert when_text(deadline, zone, locale) == shown


def test_a_zone_without_an_abbreviation_is_named() -> None:
    moment = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
    assert (
        when_text(moment, "Asia/Dubai", "en-US") == "Sun, Mar 1, 2026, 12:00 PM Asia/Dubai (UTC+04)"
    )


# --- content rules ---------------------------------------------------------------------------


def test_notes_are_cut_at_280_characters() -> None:
    notes = "".join(chr(ord("a") + i % 26) for i in range(279)) + "X" + "Y" * 300
    body = render_alert(make_lead(notes=notes), TIER, FINAL, NOW, EN).body
    (line,) = [x for x in body.splitlines() if x.startswith("- **Notes:**")]
    assert line == f"- **Notes:** {notes[:280]}…"
    assert "Y" not in line


def test_short_notes_are_shown_whole_on_one_line() -> None:
    body = render_alert(make_lead(notes="Line one\nline   two"), TIER, FINAL, NOW, EN).body
    assert "- **Notes:** Line one line two" in body.splitlines()


def test_missing_fields_render_cleanly() -> None:
    lead = make_lead(value=None, currency="", team=[], notes="", solutions=(), products=())
    for style, expected in (
        (EN, ["- **Deal value:** not stated", "- **Assigned team:** nobody assigned"]),
        (NL, ["- **Dealwaarde:** niet opgegeven", "- **Toegewezen team:** niemand toegewezen"]),
    ):
        body = render_alert(lead, TIER, FINAL, NOW, style).body
        for line in expected:
            assert line in body.splitlines()
        assert "Notes" not in body and "Notities" not in body
        assert "Products" not in body and "Producten" not in body
        for junk in ("None", "[]", "()", "  "):
            assert junk not in body


def test_user_text_cannot_break_the_markdown() -> None:
    lead = make_lead(customer="*Star* _Under_ [x](http://evil.example) <b>Co</b>|`tick`")
    message = render_alert(lead, TIER, FINAL, NOW, EN)
    escaped = r"\*Star\* \_Under\_ \[x\](http://evil.example) \<b\>Co\</b\>\|\`tick\`"
    assert f"- **Customer:** {escaped}" in message.body
    # Email channels turn the Markdown into HTML (Apprise's converter): the name stays text.
    from apprise.conversion import markdown_to_html

    html = markdown_to_html(message.body)
    assert "*Star* _Under_ [x](http://evil.example) &lt;b&gt;Co&lt;/b&gt;|`tick`" in html
    assert "<b>Co" not in html and 'href="http://evil.example"' not in html


def test_titles_stay_short() -> None:
    lead = make_lead(customer="Very Long Customer Name " * 20)
    for kind, tier in ((TIER, FINAL), (EXPIRED, None), (RESOLVED, None)):
        title = render_alert(replace(lead, resolution="accepted"), kind, tier, NOW, EN).title
        assert len(title) < 120
        assert title.endswith("…")


def test_link_template_with_id_and_nothing_else_from_the_config() -> None:
    config = parse(
        config_text(
            channels='slack = "slack://TokenA/TokenB/TokenC/#sales"\n'
            'teams = "workflows://prod-01.westeurope.logic.azure.com:443/abc123/sigSECRET"'
        ).replace('notify = ["team", "nl"]', 'notify = ["team", "nl", "slack", "teams"]')
    )
    lead = make_lead(ref_id="id with/slash")
    for channel in ("team", "nl", "slack", "teams"):
        message = render_alert(lead, TIER, FINAL, NOW, style_for(config, channel))
        text = message.title + message.body
        assert (
            "https://partner.microsoft.com/dashboard/referrals/v2/leads/id%20with%2Fslash" in text
        )
        for secret in ("TokenA", "sigSECRET", "user:pass", "smtp.example.com", "127.0.0.1"):
            assert secret not in text


# --- Teams compact form and size limits ------------------------------------------------------


def worst_case_lead(index: int = 0) -> Lead:
    return make_lead(
        customer=f"Northwind Traders Worldwide Holding {index:02d} " + "Division " * 30,
        notes="*_[`<" * 2000,
        team=[
            {"firstName": f"Member{i}", "lastName": "Longname" * 3, "email": f"m{i}@example.com"}
            for i in range(30)
        ],
        solutions=tuple(f"Solution number {i} with a long name" for i in range(30)),
        products=tuple(f"PRODUCT-{i}" for i in range(30)),
        ref_id=f"8a7b6c5d-0000-4000-8000-{index:012d}",
    )


LONG_LINK = "https://partner.microsoft.com/dashboard/referrals/v2/leads/{id}?source=referral-watch"


@pytest.mark.parametrize("locale", ["en-US", "nl-NL"])
@pytest.mark.parametrize("kind", [TIER, EXPIRED, RESOLVED])
def test_teams_single_alert_fits_and_keeps_the_essentials(locale: str, kind: str) -> None:
    style = Style(locale=locale, timezone="Europe/Amsterdam", compact=True, max_length=TEAMS_MAX)
    style = replace(style, link_template=LONG_LINK)
    remaining = timedelta(hours=-1) if kind == EXPIRED else timedelta(hours=3, minutes=58)
    lead = replace(worst_case_lead(), deadline=NOW + remaining, resolution="accepted")
    message = render_alert(lead, kind, FINAL if kind == TIER else None, NOW, style)
    assert len(message.title) + len(message.body) <= TEAMS_MAX
    assert len(message.title) < 120
    assert "Northwind Traders Worldwide Holding 00" in message.title
    assert "Northwind Traders Worldwide Holding 00" in message.body
    assert LONG_LINK.replace("{id}", lead.id) + ")" in message.body
    if kind != RESOLVED:
        assert when_text(lead.deadline, "Europe/Amsterdam", locale) in message.body
    # essentials come first: deadline (or outcome) on the first line
    assert message.body.splitlines()[0].startswith(
        ("- **Deadline:**", "- **Uitkomst:**", "- **Outcome:**")
    )


def test_teams_single_alert_shows_notes_when_there_is_room() -> None:
    message = render_alert(make_lead(), TIER, FINAL, NOW, TEAMS)
    assert message.body == (
        "- **Deadline:** Sun, Oct 25, 2026, 1:58 AM UTC (3h 58m left)\n"
        "- **Customer:** Fabrikam Customer Inc\n"
        "- **Deal value:** 25,000 USD · Lead\n"
        "- **Assigned team:** Alice Smith\n"
        "- **Referral id:** 8a7b6c5d-0000-4000-8000-000000000001\n"
        "\n"
        "[Open in Partner Center](https://partner.microsoft.com/dashboard/referrals/v2/leads)\n"
        "\n"
        "- **Notes:** Wants to move 40 servers to Azure before year end."
    )


def forty_leads() -> list[Lead]:
    leads = [
        make_lead(
            customer=f"Customer {i:02d} " + "Incorporated " * (i % 4),
            remaining=timedelta(hours=3 + i),
            ref_id=f"lead-{i:02d}",
        )
        for i in range(40)
    ]
    return leads[::-1]  # the order given must not matter: most urgent first


@pytest.mark.parametrize("locale", ["en-US", "nl-NL"])
def test_teams_digest_of_40_leads_fits_with_most_urgent_first_and_the_count(locale: str) -> None:
    style = replace(TEAMS, locale=locale, link_template=LONG_LINK)
    message = render_digest(forty_leads(), TIER, URGENT, 0, NOW, style)
    assert len(message.title) + len(message.body) <= TEAMS_MAX
    assert message.title == (
        "40 leads need an answer within 2d"
        if locale == "en-US"
        else "40 leads hebben binnen 2d een antwoord nodig"
    )
    shown = [line for line in message.body.splitlines() if line.startswith("- **Customer")]
    assert len(shown) >= 8
    assert [line[4:15] for line in shown] == [f"Customer {i:02d}" for i in range(len(shown))]
    hidden = 40 - len(shown)
    more = f"…and {hidden} more leads." if locale == "en-US" else f"…en nog {hidden} leads."
    assert more in message.body.splitlines()
    # one link for the lot: the leads list, since the template names a single lead
    assert f"({render.DEFAULT_LINK})" in message.body


def test_digest_counts_leads_beyond_the_limit() -> None:
    leads = forty_leads()[-6:]  # Customer 05 ... Customer 00
    message = render_digest(leads, TIER, URGENT, 14, NOW, EN)
    assert message.title == "20 leads need an answer within 2d"
    assert message.body.splitlines()[0] == "Most urgent first."
    assert "…and 14 more leads." in message.body
    assert message.body.index("Customer 00") < message.body.index("Customer 05")


def test_digest_without_a_limit_lists_everything() -> None:
    style = replace(EN, link_template="https://crm.example.com/lead/{id}")
    message = render_digest(forty_leads(), TIER, URGENT, 0, NOW, style)
    assert "more lead" not in message.body
    first = message.body.splitlines()[2]
    assert first == (
        "- **Customer 00** · 25,000 USD · 3h left · due Sun, Oct 25, 2026, 1:00 AM UTC"
        " · [open](https://crm.example.com/lead/lead-00)"
    )
    assert message.body.count("[open](") == 40


def test_slack_digest_is_trimmed_to_fit_and_counts_the_rest() -> None:
    leads = [worst_case_lead(i) for i in range(50)]
    message = render_digest(leads, TIER, URGENT, 10, NOW, SLACK)
    assert len(message.title) + len(message.body) <= SLACK_MAX
    assert message.title == "60 leads need an answer within 2d"
    shown = sum(1 for line in message.body.splitlines() if line.startswith("- **"))
    match = re.search(r"…and (\d+) more leads\.", message.body)
    assert match is not None
    assert shown + int(match.group(1)) == 60


@pytest.mark.parametrize(
    ("kind", "style", "title", "line"),
    [
        (
            EXPIRED,
            EN,
            "3 leads expired unanswered",
            "- **Customer 00** · 25,000 USD · expired 2h ago",
        ),
        (
            EXPIRED,
            NL,
            "3 leads onbeantwoord verlopen",
            "- **Customer 00** · 25.000 USD · 2u geleden verlopen",
        ),
        (RESOLVED, EN, "3 leads were answered", "- **Customer 00** · 25,000 USD · accepted"),
        (RESOLVED, NL, "3 leads zijn beantwoord", "- **Customer 00** · 25.000 USD · geaccepteerd"),
        (
            TIER,
            replace(TEAMS, locale="nl-NL"),
            "3 leads hebben binnen 2d een antwoord nodig",
            "- **Customer 00** · 4u",
        ),
    ],
)
def test_digest_kinds(kind: str, style: Style, title: str, line: str) -> None:
    leads = [
        make_lead(
            customer=f"Customer {i:02d}",
            remaining=timedelta(hours=-2 + i) if kind == EXPIRED else timedelta(hours=4 + i),
            resolution="accepted" if kind == RESOLVED else None,
            ref_id=f"lead-{i}",
        )
        for i in range(3)
    ]
    message = render_digest(leads, kind, URGENT if kind == TIER else None, 0, NOW, style)
    assert message.title == title
    assert line in message.body.splitlines()


def test_a_single_lead_digest_uses_the_singular() -> None:
    assert render_digest([make_lead()], TIER, URGENT, 0, NOW, EN).title == (
        "1 lead needs an answer within 2d"
    )
    assert render_digest([make_lead()], TIER, None, 0, NOW, NL).title == (
        "1 lead heeft een antwoord nodig"
    )


@settings(max_examples=40, deadline=None)
@given(
    names=st.lists(st.text(min_size=1, max_size=300), min_size=1, max_size=60),
    notes=st.text(max_size=600),
    more=st.integers(min_value=0, max_value=5000),
    hours=st.integers(min_value=-400, max_value=400),
    locale=st.sampled_from(["en-US", "nl-NL"]),
)
def test_size_limits_always_hold(
    names: list[str], notes: str, more: int, hours: int, locale: str
) -> None:
    """Whatever the data, Teams and Slack messages stay within their limits."""
    leads = [
        make_lead(customer=name, notes=notes, remaining=timedelta(hours=hours + i), ref_id=f"l{i}")
        for i, name in enumerate(names)
    ]
    for style in (replace(TEAMS, locale=locale), replace(SLACK, locale=locale)):
        assert style.max_length is not None
        for message in (
            render_alert(leads[0], TIER, FINAL, NOW, style),
            render_alert(leads[0], EXPIRED, None, NOW, style),
            render_digest(leads, TIER, URGENT, more, NOW, style),
        ):
            assert len(message.title) + len(message.body) <= style.max_length
            assert len(message.title) < 120
        digest = render_digest(leads, TIER, URGENT, more, NOW, style)
        shown = sum(1 for line in digest.body.splitlines() if line.startswith("- **"))
        footer = [line for line in digest.body.splitlines() if line.startswith("…")]
        hidden = int(re.findall(r"\d+", footer[0])[0]) if footer else 0
        assert shown + hidden == len(leads) + more


# --- channel styles --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "compact", "max_length"),
    [
        ("workflows://prod-01.westeurope.logic.azure.com:443/abc/sig", True, TEAMS_MAX),
        ("workflow://prod-01.westeurope.logic.azure.com/abc/sig", True, TEAMS_MAX),
        ("powerautomate://example/abc/sig", True, TEAMS_MAX),
        (
            "https://prod-12.westeurope.logic.azure.com:443/workflows/abc/triggers/manual/paths/"
            "invoke?api-version=2016-06-01&sig=secret",
            True,
            TEAMS_MAX,
        ),
        (
            "https://default1234.56.environment.api.powerplatform.com/powerautomate/x",
            True,
            TEAMS_MAX,
        ),
        ("slack://TokenA/TokenB/TokenC/#sales", False, SLACK_MAX),
        ("https://hooks.slack.com/services/T000/B000/XXXX", False, SLACK_MAX),
        # render and delivery once disagreed on these two (issue 13 item 4): one rule now
        ("https://prod-1.westeurope.powerautomate.com/workflows/abc/x?sig=s", True, TEAMS_MAX),
        ("https://hooks.slack-gov.com/services/T000/B000/XXXX", False, SLACK_MAX),
        ("mailtos://user:pass@smtp.example.com?to=a@example.com", False, None),
        ("json://127.0.0.1:9/hook", False, None),
        ("https://example.com/logic.azure.com", False, None),
    ],
)
def test_style_for_channel_kinds(url: str, compact: bool, max_length: int | None) -> None:
    config = parse(config_text(channels=f'x = "{url}"'))
    style = style_for(config, "x")
    assert (style.compact, style.max_length) == (compact, max_length)


def test_style_for_locale_and_zone_per_channel_else_messages() -> None:
    config = parse(config_text())
    assert style_for(config, "team") == Style(
        locale="en-US",
        timezone="America/Los_Angeles",
        link_template="https://partner.microsoft.com/dashboard/referrals/v2/leads/{id}",
    )
    nl = style_for(config, "nl")
    assert (nl.locale, nl.timezone) == ("nl-NL", "Europe/Amsterdam")
    assert style_for(config, "not-a-channel").locale == "en-US"


def test_a_locale_without_a_catalog_gets_english_words_and_its_own_formats() -> None:
    lead = make_lead()
    german = render_alert(lead, TIER, FINAL, NOW, Style(locale="de-DE", timezone="Europe/Berlin"))
    assert german.title == "Lead expires in 3h 58m: Fabrikam Customer Inc"
    assert "- **Deal value:** 25.000 USD" in german.body
    unknown = render_alert(lead, TIER, FINAL, NOW, Style(locale="xx-YY"))
    assert "- **Deal value:** 25,000 USD" in unknown.body
    belgian = render_alert(lead, TIER, FINAL, NOW, Style(locale="nl-BE"))
    assert belgian.title.startswith("Lead verloopt over")


# --- test, ops and report wording ------------------------------------------------------------


def test_test_message_is_clearly_marked() -> None:
    en = render_test("team", NOW, EN)
    assert en.title == "TEST: referral-watch can reach this channel"
    assert en.body.startswith(
        "This is a test message from referral-watch for **team**, "
        "sent Sat, Oct 24, 2026, 10:00 PM UTC."
    )
    nl = render_test("team", NOW, NL)
    assert nl.title == "TEST: referral-watch kan dit kanaal bereiken"
    assert nl.body.startswith(
        "Dit is een testbericht van referral-watch voor **team**, "
        "verstuurd op zo 25 okt 2026, 00:00 CEST."
    )


@pytest.mark.parametrize(
    ("event", "style", "title", "texts"),
    [
        (
            "failing",
            EN,
            "referral-watch: polling Partner Center is failing",
            [
                "Polling Partner Center has failed 3 times in a row.",
                "Failing since Sat, Oct 24, 2026, 8:00 PM UTC (2 hours ago).",
                "Reason: sign-in expired: run referral-watch login",
            ],
        ),
        (
            "still_failing",
            NL,
            "referral-watch: Partner Center ophalen mislukt nog steeds",
            [
                "Partner Center ophalen is 3 keer achter elkaar mislukt.",
                "Mislukt sinds za 24 okt 2026, 22:00 CEST (2 uur geleden).",
                "Reden: sign-in expired: run referral-watch login",
            ],
        ),
        (
            "recovered",
            EN,
            "referral-watch: polling Partner Center works again",
            [
                "Polling Partner Center works again since Sat, Oct 24, 2026, 10:00 PM UTC.",
                "It had failed 3 times in a row.",
            ],
        ),
        (
            "dropped",
            NL,
            "referral-watch: een bericht is verwijderd",
            [
                "Een bericht kon een dag lang niet worden afgeleverd en is verwijderd.",
                "Details: sign-in expired: run referral-watch login",
            ],
        ),
    ],
)
def test_ops_messages(event: str, style: Style, title: str, texts: list[str]) -> None:
    reason = "sign-in expired: run referral-watch login"
    message = render_ops(event, reason, NOW, style, failures=3, since=NOW - timedelta(hours=2))
    assert message.title == title
    for text in texts:
        assert text in message.body.split("\n\n")


def test_ops_reason_is_escaped_and_unknown_events_are_refused() -> None:
    message = render_ops("dropped", "channel team_x: *boom*", NOW, TEAMS)
    assert r"channel team\_x: \*boom\*" in message.body
    with pytest.raises(ValueError, match="unknown operations event"):
        render_ops("exploded", "", NOW, EN)
    with pytest.raises(ValueError, match="unknown alert kind"):
        render_alert(make_lead(), "ops", None, NOW, EN)


def test_report_headings_are_localized() -> None:
    en = report_headings("en-US", timedelta(days=7))
    nl = report_headings("nl-NL", timedelta(days=7))
    assert en["title"] == "Partner Center referrals: the last 7d"
    assert nl["title"] == "Partner Center-referrals: de afgelopen 7d"
    assert set(en) == set(nl)
    assert all(en[key] != nl[key] for key in en)


# --- Jinja2 overrides ------------------------------------------------------------------------

CUSTOM = '''
title = "{{ customer }}: {{ time_left() }} ({{ money() }})"
body = """
{{ customer | md }} ({{ kind_text }}) is worth {{ money(deal_value, currency) }}.
Due {{ when(deadline) }}, {{ time_left(deadline) }} / {{ relative() }}.
{% for member in team %}- {{ member | md }}
{% endfor %}{{ link }}
"""
'''


def test_custom_tier_template_is_localized() -> None:
    config = parse(config_text(CUSTOM))
    assert check_templates(config) == []
    tier = config.policy.tier("final")
    assert tier is not None
    lead = make_lead(customer="Fabrikam_NL")
    nl = render_alert(lead, TIER, tier, NOW, style_for(config, "nl"))
    assert nl.title == "Fabrikam_NL: 3u 58m (25.000 USD)"
    assert nl.body == (
        "Fabrikam\\_NL (Lead) is worth 25.000 USD.\n"
        "Due zo 25 okt 2026, 02:58 CET, 3u 58m / over 4 uur.\n"
        "- Alice Smith\n"
        "https://partner.microsoft.com/dashboard/referrals/v2/leads/8a7b6c5d-0000-4000-8000-000000000001"
    )
    en = render_alert(lead, TIER, tier, NOW, style_for(config, "team"))
    assert en.title == "Fabrikam_NL: 3h 58m (25,000 USD)"
    assert "Due Sat, Oct 24, 2026, 6:58 PM PDT, 3h 58m / in 4 hours." in en.body


def test_custom_body_only_keeps_the_standard_title_and_respects_teams_limit() -> None:
    tier = TierConfig(
        name="final",
        remaining="12h",  # type: ignore[arg-type]
        notify=["team"],
        body="{% for i in range(500) %}{{ customer }} {% endfor %}",
    )
    message = render_alert(make_lead(), TIER, tier, NOW, TEAMS)
    assert message.title == "Lead expires in 3h 58m: Fabrikam Customer Inc"
    assert len(message.title) + len(message.body) <= TEAMS_MAX


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ('title = "{{ customer "', "policy.tiers[1].title: line 1: unexpected end of template"),
        ('body = "{% if %}x{% endif %}"', "policy.tiers[1].body: line 1: "),
        ('title = "{{ custmer }}"', "policy.tiers[1].title: 'custmer' is undefined"),
        ('body = "{{ deal_value + 1 }}"', "policy.tiers[1].body: TypeError"),
        ('title = "{{ money(1, 2, 3) }}"', "policy.tiers[1].title: TypeError"),
        ('title = "{% if false %}x{% endif %}"', "policy.tiers[1].title: renders as empty text"),
        (
            "title = \"{{ ''.__class__.__mro__ }}\"",
            "policy.tiers[1].title: unsafe template: access to attribute '__class__'",
        ),
        ("body = \"{{ 'x' * 100000000 }}\"", "policy.tiers[1].body: unsafe template: repetition"),
        ('body = "{{ [1] * 100000000 }}"', "policy.tiers[1].body: unsafe template: repetition"),
        ('body = "{{ 9 ** 9999999 }}"', "policy.tiers[1].body: unsafe template: exponent"),
    ],
)
def test_check_templates_reports_broken_templates_with_their_key(
    template: str, problem: str
) -> None:
    problems = check_templates(parse(config_text(template)))
    assert len(problems) == 1
    assert problems[0].startswith(problem)
    assert problems[0].endswith("(tier 'final')")


# Issue 20 item 10: resource bombs, each of which once passed check-config and then ran.
BOMBS = {
    "ljust": "{{ 'a'.ljust(10**9) }}",
    "center_filter": "{{ 'a' | center(1000000000) }}",
    "percent_width": "{{ '%400000000d' % 1 }}",
    "percent_star": "{{ '%*d' % (400000000, 1) }}",
    "format_filter": "{{ '%400000000d' | format(1) }}",
    "str_format": "{{ '{:>400000000}'.format(1) }}",
    "doubling": (
        "{% set ns = namespace(s='ab') %}{% for i in range(40) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}"
    ),
    "doubling_plus": (
        "{% set ns = namespace(s='ab') %}{% for i in range(40) %}"
        "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s | length }}"
    ),
    "list_doubling": (
        "{% set ns = namespace(l=[1]) %}{% for i in range(40) %}"
        "{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l | length }}"
    ),
    "extend_self": "{% set l = [1] %}{% for i in range(40) %}{{ l.extend(l) }}{% endfor %}x",
    "nested_range": (
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
    ),
    "nested_small": "{% for i in range(5000) %}{% for j in range(5000) %}{% endfor %}{% endfor %}x",
    "nested_strings": (
        "{% set s = 'a' * 10000 %}{% for i in s %}{% for j in s %}{% endfor %}{% endfor %}x"
    ),
    "replace": "{{ ('a' * 10000).replace('a', 'b' * 10000) }}",
    "expandtabs": "{{ ('\t' * 10000).expandtabs(10000) }}",
    "batch_fill": "{{ [1] | batch(1000000000, 0) | list | length }}",
    "big_number": (
        "{% set ns = namespace(n=10**100) %}{% for i in range(30) %}"
        "{% set ns.n = ns.n * ns.n %}{% endfor %}x"
    ),
    "output": "{% for i in range(9000) %}{{ 'x' * 9000 }}{% endfor %}",
    "lipsum": "{{ lipsum(n=100000) }}",
}


@pytest.mark.parametrize("bomb", sorted(BOMBS), ids=sorted(BOMBS))
def test_template_resource_bombs_are_refused_at_check_time_and_bounded_at_send_time(
    bomb: str,
) -> None:
    source = BOMBS[bomb]
    tier = TierConfig(
        name="final",
        remaining="12h",  # type: ignore[arg-type]
        notify=["team"],
        body=source,
    )
    problems = check_templates(parse(config_text(f"body = {json.dumps(source)}")))
    assert len(problems) == 1 and problems[0].startswith("policy.tiers[1].body: "), problems
    message = render_alert(make_lead(), TIER, tier, NOW, EN)  # the standard wording instead
    assert message.body.endswith("this is the standard wording._")
    assert len(message.body) < 5000


def test_templates_within_the_budget_still_work() -> None:
    source = (
        "{% for i in range(100) %}{% for j in range(50) %}.{% endfor %}{% endfor %}"
        "{{ '%8.2f' % 1234.5 }} {{ '{:>10}'.format(customer) }} {{ 'x' | center(30) }}"
        " {{ money(250000, 'USD') }} {{ '%d' % 250000 }} {{ '%s' | format(250000) }}"
    )
    assert check_templates(parse(config_text(f"body = {json.dumps(source)}"))) == []
    tier = TierConfig(name="final", remaining="12h", notify=["team"], body=source)  # type: ignore[arg-type]
    body = render_alert(make_lead(), TIER, tier, NOW, EN).body
    assert body.startswith("." * 5000) and "250,000 USD 250000 250000" in body


def test_sandbox_escape_fails_safely_at_send_time() -> None:
    tier = TierConfig(
        name="final",
        remaining="12h",  # type: ignore[arg-type]
        notify=["team"],
        title="{{ ''.__class__.__mro__ }}",
        body="{{ lead.__class__.__init__.__globals__ }}",
    )
    for style, note in (
        (EN, "The custom template for this reminder failed; this is the standard wording."),
        (NL, "Het eigen sjabloon voor deze herinnering werkte niet; dit is de standaardtekst."),
    ):
        message = render_alert(make_lead(), TIER, tier, NOW, style)
        standard = render_alert(make_lead(), TIER, FINAL, NOW, style)
        assert message.title == standard.title
        assert message.body == f"{standard.body}\n\n_{note}_"
        assert "class" not in message.body and "globals" not in message.body
    teams = render_alert(worst_case_lead(), TIER, tier, NOW, TEAMS)
    assert len(teams.title) + len(teams.body) <= TEAMS_MAX
    assert teams.body.endswith("this is the standard wording._")
    assert "[Open in Partner Center](" in teams.body


# --- the catalogs ----------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{(\w*)\}")
WORDING_MODULES = (
    "render/messages.py",
    "render/notices.py",
    "render/words.py",
    "render/claims.py",
    "render/i18n.py",
    "web/views.py",
    "web/answer.py",
    "web/claim.py",
)  # where msgids live
WORDING_TEMPLATES = "web/templates/*.html"  # the console's pages (Babel's jinja2 extractor)


def source_messages() -> set[str | tuple[str, ...]]:
    """Every msgid the wording modules use, as Babel's extractor (pybabel extract) finds them."""
    found: set[str | tuple[str, ...]] = set()
    for module in WORDING_MODULES:
        for _, message, _, _ in extract_from_file("python", str(PACKAGE / module)):
            found.add(message if isinstance(message, str) else tuple(message))
    for template in sorted(PACKAGE.glob(WORDING_TEMPLATES)):
        for _, message, _, _ in extract_from_file("jinja2", str(template)):
            found.add(message if isinstance(message, str) else tuple(message))
    return found


def load_catalog(path: Path, locale: str | None = "nl") -> Catalog:
    with path.open("rb") as handle:
        return read_po(handle, locale=locale)


def catalog_problems(catalog: Catalog, wanted: set[str | tuple[str, ...]]) -> list[str]:
    """Missing, empty, fuzzy or placeholder-dropping translations, and stale entries."""
    problems = []
    present = set()
    for message in catalog:
        if not message.id:
            continue
        key = message.id if isinstance(message.id, str) else tuple(message.id)
        present.add(key)
        ids = [key] if isinstance(key, str) else list(key)
        strings = [message.string] if isinstance(message.string, str) else list(message.string)
        placeholders = {name for text in ids for name in _PLACEHOLDER.findall(text)}
        if message.fuzzy:
            problems.append(f"{key!r}: fuzzy")
        for text in strings:
            if not text or not text.strip():
                problems.append(f"{key!r}: no translation")
            elif set(_PLACEHOLDER.findall(text)) != placeholders:
                problems.append(f"{key!r}: placeholders {_PLACEHOLDER.findall(text)}")
    problems += [f"{key!r}: missing from the catalog" for key in wanted - present]
    problems += [f"{key!r}: not used by the wording modules" for key in present - wanted]
    return problems


CATALOGS = sorted((PACKAGE / "locale").glob("*/LC_MESSAGES/messages.po"))


def test_dutch_is_shipped() -> None:
    assert NL_PO in CATALOGS


@pytest.mark.parametrize("path", CATALOGS, ids=lambda p: p.parent.parent.name)
def test_every_message_has_a_complete_translation(path: Path) -> None:
    wanted = source_messages()
    assert len(wanted) > 50
    catalog = load_catalog(path, locale=path.parent.parent.name)
    assert catalog_problems(catalog, wanted) == []


def test_the_catalog_check_catches_gaps() -> None:
    """The check above can fail: a doctored catalog shows each kind of gap."""
    catalog = load_catalog(NL_PO)
    catalog["Lead expires in {time_left}: {customer}"].string = "Lead verloopt: {customer}"
    catalog["Customer"].string = ""
    del catalog["Deadline"]
    catalog.add("Unused message", "Ongebruikt")
    problems = catalog_problems(catalog, source_messages())
    assert len(problems) == 4
    assert any("placeholders" in p for p in problems)
    assert any("no translation" in p for p in problems)
    assert any("'Deadline': missing" in p for p in problems)
    assert any("not used" in p for p in problems)


def test_the_template_for_translators_matches_the_code() -> None:
    pot = load_catalog(POT, locale=None)
    ids = {m.id if isinstance(m.id, str) else tuple(m.id) for m in pot if m.id}
    assert ids == source_messages(), (
        "run the pybabel extract command in docs/messages.md (Adding or changing a language)"
    )


def test_catalogs_are_packaged() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["referral_watch"]
    relative = NL_PO.relative_to(PACKAGE).as_posix()
    assert any(fnmatch(relative, pattern) for pattern in patterns)


def test_a_name_shared_by_a_solution_and_a_product_is_shown_once() -> None:
    lead = make_lead(solutions=("Microsoft365", "Teams Rooms"), products=("Microsoft365",))
    body = render.render_alert(lead, TIER, None, NOW, Style()).body
    line = next(x for x in body.splitlines() if "Products/solutions" in x)
    assert line.count("Microsoft365") == 1
    assert "Teams Rooms" in line


def test_template_problems_name_the_tier_as_the_file_orders_them() -> None:
    text = """
[auth]
method = "env"

[[policy.tiers]]
name = "final"
remaining = "12h"
notify = ["team"]
title = "{{ custmer }}"

[[policy.tiers]]
name = "new"
remaining = "14d"
notify = ["team"]

[channels]
team = "json://127.0.0.1:9/hook"
"""
    config = parse(text)
    assert [t.name for t in config.policy.tiers] == ["new", "final"]  # by severity
    (problem,) = check_templates(config)
    assert problem.startswith("policy.tiers[0].title: 'custmer' is undefined")


def test_the_wording_modules_stay_pure() -> None:
    """render and its parts import no I/O library (STYLE: the pure core), checked in a fresh
    interpreter so another test's imports cannot hide one."""
    import subprocess
    import sys

    code = (
        "import sys; import referral_watch.render.messages, referral_watch.render.report;"
        "import referral_watch.render.notices, referral_watch.render.template_check;"
        "bad = {'apprise', 'httpx', 'sqlite3', 'structlog', 'msal'} & set(sys.modules);"
        "print(sorted(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_slack_bodies_carry_no_backslash_escapes_and_no_live_mentions() -> None:
    """Issue 13 item 4: notes with *, _ or | arrived in Slack as \\*help\\*; Slack's own
    <!channel> from a customer must not become live (entities instead)."""
    config = parse(config_text(channels='x = "https://hooks.slack-gov.com/services/T0/B0/XX"'))
    lead = make_lead(customer="Ping <!channel>", notes="Need *help* with _licences_ | now")
    body = render_alert(lead, TIER, FINAL, NOW, style_for(config, "x")).body
    assert "*help*" in body and "_licences_" in body and "| now" in body
    assert "\\*" not in body and "\\_" not in body and "\\|" not in body
    assert "\\<!channel\\>" in body  # Apprise sends it to Slack as &lt;!channel&gt;
    email = render_alert(lead, TIER, FINAL, NOW, EN).body
    assert "\\*help\\*" in email  # Markdown channels keep their escaping


def test_assigned_team_shows_only_our_people_in_every_layout() -> None:
    """A referral's team holds every organization's people; with assignee_domains configured
    the messages name only ours (Microsoft's own sample team is just its seller)."""
    team = [
        {"firstName": "John", "lastName": "Doe", "email": "john.doe@microsoft.com"},
        {"firstName": "Jan", "lastName": "Bakker", "email": "jan@Contoso.example"},
    ]
    lead = make_lead(team=team)
    ours = ("contoso.example",)
    for style in (EN, TEAMS, SLACK):
        everyone = render_alert(lead, TIER, FINAL, NOW, style).body
        assert "John Doe" in everyone and "Jan Bakker" in everyone
        body = render_alert(lead, TIER, FINAL, NOW, replace(style, team_domains=ours)).body
        assert "Jan Bakker" in body and "John Doe" not in body
    microsoft_only = make_lead(team=team[:1])
    body = render_alert(microsoft_only, TIER, FINAL, NOW, replace(EN, team_domains=ours)).body
    assert "nobody assigned" in body and "John Doe" not in body
    templated = TierConfig(  # type: ignore[call-arg]
        name="final",
        remaining="12h",
        notify=["team"],
        body="{{ team|join(',') }}|{{ team_emails|join(',') }}",
    )
    message = render_alert(lead, TIER, templated, NOW, replace(EN, team_domains=ours))
    assert message.body.strip() == "Jan Bakker|jan@Contoso.example"


def test_style_for_names_the_channels_own_domains_else_all_channels() -> None:
    channels = (
        'owners = { url = "mailto://127.0.0.1:9?to=a@example.com", to_assignees = true, '
        'assignee_domains = ["Contoso.example", "@fabrikam.example"] }\n'
        'benelux = { url = "mailto://127.0.0.1:9?to=b@example.com", '
        'assignee_domains = ["nl.example"] }'
    )
    config = parse(config_text(channels=channels))
    assert style_for(config, "owners").team_domains == ("contoso.example", "fabrikam.example")
    assert style_for(config, "team").team_domains == (
        "contoso.example",
        "fabrikam.example",
        "nl.example",
    )
    assert style_for(parse(config_text()), "team").team_domains == ()
