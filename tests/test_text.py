"""Issue 19: text from Partner Center is data, in every channel, the terminal and spreadsheets.

The table runs hostile samples through each output a person sees (email/webhook Markdown, the
Teams card, Slack after Apprise's own Markdown-to-mrkdwn step, the `status` table, the text and
CSV reports); the end-to-end test sends a hostile referral from the sandbox through `run --once`
to a real webhook receiver, a real SMTP server and intercepted Slack/Teams requests, and reads
`status` through a pseudo-terminal; hypothesis feeds arbitrary Unicode into every text field.
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
import pty
import re
import subprocess
import sys
import unicodedata
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict

from referral_watch.config import TierConfig
from referral_watch.config.loader import parse_config
from referral_watch.model import EXPIRED, RESOLVED, TIER, Lead, parse_referral
from referral_watch.render import status_view
from referral_watch.render.channels import SLACK_MAX, TEAMS_MAX, Style
from referral_watch.render.messages import render_alert, render_digest
from referral_watch.render.report import format_csv, format_text, summarize
from referral_watch.sandbox.records import make_referral
from referral_watch.text import (
    clean_line,
    clean_notes,
    csv_cell,
    currency_code,
    escape_slack,
    md,
    terminal,
    visible,
)

from conftest import World
from receivers import SmtpReceiver

NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
EMAIL = Style()  # email, JSON webhooks: Markdown bodies, plain titles
TEAMS = Style(compact=True, max_length=TEAMS_MAX, markup="teams")
SLACK = Style(max_length=SLACK_MAX, markup="slack")
TIER_NEW = TierConfig(name="new", remaining="14d", notify=["team"])  # type: ignore[arg-type]


def forbidden(text: str) -> list[str]:
    """Characters that must never reach an output: controls (but the line break), bidi
    overrides and isolates, zero-width hiding characters, lone surrogates."""
    bad = set()
    for char in text:
        code = ord(char)
        if (
            (unicodedata.category(char) == "Cc" and char != "\n")
            or 0x202A <= code <= 0x202E
            or 0x2066 <= code <= 0x2069
            or char in "\u200b\u2060\ufeff"
            or 0xD800 <= code <= 0xDFFF
        ):
            bad.add(f"U+{code:04X}")
    return sorted(bad)


def slack_mrkdwn(body: str) -> str:
    """What Slack receives for our Markdown: Apprise's own conversion (the real one)."""
    from apprise.plugins.slack import NotifySlack

    return str(NotifySlack._commonmark_to_slack(body))


def planted_link(markdown: str) -> bool:
    """A Markdown link or image (or an autolink) to evil.example that a renderer would make live."""
    return bool(re.search(r"(?<!\\)\]\(\s*https?://evil|(?<!\\)<https?://evil", markdown))


def live_slack(text: str) -> list[str]:
    """Slack control sequences that would ping or link: <!channel>, <!here>, <@U...>, <http...>."""
    return re.findall(r"<[!@#][^>]*>|<https?://evil[^>]*>", text)


def lead_of(**fields: Any) -> Lead:
    created = NOW - timedelta(days=2)
    referral = parse_referral(make_referral(created=created, **fields))
    return Lead(referral, created + timedelta(days=14), created, NOW)


# --- the sanitising step, case by case ------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "line", "notes"),
    [
        ("Evil\x1b[2J\x1b]0;pwned\x07 Co", "Evil<U+001B>[2J<U+001B>]0;pwned<U+0007> Co", None),
        ("Nul\x00Co", "NulCo", "NulCo"),
        ("Invoice \u202eexe.pdf", "Invoice <U+202E>exe.pdf", None),
        ("a\u2066b\u2069c\u202ad", "a<U+2066>b<U+2069>c<U+202A>d", None),
        ("Micro\u200dsoft \u200bSupport\ufeff", "Microsoft Support", None),
        ("C1 \x9b31m next", "C1 <U+009B>31m next", None),
        ("lone \ud800 surrogate", "lone <U+D800> surrogate", None),
        ("line\nbreak\ttab\r\nend", "line break tab end", "line\nbreak\ttab\nend"),
        ("sep\u2028para\u2029end", "sep para end", "sep\npara\nend"),
        # legitimate text stays exactly as it is
        ("Bakkerij 't Hoekje & Zn. B.V.", "Bakkerij 't Hoekje & Zn. B.V.", None),
        ("شركة الاتصالات السعودية", "شركة الاتصالات السعودية", None),
        ("می\u200cخواهم", "می\u200cخواهم", None),  # Persian needs its zero-width non-joiner
        ("👨\u200d👩\u200d👧 Family 🚀 Café", "👨\u200d👩\u200d👧 Family 🚀 Café", None),
        ("🏳️\u200d🌈 Pride BV", "🏳️\u200d🌈 Pride BV", None),
    ],
)
def test_the_sanitising_step(raw: str, line: str, notes: str | None) -> None:
    assert clean_line(raw) == line
    assert clean_notes(raw) == (line if notes is None else notes)
    assert visible(visible(raw)) == visible(raw)  # idempotent: safe to apply twice
    assert forbidden(clean_line(raw)) == []
    assert forbidden(clean_notes(raw).replace("\t", "")) == []


