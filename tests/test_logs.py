"""Logs: one-shot commands show warnings and errors only; JSON mode is JSON throughout, library
records included; -vv never shows a webhook URL's credentials or a secret response header."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta

import pytest
from test_notify import (
    SLACK_A,
    SLACK_B,
    SLACK_C,
    TEAMS_HTTPS,
    WORKFLOW_ID,
    WORKFLOW_SIG,
    FakeService,
)

from referral_watch import logs
from referral_watch.sandbox.records import make_referral

from conftest import World

SLACK_WEBHOOK = f"https://hooks.slack.com/services/{SLACK_A}/{SLACK_B}/{SLACK_C}"


def json_lines(text: str) -> list[dict[str, object]]:
    """Every line of ``text`` as JSON (a plain-text line fails the test)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_one_shot_commands_show_warnings_and_errors_only(world: World) -> None:
    world.add_lead(age=timedelta(hours=1))
    ran = world.cli("run", "--once")
    assert ran.code == 0
    assert ran.out.startswith("Polled 1 leads")  # the result, on stdout
    assert ran.err == ""  # no info-level cycle.done, notify.sent ... mixed in
    assert world.cli("check-config").err == ""
    assert world.cli("status").err == ""

    verbose = world.cli("-v", "run", "--once")
    assert any(line["event"] == "cycle.done" for line in json_lines(verbose.err))

    # warnings still show: a record without a created date is skipped and logged
    broken = make_referral(created=datetime.now(UTC))
    broken["createdDateTime"] = "not-a-date"
    world.sandbox.add(broken)
    warned = world.cli("run", "--once")
    events = [line["event"] for line in json_lines(warned.err)]
    assert "referral.quarantined" in events and "cycle.done" not in events


def test_library_records_are_json_in_json_mode(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("json", verbose=2)
    logging.getLogger("apscheduler.scheduler").warning("Run time of job %r was missed", "poll")
    logging.getLogger("httpx").info('HTTP Request: GET http://127.0.0.1/x "HTTP/1.1 200 OK"')
    err = capsys.readouterr().err
    lines = json_lines(err)
    assert [line["logger"] for line in lines] == ["apscheduler.scheduler", "httpx"]
    assert lines[0]["event"] == "Run time of job 'poll' was missed"
    assert lines[0]["level"] == "warning" and "timestamp" in lines[0]


def test_very_verbose_logs_keep_webhook_urls_and_echoed_tokens_secret(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """-vv turns on the libraries' own debug output: Apprise prints the Slack and Teams URLs
    it posts to (their paths and `sig` are the credentials). Partner Center's answers, here with
    a careless server's echo of the bearer token in its headers, show as referral-watch's own
    `api.response` lines (status, path, Request-ID), never their headers."""
    FakeService(status=200, content=b"ok").install(monkeypatch)
    world.channels = {"slack": SLACK_WEBHOOK, "teams": TEAMS_HTTPS}
    world.tiers = world.tiers.replace('notify = ["team"]', 'notify = ["slack", "teams"]', 1)
    record = make_referral(created=datetime.now(UTC) - timedelta(hours=1))
    world.sandbox.add(record)
    echo = {"Set-Cookie": "session={token}", "X-Echo": "Bearer {token}"}
    world.sandbox.fail(0, body=json.dumps({"value": [record]}).encode(), headers=echo)
    ran = world.cli("-vv", "run", "--once")
    lines = json_lines(ran.err)  # JSON throughout, the libraries' lines too
    loggers = {str(line.get("logger", "")) for line in lines}
    polled = [line for line in lines if line["event"] == "api.response"]
    assert polled and polled[0]["status"] == 200 and polled[0]["request_id"], polled
    assert any(name.startswith("apprise") for name in loggers), loggers
    for secret in ("sandbox-token", SLACK_B, SLACK_C, WORKFLOW_SIG, WORKFLOW_ID):
        assert secret not in ran.err, secret
    posted = [str(line["event"]) for line in lines if " POST URL: " in str(line["event"])]
    assert len(posted) == 2, posted  # Apprise's own lines are there, with the URLs redacted
    assert "prod-42.westeurope.logic.azure.com" in ran.err  # the host is still shown
    assert "Could not load" not in ran.err  # nothing from parsing URLs for the redaction
