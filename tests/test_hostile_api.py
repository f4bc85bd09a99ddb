"""A hostile or broken API, channel or config (issue 20 defects 6, 7, 9, 12-14; issue 13.10).

Black-box: the sandbox's fault injection serves the attack, `run --once` (in-process, as the
user types it) meets it, and the test checks what the operator sees: one clear line, a poll
that changed nothing, operations told, and everything delivered once the fault is gone.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import stamina

from referral_watch import notify
from referral_watch.model import parse_time
from referral_watch.partner_center import client as partner_center
from referral_watch.sandbox.records import make_referral

from conftest import World
from receivers import WebhookReceiver


@pytest.fixture(autouse=True)
def _no_retry_waits() -> Iterator[None]:
    with stamina.set_testing(True, attempts=100, cap=True):  # our attempt counts still hold
        yield


@pytest.fixture
def ops_world(world: World) -> Iterator[tuple[World, WebhookReceiver]]:
    with WebhookReceiver() as ops:
        world.channels = {"ops": ops.json_url}
        world.extra = '[operations]\nnotify = ["ops"]\nafter_failures = 1\n'
        yield world, ops


def unescaped(markdown: str) -> str:
    """Message text without Markdown's backslash escapes (`\\_`, `\\*`)."""
    return markdown.replace("\\\\", "").replace("\\", "")


def customers_in(bodies: list[Any]) -> list[str]:
    """The customer each alert's title names ("<urgency>: <customer>")."""
    return [str(body["title"]).split(": ", 1)[-1] for body in bodies]


def partner_center_keys(world: World, keys: str, base_url: str | None = None) -> None:
    """Add keys to the [partner_center] table the world writes (or change its base_url)."""
    write = world.write_config

    def written() -> Path:
        path = write()
        text = path.read_text().replace('timeout = "5s"\n', f'timeout = "5s"\n{keys}\n', 1)
        if base_url is not None:
            text = text.replace(
                f'base_url = "{world.sandbox.base_url}"', f'base_url = "{base_url}"'
            )
        path.write_text(text)
        return path

    world.write_config = written  # type: ignore[method-assign]


def known_leads(world: World) -> tuple[list[str], list[tuple[str, str | None]]]:
    """Two leads polled and announced once, before the fault."""
    ids = [world.add_lead(age=timedelta(hours=2 + n), customer=f"Known {n} Inc") for n in range(2)]
    assert world.cli("run", "--once").code == 0
    assert len(world.team.bodies) == 2
    return ids, view(world)


def view(world: World) -> list[tuple[str, str | None]]:
    return sorted((e["id"], e["resolution"]) for e in world.cli("status", "--json", "--all").json())


def fails_and_changes_nothing(
    world: World, ops: WebhookReceiver, before: list[tuple[str, str | None]], reason: str
) -> str:
    """One run --once against the fault: exit 1 naming `reason`, no lead concluded gone,
    operations told; then, the fault gone, the new lead arrives once."""
    result = world.cli("run", "--once")
    assert result.code == 1
    assert reason in result.out
    assert view(world) == before  # nothing concluded from an incomplete poll
    assert len(world.team.bodies) == 2
    assert reason in unescaped(ops.bodies[-1]["message"])
    world.sandbox.clear_faults()
    world.add_lead(age=timedelta(hours=1), customer="After Inc")
    assert world.cli("run", "--once").code == 0
    assert customers_in(world.team.bodies[2:]) == ["After Inc"]
    return str(result.out)


# --- defect 6: a poll without end -----------------------------------------------------------


def test_an_endless_next_link_chain_fails_the_poll_at_the_page_cap(
    ops_world: tuple[World, WebhookReceiver], monkeypatch: pytest.MonkeyPatch
) -> None:
    world, ops = ops_world
    _, before = known_leads(world)
    monkeypatch.setattr(partner_center, "MAX_PAGES", 30)
    world.sandbox.fail(0, kind="endless_next", times=10_000)
    fails_and_changes_nothing(world, ops, before, "more than 30 pages in one poll")
    assert len(world.sandbox.requests) < 40  # stopped, not 1,355 requests a minute