def test_over_long_fields_are_clipped_and_the_raw_record_kept() -> None:
    name, notes = "N" * 1_000_000, "n" * 1_000_000
    lead = lead_of(customer=name, notes=notes)
    assert len(lead.referral.customer) == 200 and lead.referral.customer.endswith("…")
    assert len(lead.referral.notes) == 10_000
    raw = json.loads(lead.referral.raw)
    assert raw["customerProfile"]["name"] == name  # the record as Partner Center sent it
    body = render_alert(lead, TIER, TIER_NEW, NOW, EMAIL).body
    (shown,) = [line for line in body.splitlines() if line.startswith("- **Notes:**")]
    assert len(shown.removeprefix("- **Notes:** ")) == 281  # 280 shown, then "…"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("USD", "USD"),
        ("eur", "EUR"),
        (" chf ", "CHF"),
        ("usd [pay now](https://evil.example/x)\n\n# <!channel>", ""),
        ("ZZZ", ""),  # three letters, but no ISO 4217 currency
        ("US", ""),
        ("€", ""),
        ("", ""),
    ],
)
def test_currency_codes_are_iso_4217_or_left_out(raw: str, code: str) -> None:
    assert currency_code(raw) == code


def test_an_injected_currency_never_reaches_a_message() -> None:
    hostile = "usd [pay now](https://evil.example/x)\n\n# <!channel>"
    lead = lead_of(currency=hostile, deal_value=25000)
    assert lead.referral.currency == ""
    for style in (EMAIL, TEAMS, SLACK):
        message = render_alert(lead, TIER, TIER_NEW, NOW, style)
        text = message.title + "\n" + message.body
        assert "evil.example" not in text and "channel" not in text.lower()
        assert "- **Deal value:** 25,000\n" in message.body + "\n" or "25,000 · " in message.body


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        ('=HYPERLINK("http://evil.example")', '\'=HYPERLINK("http://evil.example")'),
        ("+1 555", "'+1 555"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1", "<U+0009>=1"),
        ("ann@contoso.com", "ann@contoso.com"),
        ("EUR", "EUR"),
        (-5, -5),  # numbers are values, not formulas
        (12.5, 12.5),
    ],
)
def test_csv_cells_cannot_start_a_formula(value: object, cell: object) -> None:
    assert csv_cell(value) == cell


def test_slack_escaping_uses_no_backslash_for_emphasis_and_keeps_mentions_dead() -> None:
    """Issue 13 item 4: notes with *, _ or | arrived in Slack as \\*help\\*."""
    text = "*help* _now_ | pipe <!channel> <!here> <@U024BE7LH> <http://x|y> a & b"
    sent = slack_mrkdwn(escape_slack(text))
    assert "\\*" not in sent and "\\_" not in sent and "\\|" not in sent
    assert live_slack(sent) == []
    assert "&lt;!channel&gt;" in sent and "&lt;@U024BE7LH&gt;" in sent and "a &amp; b" in sent
    # A backslash of the text right before '<' cannot swallow the escape.
    assert live_slack(slack_mrkdwn(escape_slack("\\<!channel\\>"))) == []
    assert md("*x* [y](z)") == "\\*x\\* \\[y\\](z)"  # Markdown channels keep backslashes


# --- the table: hostile samples in every output ----------------------------------------------

