"""The Take-it link in every alert form (SPEC 17), and Teams cards whose Accept, Decline, Take it
and Open are real buttons, as Apprise posts them to a loopback receiver."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from urllib.parse import urlsplit

import pytest
from test_render import NOW, SLACK, TEAMS, make_lead

from referral_watch.config import ChannelConfig
from referral_watch.model import TIER, Claim, Lead
from referral_watch.notify import Notifier
from referral_watch.render.channels import Style
from referral_watch.render.messages import render_alert, render_digest

from receivers import WebhookReceiver

BASE = "https://watch.contoso.example"
ON = {"answer_base": BASE, "claim_base": BASE}
CARD = replace(TEAMS, markup="teams", **ON)  # as style_for makes it for a Teams workflow


def claim_url(lead: Lead) -> str:
    return f"{BASE}/leads/{lead.id}/claim"


def claimed(lead: Lead, name: str = "Ann de Vries") -> Lead:
    claim = Claim(
        lead.id,
        "ann@contoso.example",
        name,
        NOW - timedelta(hours=2),
        NOW + timedelta(days=2),
        "alert",
    )
    return replace(lead, claim=claim)


@pytest.mark.parametrize("style", [SLACK, Style()], ids=["slack", "email"])
def test_a_tier_alert_offers_take_it_beside_accept_and_decline(style: Style) -> None:
    lead = make_lead()
    body = render_alert(lead, TIER, None, NOW, replace(style, **ON)).body
    line = body.splitlines()[-1]
    assert f"[Take it]({claim_url(lead)})" in line
    assert line.index("[Decline]") < line.index("[Take it]")  # beside Accept and Decline
    assert "?" not in claim_url(lead) and "token" not in line  # plain: no secret in it


def test_no_take_it_without_claims_or_the_console_and_none_on_notices() -> None:
    lead = make_lead()
    off = render_alert(lead, TIER, None, NOW, replace(SLACK, answer_base=BASE)).body
    assert "/claim" not in off and "[Accept]" in off
    for kind in ("expired", "resolved"):
        notice = render_alert(
            replace(lead, resolution="accepted"), kind, None, NOW, replace(SLACK, **ON)
        )
        assert "/claim" not in notice.body


def test_a_claimed_lead_offers_take_over_except_to_its_owner() -> None:
    lead = claimed(make_lead())
    team = render_alert(lead, TIER, None, NOW, replace(SLACK, **ON)).body
    assert f"[Take over]({claim_url(lead)})" in team
    assert "Taken by **Ann de Vries**" in team  # the alert names the owner
    owner = render_alert(lead, TIER, None, NOW, replace(Style(), owner_channel=True, **ON)).body
    assert "/claim" not in owner  # the owner holds it already
    assert "[Accept]" in owner


def test_digests_carry_take_it_per_lead() -> None:
    leads = [make_lead(ref_id=f"8a7b6c5d-0000-4000-8000-00000000000{n}") for n in range(3)]
    leads[2] = claimed(leads[2])
    body = render_digest(leads, TIER, None, 0, NOW, replace(SLACK, **ON)).body
    for lead in leads[:2]:
        assert f"[take it]({claim_url(lead)})" in body
    assert f"[take over]({claim_url(leads[2])})" in body


def test_dutch_says_oppakken() -> None:
    lead = make_lead()
    body = render_alert(lead, TIER, None, NOW, replace(SLACK, locale="nl-NL", **ON)).body
    assert f"[Oppakken]({claim_url(lead)})" in body


def test_a_teams_alert_has_four_buttons_and_leaves_the_links_out_of_its_text() -> None:
    lead = make_lead()
    message = render_alert(lead, TIER, None, NOW, CARD)
    assert [label for label, _ in message.actions] == [
        "Accept",
        "Decline",
        "Take it",
        "Open in Partner Center",
    ]
    assert message.actions[2] == ("Take it", claim_url(lead))
    assert "/answer?action=" not in message.body and "/claim" not in message.body
    plain = render_alert(lead, TIER, None, NOW, replace(SLACK, **ON))
    assert plain.actions == ()  # Slack and email keep links


def test_a_teams_alert_with_nothing_to_do_but_open_keeps_its_link() -> None:
    lead = make_lead()
    message = render_alert(lead, TIER, None, NOW, replace(TEAMS, markup="teams"))
    assert message.actions == ()
    assert "[Open in Partner Center](" in message.body


# --- the card as Apprise posts it --------------------------------------------------------------

TEAMS_LIMIT = (
    28 * 1024
)  # "Message size limit" of a Teams card: https://learn.microsoft.com/en-us/connectors/teams/


def a_long_lead() -> Lead:
    """Every field at its longest, in characters that JSON escapes to six or twelve bytes."""
    many = [
        {"email": f"person{n}@contoso.example", "firstName": "Ünïcödé" * 5, "lastName": "🚀" * 20}
        for n in range(30)
    ]
    return make_lead(
        customer="Ćóñtöşő 🚀 " * 40,
        notes='ü"\\<>&' * 2000,
        team=many,
        solutions=tuple("Śolution " * 30 + str(n) for n in range(30)),
        products=tuple("PRØDUCT-" * 20 + str(n) for n in range(30)),
        ref_id="8a7b6c5d-0000-4000-8000-" + "9" * 200,
    )


def test_apprise_posts_a_card_with_the_four_buttons_within_the_size_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lead = a_long_lead()
    message = render_alert(lead, TIER, None, NOW, CARD)
    with WebhookReceiver(tls=True) as teams:  # the Workflows plugin speaks only https
        assert teams.ca_path is not None
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", teams.ca_path)
        url = f"workflows://127.0.0.1:{teams.port}/0a1b2c3d4e5f/sigSECRETsig"
        result = Notifier({"team": ChannelConfig(url=url)}).send("team", message)
        assert result.ok, result.error
        [request] = teams.wait_for(1)
    assert urlsplit(request.path).path == "/workflows/0a1b2c3d4e5f/triggers/manual/paths/invoke"
    assert len(request.body) < TEAMS_LIMIT
    card = request.json["attachments"][0]["content"]
    buttons = [(a["type"], a["title"], a["url"]) for a in card["actions"]]
    assert buttons == [
        ("Action.OpenUrl", "Accept", f"{BASE}/leads/{lead.id}/answer?action=accept"),
        ("Action.OpenUrl", "Decline", f"{BASE}/leads/{lead.id}/answer?action=decline"),
        ("Action.OpenUrl", "Take it", claim_url(lead)),
        ("Action.OpenUrl", "Open in Partner Center", message.actions[3][1]),
    ]
    texts = {block["id"]: block["text"] for block in card["body"]}
    assert texts["title"] == message.title
    assert "Ćóñtöşő" in texts["body"] and "sigSECRETsig" not in request.body.decode()


def test_a_lead_too_long_for_buttons_keeps_links_instead() -> None:
    lead = make_lead(ref_id="x" * 3000)
    message = render_alert(lead, TIER, None, NOW, CARD)
    assert message.actions == ()
    assert "[Open in Partner Center](" in message.body


def test_the_dry_run_shows_a_cards_buttons_as_links() -> None:
    from referral_watch.dry_run import PreviewSender

    lead = make_lead()
    message = render_alert(lead, TIER, None, NOW, CARD)
    sender = PreviewSender({"team": ChannelConfig(url="workflows://h.logic.azure.com/a/b")})
    assert sender.send("team", message).ok
    [preview] = sender.previews
    assert f"[Take it]({claim_url(lead)})" in preview.body
    assert "[Accept](" in preview.body and "[Open in Partner Center](" in preview.body