def test_a_slowloris_page_fails_the_poll_at_poll_timeout(
    ops_world: tuple[World, WebhookReceiver],
) -> None:
    world, ops = ops_world
    _, before = known_leads(world)
    partner_center_keys(world, 'poll_timeout = "2s"')
    world.sandbox.fail(0, kind="slowloris", delay=0.2, times=10)  # a byte every 0.2 s
    fails_and_changes_nothing(
        world, ops, before, "the poll took longer than partner_center.poll_timeout (2s)"
    )


# --- defect 7: answers without size ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["huge", "gzip_bomb", "endless_body"])
def test_an_answer_over_16_mib_fails_the_poll_with_its_reason(
    ops_world: tuple[World, WebhookReceiver], kind: str
) -> None:
    world, ops = ops_world
    _, before = known_leads(world)
    world.sandbox.fail(0, kind=kind, size=200 * 1024 * 1024, times=10)
    fails_and_changes_nothing(world, ops, before, "answer over 16 MiB")


def test_a_record_over_256_kib_is_set_aside_and_the_others_alerted(
    ops_world: tuple[World, WebhookReceiver],
) -> None:
    world, ops = ops_world
    world.add_lead(age=timedelta(hours=2), customer="Small Inc")
    big = world.add_lead(age=timedelta(hours=2), customer="Big Inc", notes="n" * 300_000)
    result = world.cli("run", "--once")
    assert result.code == 0, result.out
    assert customers_in(world.team.bodies) == ["Small Inc"]
    (item,) = world.cli("status", "--json", "--quarantined").json()
    assert item["id"] == big and "over the 256 KiB limit" in item["reason"]
    assert big in ops.bodies[0]["message"]


# --- defect 9: a token echoed in a redirect -------------------------------------------------


def test_a_token_echoed_in_a_redirect_is_scrubbed_from_every_error_text(
    ops_world: tuple[World, WebhookReceiver],
) -> None:
    world, ops = ops_world
    world.sandbox.fail(
        302, times=5, headers={"Location": "https://evil.example/cb?access_token={token}&x=1"}
    )
    result = world.cli("run", "--once")
    assert result.code == 1
    assert "unexpected redirect to https://evil.example/cb?access_token=***&x=1" in result.out
    texts = {
        "run --once output": result.out,
        "log lines": result.err,
        "status": world.cli("status").out,
        "ops alert": unescaped(json.dumps(ops.bodies)),
    }
    with sqlite3.connect(world.state_path) as db:
        texts["polls.error"] = " ".join(
            str(row[0]) for row in db.execute("SELECT error FROM polls")
        )
    for where, text in texts.items():
        assert "sandbox-token" not in text, where
        assert "access_token=***" in text, where


# --- defect 13: durations and secret files without bounds -----------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["silence", "lead-1", "--for", "1000000w"], "longer than ten years"),
        (["report", "--since", "99999999999999w"], "longer than ten years"),
        (["silence", "lead-1", "--for", "9" * 5000 + "s"], "is not a duration"),
    ],
)
def test_a_huge_duration_on_the_command_line_is_a_clear_error(
    world: World, args: list[str], expected: str
) -> None:
    world.add_lead(age=timedelta(hours=2))
    assert world.cli("run", "--once").code == 0
    result = world.cli(*args)
    assert result.code == 2
    assert expected in result.err
    assert "Traceback" not in result.err


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ('[schedule]\ninterval = "99999999w"\n', "schedule.interval"),
        ('[schedule]\ninterval = "3651d"\n', "schedule.interval"),
    ],
)
def test_a_huge_duration_in_the_config_names_its_key(world: World, extra: str, key: str) -> None:
    world.extra = extra
    result = world.cli("check-config")
    assert result.code == 2
    assert f"{key}: " in result.err and "longer than ten years" in result.err


@pytest.mark.parametrize("where", ["state", "policy"])
def test_huge_keep_resolved_and_response_window_are_config_errors(world: World, where: str) -> None:
    if where == "state":
        world.state = 'keep_resolved = "999999w"'
    else:
        world.policy += 'response_window = "999999w"\n'
    result = world.cli("check-config")
    assert result.code == 2
    key = "state.keep_resolved" if where == "state" else "policy.response_window"
    assert key in result.err