HOSTILE = {
    "ansi_csi": "Evil\x1b[2J\x1b[31m Co",
    "ansi_osc_bel": "Evil\x1b]0;pwned\x07 Co",
    "nul": "Nul\x00 Byte Co",
    "rlo": "Invoice \u202eexe.pdf Co",
    "isolate": "Iso\u2066late\u2069 Co",
    "zwj_spoof": "Micro\u200dsoft Co",
    "channel": "<!channel> Co",
    "here": "<!here> Co",
    "user": "<@U024BE7LH> Co",
    "slack_link": "<http://evil.example|Open in Partner Center>",
    "teams_mention": "<at>ceo@contoso.com</at> Co",
    "md_link": "[click](http://evil.example)",
    "md_image": "![x](http://evil.example/p.png)",
    "html": '<img src="http://evil.example/p.png"> Co',
    "formula": '=HYPERLINK("http://evil.example")',
    "huge": "A" * 1_000_000,
}
LEGIT = {
    "dutch": "Bakkerij 't Hoekje & Zn. B.V.",
    "arabic": "شركة الاتصالات السعودية",
    "emoji": "Café 🚀 👨\u200d👩\u200d👧 Co",
}


def outputs(lead: Lead) -> dict[str, str]:
    """Every form a person sees of one lead (titles and bodies)."""
    forms: dict[str, str] = {}
    for name, style in (("email", EMAIL), ("teams", TEAMS), ("slack", SLACK)):
        for kind in (TIER, EXPIRED, RESOLVED):
            message = render_alert(lead, kind, TIER_NEW, NOW, style)
            body = slack_mrkdwn(message.body) if name == "slack" else message.body
            # Apprise sends a Slack title as plain text with &, <, > as entities (the end to
            # end test below sees it do so).
            title = html.escape(message.title, quote=False) if name == "slack" else message.title
            forms[f"{name}.{kind}.title"] = title
            forms[f"{name}.{kind}.body"] = body
        digest = render_digest([lead, lead], TIER, TIER_NEW, 0, NOW, style)
        forms[f"{name}.digest"] = slack_mrkdwn(digest.body) if name == "slack" else digest.body
    config = parse_config(BASE_CONFIG)
    forms["terminal.status"] = status_view.table([lead], config, NOW, None)
    forms["terminal.explain"] = status_view.explain(lead, config, NOW)
    summary = summarize([lead], NOW, timedelta(days=7))
    forms["terminal.report"] = format_text(summary)
    forms["csv"] = format_csv(summary)
    return forms


BASE_CONFIG = """
[auth]
method = "env"
token_env = "X"
[[policy.tiers]]
name = "new"
remaining = "14d"
notify = ["team"]
[channels]
team = "json://127.0.0.1:9/hook"
"""


@pytest.mark.parametrize("sample", sorted(HOSTILE), ids=sorted(HOSTILE))
def test_a_hostile_customer_name_and_note_are_data_in_every_output(sample: str) -> None:
    text = HOSTILE[sample]
    member = {"firstName": text, "lastName": "", "email": "ann@contoso.com"}
    lead = lead_of(customer=text, notes=f"Please call. {text} Thanks.", team=[member])
    for where, shown in outputs(lead).items():
        assert forbidden(shown) == [], where
        if where.startswith(("email", "teams")) and ".title" not in where:
            assert not planted_link(shown), (where, shown)
            assert not re.search(r"(?<!\\)<(at|img)\b", shown), where
        if where.startswith("slack"):
            assert live_slack(shown) == [], (where, shown)
            assert "\\*" not in shown, where
        if where.startswith("teams") and where.endswith(".title"):
            assert not planted_link(shown), (where, shown)
        assert len(shown) < 20_000, where  # the 1 MB name is clipped everywhere
    rows = list(csv.reader(io.StringIO(outputs(lead)["csv"])))
    assert all(not cell.startswith(("=", "+", "-", "@")) for row in rows for cell in row)


@pytest.mark.parametrize("sample", sorted(LEGIT), ids=sorted(LEGIT))
def test_legitimate_names_stay_intact(sample: str) -> None:
    text = LEGIT[sample]
    lead = lead_of(customer=text, notes=text)
    forms = outputs(lead)
    assert lead.referral.customer == text
    assert text in forms["email.tier.title"] and text in forms["teams.tier.title"]
    assert html.escape(text, quote=False) in forms["slack.tier.title"]  # Slack shows it as is
    assert text in forms["terminal.status"] or text[:31] in forms["terminal.status"]
    assert text in forms["terminal.report"]
    assert md(text) in forms["email.tier.body"]


def test_a_formula_in_an_assignee_is_defused_in_the_csv_report() -> None:
    team = [{"firstName": "x", "email": '=HYPERLINK("http://evil.example")@contoso.com'}]
    summary = summarize([lead_of(team=team)], NOW, timedelta(days=7))
    rows = list(csv.DictReader(io.StringIO(format_csv(summary))))
    (assignee,) = [row for row in rows if row["metric"] == "open_per_assignee"]
    assert assignee["key"].startswith("'=hyperlink")  # assignees are counted lower-case


