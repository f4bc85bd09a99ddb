"""Delivery through Apprise: real webhook and SMTP receivers, Teams and Slack at the HTTP edge."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict

from referral_watch.config import ChannelConfig
from referral_watch.model import Message
from referral_watch.notify import (
    MSTEAMS_ADVICE,
    Delivery,
    Notifier,
    channel_kind,
    check_channels,
    redact_url,
    register_console_target,
)

from conftest import free_port
from receivers import SmtpReceiver, WebhookReceiver

CUSTOMER = "Fabrikam Customer Inc"
DEADLINE = "14 Mar 2025 09:30 UTC"
LINK = "https://partner.microsoft.com/dashboard/referrals/v2/leads/3e1c0a4f-77b2"
MESSAGE = Message(
    title=f"Lead expires in 3h 58m: {CUSTOMER}",
    body=(
        f"**Customer:** {CUSTOMER}\n\n"
        "**Deal value:** 25,000 USD\n\n"
        f"**Deadline:** {DEADLINE} (3h 58m left)\n\n"
        "**Referral:** 3e1c0a4f-77b2\n\n"
        f"[Open in Partner Center]({LINK})"
    ),
)

# Made-up credentials in the shapes the services use.
WORKFLOW_ID = "643e69f83c8944438d68119179a10a64"
WORKFLOW_SIG = "KODuebWbDGYFr0z0eu-6Rj8aUKz7108W3wrNJZxFE5A"
TEAMS_HOST = "prod-42.westeurope.logic.azure.com"
TEAMS_HTTPS = (
    f"https://{TEAMS_HOST}:443/workflows/{WORKFLOW_ID}/triggers/manual/paths/invoke"
    f"?api-version=2016-06-01&sp=%2Ftriggers%2Fmanual%2Frun&sv=1.0&sig={WORKFLOW_SIG}"
)
TEAMS_SHORT = f"workflows://{TEAMS_HOST}:443/{WORKFLOW_ID}/{WORKFLOW_SIG}"
SLACK_A, SLACK_B, SLACK_C = "T1JJ3T3L2", "A1BRTD4JD", "TIiajkdnlazkcOXrIdevi7"
SLACK_HOOK = f"slack://{SLACK_A}/{SLACK_B}/{SLACK_C}/#ops"
SLACK_BOT_TOKEN = "xoxb-1234-1234-4ddbc191d40ee098cbaae6f3523ada2d"
SLACK_BOT = f"slack://{SLACK_BOT_TOKEN}/#general"


def notifier(url: str, **options: Any) -> Notifier:
    return Notifier({"team": ChannelConfig(url=url, **options)})


# --- real local receivers ---------------------------------------------------------------


def test_json_webhook_receives_title_and_body() -> None:
    with WebhookReceiver() as hook:
        result = notifier(hook.json_url).send("team", MESSAGE)
        hook.wait_for(1)
    assert result == Delivery(ok=True)
    (body,) = hook.bodies
    assert body["title"] == MESSAGE.title
    assert CUSTOMER in body["message"] and LINK in body["message"]


def test_email_subject_is_the_title_and_body_carries_the_text() -> None:
    with SmtpReceiver() as smtp:
        result = notifier(smtp.mailto_url(to="sales@example.com")).send("team", MESSAGE)
        (mail,) = smtp.wait_for(1)
    assert result.ok, result.error
    assert mail.subject == MESSAGE.title
    assert mail.rcpt_tos == ("sales@example.com",)
    assert CUSTOMER in mail.text and DEADLINE in mail.text
    assert LINK in mail.html  # the Markdown link becomes a real link in the HTML part


def test_to_assignees_mails_the_lead_team_instead_of_the_url_recipient() -> None:
    with SmtpReceiver() as smtp:
        owners = notifier(
            smtp.mailto_url(to="sales@example.com"),
            to_assignees=True,
            assignee_domains=["contoso.com"],
        )
        team = ["ann@contoso.com", "bob@contoso.com"]
        result = owners.send("team", MESSAGE, recipients=team)
        mails = smtp.wait_for(2)
    assert result.ok, result.error
    assert sorted(r for m in mails for r in m.rcpt_tos) == team
    assert all(m.subject == MESSAGE.title for m in mails)


def test_to_assignees_falls_back_to_the_url_recipient_without_a_team() -> None:
    with SmtpReceiver() as smtp:
        owners = notifier(
            smtp.mailto_url(to="sales@example.com"),
            to_assignees=True,
            assignee_domains=["contoso.com"],
        )
        assert owners.send("team", MESSAGE, recipients=()).ok
        assert owners.send("team", MESSAGE, recipients=["not an address"]).ok
        mails = smtp.wait_for(2)
    assert [m.rcpt_tos for m in mails] == [("sales@example.com",), ("sales@example.com",)]


def test_recipients_are_ignored_by_a_channel_without_to_assignees() -> None:
    with SmtpReceiver() as smtp:
        plain = notifier(smtp.mailto_url(to="sales@example.com"))
        assert plain.send("team", MESSAGE, recipients=["ann@contoso.com"]).ok
        (mail,) = smtp.wait_for(1)
    assert mail.rcpt_tos == ("sales@example.com",)


def test_server_error_is_a_failed_delivery_and_the_channel_recovers() -> None:
    with WebhookReceiver() as hook:
        hook.fail_next(1, status=500)
        channel = notifier(hook.json_url)
        failed = channel.send("team", MESSAGE)
        retried = channel.send("team", MESSAGE)
        hook.wait_for(2)
    assert failed.ok is False
    assert failed.error is not None and "500" in failed.error
    assert retried == Delivery(ok=True)


def test_unreachable_receiver_is_a_failed_delivery() -> None:
    result = notifier(f"json://127.0.0.1:{free_port()}/hook").send("team", MESSAGE)
    assert result.ok is False
    assert result.error is not None and "connection" in result.error.lower()


def test_unreachable_smtp_server_is_a_failed_delivery() -> None:
    url = f"mailto://127.0.0.1:{free_port()}?from=rw@example.com&to=sales@example.com"
    result = notifier(url).send("team", MESSAGE)
    assert result.ok is False and result.error


def test_unknown_channel() -> None:
    assert notifier("json://127.0.0.1/hook").send("nope", MESSAGE) == Delivery(
        False, "unknown channel"
    )


def test_unusable_url_fails_without_echoing_its_secret() -> None:
    secret = "s3cr$t-Signature"  # '$' is not allowed, so Apprise rejects and quotes it
    result = notifier(f"workflows://{TEAMS_HOST}/{WORKFLOW_ID}/{secret}").send("team", MESSAGE)
    assert result.ok is False
    assert result.error is not None and "Signature" in result.error
    assert secret not in result.error and WORKFLOW_ID not in result.error


# --- Teams and Slack, intercepted at requests' transport ---------------------------------


@dataclass
class Outgoing:
    method: str
    url: str
    headers: CaseInsensitiveDict[str]
    body: bytes

    @property
    def payload(self) -> Any:
        return json.loads(self.body)


class FakeService:
    """Stands in for the internet: answers every request Apprise makes, records it."""

    def __init__(self, status: int = 200, content: bytes = b"ok") -> None:
        self.status, self.content = status, content
        self.sent: list[Outgoing] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeService:
        service = self

        def send(adapter: HTTPAdapter, request: requests.PreparedRequest, **_: Any) -> Any:
            body = request.body or b""
            raw = body.encode() if isinstance(body, str) else bytes(body)
            service.sent.append(
                Outgoing(request.method or "", request.url or "", request.headers, raw)
            )
            response = requests.Response()
            response.status_code = service.status
            response._content = service.content
            response.headers = CaseInsensitiveDict({"Content-Type": "application/json"})
            response.url, response.request, response.encoding = request.url or "", request, "utf-8"
            return response

        monkeypatch.setattr(HTTPAdapter, "send", send)
        return self


@pytest.mark.parametrize("url", [TEAMS_SHORT, TEAMS_HTTPS], ids=["workflows://", "https://"])
def test_teams_workflow_card_carries_the_alert(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    teams = FakeService(status=202, content=b"").install(monkeypatch)
    result = notifier(url).send("team", MESSAGE)
    assert result == Delivery(ok=True)
    (request,) = teams.sent
    where = urlsplit(request.url)
    assert where.hostname == TEAMS_HOST
    assert f"/workflows/{WORKFLOW_ID}/triggers/manual/paths/invoke" in where.path
    assert parse_qs(where.query)["sig"] == [WORKFLOW_SIG]  # the signature authenticates...
    card = request.payload["attachments"][0]["content"]
    shown = "\n".join(block.get("text", "") for block in card["body"])
    assert MESSAGE.title in shown
    assert CUSTOMER in shown and DEADLINE in shown and LINK in shown
    assert WORKFLOW_SIG not in request.body.decode()  # ...and never travels in the card
    assert WORKFLOW_ID not in request.body.decode()


def test_teams_rejection_is_a_failed_delivery(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeService(status=400, content=b'{"error": "bad request"}').install(monkeypatch)
    result = notifier(TEAMS_HTTPS).send("team", MESSAGE)
    assert result.ok is False
    assert result.error is not None and "400" in result.error
    assert WORKFLOW_SIG not in result.error


def test_slack_webhook_message_carries_the_alert(monkeypatch: pytest.MonkeyPatch) -> None:
    slack = FakeService(content=b"ok").install(monkeypatch)
    assert notifier(SLACK_HOOK).send("team", MESSAGE) == Delivery(ok=True)
    (request,) = slack.sent
    assert request.url == f"https://hooks.slack.com/services/{SLACK_A}/{SLACK_B}/{SLACK_C}"
    payload = request.payload
    assert payload["channel"] == "#ops"
    text = json.dumps(payload, ensure_ascii=False)
    assert MESSAGE.title in text
    assert CUSTOMER in text and DEADLINE in text and LINK in text
    for secret in (SLACK_A, SLACK_B, SLACK_C):
        assert secret not in request.body.decode()


def test_slack_bot_message_carries_the_alert(monkeypatch: pytest.MonkeyPatch) -> None:
    answer = {"ok": True, "channel": "C024BE91L", "ts": "1712345678.000100"}
    slack = FakeService(content=json.dumps(answer).encode()).install(monkeypatch)
    assert notifier(SLACK_BOT).send("team", MESSAGE) == Delivery(ok=True)
    (request,) = slack.sent
    assert request.url == "https://slack.com/api/chat.postMessage"
    assert request.headers["Authorization"] == f"Bearer {SLACK_BOT_TOKEN}"
    payload = request.payload
    assert payload["channel"] == "#general"
    text = json.dumps(payload, ensure_ascii=False)
    assert MESSAGE.title in text
    assert CUSTOMER in text and DEADLINE in text and LINK in text
    assert SLACK_BOT_TOKEN not in request.body.decode()


def test_slack_refusal_is_a_failed_delivery(monkeypatch: pytest.MonkeyPatch) -> None:
    refusal = {"ok": False, "error": "invalid_auth"}
    FakeService(status=200, content=json.dumps(refusal).encode()).install(monkeypatch)
    result = notifier(SLACK_BOT).send("team", MESSAGE)
    assert result.ok is False and result.error
    assert SLACK_BOT_TOKEN not in result.error


# --- check_channels ----------------------------------------------------------------------


def channels(**urls: str) -> dict[str, ChannelConfig]:
    return {name: ChannelConfig(url=url) for name, url in urls.items()}


def test_check_channels_accepts_working_urls() -> None:
    good = channels(
        hook="json://127.0.0.1:8080/hook",
        mail="mailtos://user:pw@smtp.example.com?to=sales@example.com",
        teams=TEAMS_HTTPS,
        teams_short=TEAMS_SHORT,
        slack=SLACK_HOOK,
        bot=SLACK_BOT,
    )
    assert check_channels(good) == []


def test_check_channels_names_an_unknown_scheme_without_its_secrets() -> None:
    (problem,) = check_channels(channels(ops="nonsense://admin:hunter2@host/t0kenValue99"))
    assert problem.startswith("channels.ops.url: ")
    assert "nonsense://" in problem
    assert "hunter2" not in problem and "t0kenValue99" not in problem


def test_check_channels_explains_the_msteams_migration() -> None:
    (problem,) = check_channels(channels(team=f"msteams://{SLACK_A}/{SLACK_B}/{SLACK_C}"))
    assert problem == f"channels.team.url: {MSTEAMS_ADVICE}"
    assert "workflows://" in problem and "Post to a channel when a webhook request" in problem
    assert SLACK_C not in problem


def test_check_channels_reports_bad_parts_of_a_known_scheme_without_secrets() -> None:
    url = f"workflows://{TEAMS_HOST}/{WORKFLOW_ID}/sig$with$dollars"
    (problem,) = check_channels(channels(team=url))
    assert problem.startswith("channels.team.url: not a valid workflows:// URL")
    assert "sig$with$dollars" not in problem and WORKFLOW_ID not in problem


def test_check_channels_flags_a_plain_https_url_and_to_assignees_on_a_webhook() -> None:
    hook = ChannelConfig.model_construct(url="https://example.com/hook", to_assignees=True)
    problems = check_channels({"owners": hook})
    assert [p.split(":")[0] for p in problems] == [
        "channels.owners.url",
        "channels.owners.to_assignees",
    ]
    assert "json://" in problems[0]


# --- URL helpers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # Apprise parses these: its own privacy form (first and last character of a secret at
        # most), with only the query keys the operator wrote.
        ("json://127.0.0.1:8080/hook", "json://127.0.0.1:8080/hook"),
        (
            "mailtos://user:s3cret@smtp.example.com?to=sales@example.com",
            "mailtos://user:****@smtp.example.com/sales%40example.com",
        ),
        (TEAMS_SHORT, f"workflow://{TEAMS_HOST}:443/6...4/K...A"),
        (TEAMS_HTTPS, f"workflow://{TEAMS_HOST}:443/6...4/K...A"),
        (SLACK_HOOK, "slack://T...2/A...D/T...7/%23ops"),
        (SLACK_BOT, "slack://x...d/%23general"),
        (
            f"https://hooks.slack.com/services/{SLACK_A}/{SLACK_B}/{SLACK_C}",
            "slack://T...2/A...D/T...7",
        ),
        ("tgram://123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw/-1001", "tgram://1...w/-1001"),
        ("json://u:p@[::1]:8080/a?token=abc&x=1", "json://u:****@[::1]:8080/a"),
        # Apprise refuses these: our own masking.
        (f"msteams://{SLACK_A}/{SLACK_B}/{SLACK_C}", "msteams://***/***/***"),
        (
            "nosuchscheme://u:p@host.example.com/a?token=abc&x=1",
            "nosuchscheme://u:***@host.example.com/a?token=***&x=1",
        ),
        ("not a url", "***"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    for secret in (SLACK_C, SLACK_BOT_TOKEN, WORKFLOW_SIG, WORKFLOW_ID, "s3cret", "AAHdqTcvCH1v"):
        assert secret not in redact_url(url)


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        (TEAMS_SHORT, "teams"),
        (TEAMS_HTTPS, "teams"),
        ("workflow://host.example.com/id/sig", "teams"),
        ("msteams://a/b/c", "teams"),
        (SLACK_HOOK, "slack"),
        (SLACK_BOT, "slack"),
        (f"https://hooks.slack.com/services/{SLACK_A}/{SLACK_B}/{SLACK_C}", "slack"),
        (f"https://hooks.slack-gov.com/services/{SLACK_A}/{SLACK_B}/{SLACK_C}", "slack"),
        ("https://prod-1.westeurope.powerautomate.com/workflows/abc/x?sig=s", "teams"),
        ("powerautomate://example/abc/sig", "teams"),
        ("mailto://127.0.0.1:25?to=a@example.com", "email"),
        ("mailtos://u:p@smtp.example.com", "email"),
        ("json://127.0.0.1/hook", "webhook"),
        ("forms://example.com/hook", "webhook"),
        ("discord://id/token", "other"),
        ("https://example.com/hook", "other"),
        ("", "other"),
    ],
)
def test_channel_kind(url: str, kind: str) -> None:
    assert channel_kind(url) == kind


# --- console:// and startup cost -----------------------------------------------------------


class TtyBuffer(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_target_prints_title_and_body() -> None:
    first, second, tty = io.StringIO(), io.StringIO(), TtyBuffer()
    register_console_target(first)
    demo = Notifier({"demo": ChannelConfig(url="console://")})
    assert demo.send("demo", MESSAGE).ok
    assert MESSAGE.title in first.getvalue() and LINK in first.getvalue()
    assert "\033[" not in first.getvalue()  # no colour codes when not on a terminal

    register_console_target(second)  # a second call only moves the output
    assert demo.send("demo", Message(title="second", body="body two")).ok
    assert "second" in second.getvalue() and "second" not in first.getvalue()

    register_console_target(tty)
    assert demo.send("demo", MESSAGE).ok
    assert "\033[" in tty.getvalue() and CUSTOMER in tty.getvalue()
    register_console_target(None)


def test_importing_notify_does_not_load_apprise() -> None:
    code = "import sys, referral_watch.notify; print('apprise' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- notify types (issue 13 item 7) and the Apprise internals notify.py relies on -----------


@pytest.mark.parametrize("kind", ["info", "success", "warning", "failure"])
def test_the_notify_type_reaches_slack_and_teams(
    monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    import apprise

    service = FakeService(status=200, content=b"ok").install(monkeypatch)
    message = Message(MESSAGE.title, MESSAGE.body, notify_type=kind)
    assert notifier(SLACK_HOOK).send("team", message).ok
    service.status = 202
    assert notifier(TEAMS_SHORT).send("team", message).ok
    slack, teams = (request.payload for request in service.sent)
    colour = apprise.AppriseAsset().color(apprise.NotifyType(kind))
    assert slack["attachments"][0]["color"] == colour
    card = teams["attachments"][0]["content"]
    (image,) = [block for block in card["body"] if block.get("type") == "Image"]
    assert image["altText"] == kind and f"apprise-{kind}-" in image["url"]


def test_a_final_tier_alert_is_sent_as_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """From the config's tier rank through render to the Slack payload's colour."""
    import apprise

    from referral_watch.config.loader import parse_config
    from referral_watch.model import EXPIRED, RESOLVED, TIER, Lead, parse_referral
    from referral_watch.render.channels import Style
    from referral_watch.render.messages import render_alert, render_digest
    from referral_watch.sandbox.records import make_referral

    config = parse_config(
        '[auth]\nmethod = "env"\n[channels]\nteam = "json://127.0.0.1:9/x"\n'
        + "".join(
            f'[[policy.tiers]]\nname = "{n}"\nremaining = "{r}"\nnotify = ["team"]\n'
            for n, r in (("new", "14d"), ("urgent", "2d"), ("final", "12h"))
        ),
        env={},
    )
    now = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
    ref = parse_referral(make_referral(created=now - timedelta(days=13, hours=20)))
    lead = Lead(ref, ref.created + timedelta(days=14), ref.created, now)
    new, urgent, final = config.policy.tiers
    style = Style(markup="slack")
    types = {
        "new": render_alert(lead, TIER, new, now, style).notify_type,
        "urgent": render_alert(lead, TIER, urgent, now, style).notify_type,
        "final": render_alert(lead, TIER, final, now, style).notify_type,
        "expired": render_alert(lead, EXPIRED, None, now, style).notify_type,
        "resolved": render_alert(lead, RESOLVED, None, now, style).notify_type,
        "digest": render_digest([lead], TIER, final, 0, now, style).notify_type,
    }
    assert types == {
        "new": "info",
        "urgent": "warning",
        "final": "failure",
        "expired": "failure",
        "resolved": "success",
        "digest": "failure",
    }
    service = FakeService().install(monkeypatch)
    assert notifier(SLACK_HOOK).send("team", render_alert(lead, TIER, final, now, style)).ok
    (request,) = service.sent
    failure = apprise.AppriseAsset().color(apprise.NotifyType.FAILURE)
    assert request.payload["attachments"][0]["color"] == failure


def test_the_apprise_internals_notify_relies_on_are_there() -> None:
    """notify.py uses three things outside Apprise's documented API (pinned apprise<3): the
    plugin registry, a plugin's request_rate_per_sec, and the decorator for custom schemes."""
    import apprise
    from apprise import manager_plugins

    registry = manager_plugins.NotificationManager()
    assert "slack" in registry and "json" in registry and "nosuchscheme" not in registry

    target = Notifier._build(apprise, SLACK_HOOK)
    assert target is not None
    assert target[0].request_rate_per_sec <= 1.0  # our cap on Apprise's wait between sends

    register_console_target(io.StringIO())  # apprise.decorators.notify(on="console")
    assert "console" in registry
    assert Notifier({"c": ChannelConfig(url="console://")}).send("c", MESSAGE).ok
    register_console_target(None)


@pytest.mark.parametrize("host", ["hooks.slack.com", "hooks.slack-gov.com"])
def test_apprise_reasons_never_carry_a_slack_hook_token(host: str) -> None:
    from referral_watch.notify import _apprise_reason

    url = f"https://{host}/services/{SLACK_A}/{SLACK_B}/{SLACK_C}"
    reason = _apprise_reason(f"Failed to send to {url}: HTTP 404 for {SLACK_C}", url)
    for secret in (SLACK_A, SLACK_B, SLACK_C):
        assert secret not in reason
    assert "404" in reason