def test_a_secret_file_over_64_kib_is_refused_without_reading_it_all(world: World) -> None:
    world.channels = {"ops": "json://127.0.0.1:9/${file:/dev/zero}"}
    result = world.cli("check-config")
    assert result.code == 2
    assert "channels.ops" in result.err and "larger than 64 KiB" in result.err


# --- defect 14: a channel that dribbles its answer ------------------------------------------


class DribblingChannel:
    """An HTTP server that answers one byte every `gap` seconds, for ever."""

    def __init__(self, gap: float = 0.3) -> None:
        self.gap = gap
        self.stopping = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._dribble, args=(connection,), daemon=True).start()

    def _dribble(self, connection: socket.socket) -> None:
        with connection:
            connection.recv(65536)
            answer = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b" " * 1000
            for byte in answer:
                if self.stopping.wait(self.gap):
                    return
                try:
                    connection.sendall(bytes([byte]))
                except OSError:
                    return

    def close(self) -> None:
        self.stopping.set()
        self.server.close()


def test_a_channel_that_dribbles_its_answer_is_given_up_on_and_others_are_served(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = DribblingChannel()
    try:
        monkeypatch.setattr(notify, "SEND_TIME_CAP", 2.0)
        world.channels = {"team": f"json://127.0.0.1:{slow.port}/hook"}
        world.add_lead(age=timedelta(days=13), customer="Urgent Inc")  # team and managers
        result = world.cli("run", "--once")
        assert result.code == 1  # the slow one failed (and is retried next cycle)
        assert "did not finish answering within 2 s" in result.out
        assert len(world.managers.bodies) == 1  # the other channel was not held up
    finally:
        slow.close()


# --- issue 13.10: what the API really sends -------------------------------------------------


def test_any_case_of_keys_and_enum_values_is_read(world: World) -> None:
    lead = world.add_lead(age=timedelta(hours=2), customer="Cased Inc")
    assert world.cli("run", "--once").code == 0
    created = parse_time((world.sandbox.get_record(lead) or {})["createdDateTime"])
    assert created is not None
    record = make_referral(id=lead, created=created, customer="Cased Inc")
    answered = {key[0].upper() + key[1:]: value for key, value in record.items()}
    answered["Substatus"] = "ACCEPTED"  # Microsoft's 2018 sample spells the key this way
    world.sandbox.fail(0, body=b'{"value": []}')
    world.sandbox.fail(0, on="item", body=json.dumps(answered).encode())
    assert world.cli("run", "--once").code == 0
    (shown,) = world.cli("status", "--json", "--all").json()
    assert shown["resolution"] == "accepted"
    assert "Cased Inc" in world.team.bodies[-1]["title"]  # on_resolved heard it


def test_a_lookup_answering_substatus_none_keeps_watching(world: World) -> None:
    lead = world.add_lead(age=timedelta(hours=2), customer="Unclear Inc")
    assert world.cli("run", "--once").code == 0
    record = dict(world.sandbox.get_record(lead) or {}, substatus="None")
    world.sandbox.fail(0, body=b'{"value": []}')
    world.sandbox.fail(0, on="item", body=json.dumps(record).encode())
    result = world.cli("run", "--once")
    assert result.code == 0
    (shown,) = world.cli("status", "--json", "--all").json()
    assert shown["resolution"] is None  # still watched: "None" is no answer
    assert "lead.lookup_no_substatus" in result.err


def test_a_page_size_over_100_is_a_config_error(world: World) -> None:
    partner_center_keys(world, "page_size = 101")
    result = world.cli("check-config")
    assert result.code == 2
    assert "partner_center.page_size" in result.err


def test_connection_refused_names_the_url(world: World) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    partner_center_keys(world, "", base_url=f"http://127.0.0.1:{port}/v1.0")
    result = world.cli("run", "--once")
    assert result.code == 1
    assert f"Partner Center at http://127.0.0.1:{port}/v1.0/engagements/referrals" in result.out
    assert "connection failed" in result.out


def test_a_base_url_without_v1_0_points_at_the_key(world: World) -> None:
    root = world.sandbox.base_url.removesuffix("/v1.0")
    partner_center_keys(world, "", base_url=root)
    result = world.cli("run", "--once")
    assert result.code == 1
    assert "404" in result.out and "check partner_center.base_url" in result.out