def test_terminal_keeps_line_breaks_and_shows_the_rest() -> None:
    assert terminal("a\x1b[2J\nb\x07") == "a<U+001B>[2J\nb<U+0007>"


# --- hypothesis: arbitrary Unicode in every text field ----------------------------------------

TEXT_FIELDS = st.text(
    alphabet=st.characters(codec=None, exclude_categories=()), min_size=0, max_size=40
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(*(["\x1b]0;x\x07\ud800\u202e\x00"] * 8))  # the worst of each kind, every run
@given(
    customer=TEXT_FIELDS,
    notes=TEXT_FIELDS,
    member=TEXT_FIELDS,
    currency=TEXT_FIELDS,
    status=TEXT_FIELDS,
    product=TEXT_FIELDS,
    name=TEXT_FIELDS,
    ref_id=TEXT_FIELDS,
)
def test_no_control_character_reaches_any_output(
    customer: str,
    notes: str,
    member: str,
    currency: str,
    status: str,
    product: str,
    name: str,
    ref_id: str,
) -> None:
    record = make_referral(
        created=NOW - timedelta(days=3),
        customer=customer or "x",
        notes=notes,
        currency=currency,
        status=status,
        team=[{"firstName": member, "lastName": member, "email": f"{member}@contoso.com"}],
    )
    record["name"] = name
    record["id"] = "rw-" + ref_id
    record["details"]["requirements"]["products"] = [{"id": product or "p"}]
    record["details"]["requirements"]["solutions"] = [{"id": product or "s", "name": product}]
    referral = parse_referral(record)
    lead = Lead(referral, NOW + timedelta(hours=5), NOW - timedelta(days=3), NOW)
    for where, shown in outputs(lead).items():
        assert forbidden(shown) == [], where


# --- end to end: sandbox -> run --once -> every channel, and status on a terminal -------------


class Intercepted:
    """Slack and Teams at requests' transport; loopback (the JSON receiver) goes through."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[tuple[str, Any]] = []
        real = HTTPAdapter.send

        def send(adapter: HTTPAdapter, request: requests.PreparedRequest, **kw: Any) -> Any:
            url = request.url or ""
            if url.startswith("http://127.0.0.1"):
                return real(adapter, request, **kw)
            body = request.body or b""
            self.sent.append((url, json.loads(body)))
            response = requests.Response()
            response.status_code = 202 if "logic.azure.com" in url else 200
            response._content = b"ok"
            response.headers = CaseInsensitiveDict({"Content-Type": "text/plain"})
            response.url, response.request, response.encoding = url, request, "utf-8"
            return response

        monkeypatch.setattr(HTTPAdapter, "send", send)

    def to(self, host: str) -> list[Any]:
        return [payload for url, payload in self.sent if host in url]


SLACK_URL = "slack://T1JJ3T3L2/A1BRTD4JD/TIiajkdnlazkcOXrIdevi7/#sales"
TEAMS_URL = "workflows://prod-42.westeurope.logic.azure.com:443/643e69f83c89444/KODuebWbDGYFr0z0"
E2E_HOSTILE = "Evil\x1b[2J\x1b]0;pwned\x07 <!channel> \u202eCo\x00"
E2E_NOTES = (
    "Ping <!here> and <@U024BE7LH>, see [Open in Partner Center](http://evil.example) "
    "![x](http://evil.example/p.png) <http://evil.example|here> *help* _now_ | \u2066x\u2069"
)


def test_a_hostile_referral_end_to_end(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Intercepted(monkeypatch)
    with SmtpReceiver() as smtp:
        world.channels = {
            "mail": smtp.mailto_url(to="sales@example.com"),
            "slack": SLACK_URL,
            "teams": TEAMS_URL,
        }
        world.tiers = (
            '[[policy.tiers]]\nname = "new"\nremaining = "14d"\n'
            'notify = ["team", "mail", "slack", "teams"]\n'
        )
        world.add_lead(age=timedelta(hours=1), customer=E2E_HOSTILE, notes=E2E_NOTES)
        for name in LEGIT.values():
            world.add_lead(age=timedelta(hours=2), customer=name, notes="Gewoon een notitie.")
        result = world.cli("run", "--once")
        assert result.code == 0, result.out + result.err
        mails = smtp.wait_for(4)

    hooks = [f"{b['title']}\n{b['message']}" for b in world.team.bodies]
    slack = [json.dumps(p, ensure_ascii=False) for p in fake.to("slack.com")]
    teams = [json.dumps(p, ensure_ascii=False) for p in fake.to("logic.azure.com")]
    mail_text = [f"{m.subject}\n{m.text}\n{m.html}".replace("\r\n", "\n") for m in mails]
    assert len(hooks) == len(slack) == len(teams) == len(mail_text) == 4

    for text in hooks + mail_text + [json.loads(s)["attachments"][0]["text"] for s in slack]:
        assert forbidden(text) == []
    for payload in fake.to("slack.com") + fake.to("logic.azure.com"):
        assert forbidden(json.dumps(payload, ensure_ascii=False)) == []
    for text in slack:
        assert live_slack(json.loads(text)["attachments"][0]["text"]) == []
        assert "\\\\*" not in text  # no backslash escapes in Slack (issue 13 item 4)
    hostile_slack = next(s for s in slack if "pwned" in s)
    assert "_help_" in hostile_slack or "*help*" in hostile_slack
    for text in hooks + teams:
        assert not planted_link(text.replace("\\\\", "\\"))
        assert "<at>" not in text
    for mail in mails:
        assert 'href="http://evil' not in mail.html and 'src="http://evil' not in mail.html
        assert forbidden(mail.subject) == []
    for name in LEGIT.values():  # legitimate names arrive exactly as written
        assert any(name in m.subject for m in mails)
        slack_name = html.escape(name, quote=False)  # Slack shows its entities as & < >
        assert any(slack_name in json.loads(s)["attachments"][0]["title"] for s in slack)
        assert any(name in b["title"] for b in world.team.bodies)

    status = status_through_a_terminal(world)
    assert "\x1b" not in status and "\x07" not in status and "\u202e" not in status
    assert "Evil<U+001B>[2J<U+001B>]0;pwned" in status  # shown, not obeyed
    for name in LEGIT.values():
        assert name[:31] in status


def status_through_a_terminal(world: World) -> str:
    """`referral-watch status` with a pseudo-terminal as its stdout, as an operator sees it."""
    world.write_config()
    controller, child = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "referral_watch", "--config", str(world.config_path), "status"],
        stdout=child,
        stderr=subprocess.DEVNULL,
        env={**os.environ},
    )
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout=30)
    os.close(controller)
    assert process.returncode == 0
    return b"".join(chunks).decode("utf-8").replace("\r\n", "\n")


def test_console_log_lines_show_partner_center_text_without_obeying_it() -> None:
    import structlog

    from referral_watch import logs

    out = io.StringIO()
    logs.configure("console", stream=out)
    structlog.get_logger("t").error("referral.malformed", customer=E2E_HOSTILE, reason="a\x07b")
    line = out.getvalue()
    assert forbidden(line) == [] and "Evil<U+001B>[2J" in line and "a<U+0007>b" in line


def test_the_md_filter_in_a_template_escapes_for_the_channel() -> None:
    tier = TierConfig(
        name="new",
        remaining="14d",  # type: ignore[arg-type]
        notify=["team"],
        body="{{ customer | md }} / {{ md(notes_excerpt) }}",
    )
    lead = lead_of(customer="<!channel> *Fab*", notes="[x](http://evil.example)")
    slack = render_alert(lead, TIER, tier, NOW, SLACK).body
    teams = render_alert(lead, TIER, tier, NOW, TEAMS).body
    assert slack == "\\<!channel\\> *Fab* / \\[x\\](http://evil.example)"
    assert live_slack(slack_mrkdwn(slack)) == [] and "\\*" not in slack_mrkdwn(slack)
    assert teams == "\\<!channel\\> \\*Fab\\* / \\[x\\](http://evil.example)"
    assert not planted_link(teams)


def test_silence_and_errors_print_partner_center_text_made_visible(world: World) -> None:
    lead = world.add_lead(age=timedelta(hours=1), customer=E2E_HOSTILE)
    assert world.cli("run", "--once").code == 0
    silenced = world.cli("silence", lead, "--for", "1d")
    assert silenced.code == 0, silenced.err
    assert forbidden(silenced.out) == [] and "Evil<U+001B>[2J" in silenced.out
    explained = world.cli("status", "--explain", lead)
    assert forbidden(explained.out) == [] and "<U+202E>Co" in explained.out
