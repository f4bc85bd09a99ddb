"""The demo, end to end, as `make demo` runs it (without the pauses)."""

from __future__ import annotations

import io
import itertools
import json
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from referral_watch.sandbox.demo import run_demo

from conftest import DEMO_CONSOLE


def test_demo_shows_the_whole_story_and_exits_0() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "referral_watch", "demo", "--fast"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "Traceback" not in out + done.stderr
    # every kind of message the product sends, as the summary records them
    for what in ("new@", "reminder@", "urgent@", "final@", "resolved@", "expired@"):
        assert what in out, what
    assert "Lead expires in" in out
    assert "Lead expired unanswered: Tailspin Toys" in out
    assert "Lead accepted: Adatum Corporation" in out
    # answered through referral-watch's own answer path (a PATCH to the sandbox)
    assert "Accepted by Ann de Vries via referral-watch" in out
    assert "7 leads need an answer within 14d" in out  # the digest
    assert "Summary: what each lead received" in out
    # the malformed record is reported, not fatal, and the story says it is there on purpose
    assert "has no valid createdDateTime" in done.stderr
    assert "(one of them malformed on purpose)" in out.splitlines()[0]
    assert "Broken Record Ltd is malformed on purpose" in out
    # a final reminder repeats while the lead stays in that tier: every 4 hours in the last 12,
    # as the README says and the demo's tier (repeat = "4h") asks
    fabrikam = next(line for line in out.splitlines() if line.strip().startswith("Fabrikam"))
    assert fabrikam.count("final@") == 3
    assert "expired " in fabrikam
    finals = [
        line.split("expires in ")[1].split(":")[0]
        for line in out.splitlines()
        if "▸ team" in line and "expires in" in line and line.endswith("Fabrikam Customer Inc")
    ][-3:]
    assert [int(left.split("h")[0]) for left in finals] == [10, 6, 2], finals
    # the closing hint names a command that works from here (`python -m`, as this test ran it)
    assert f"  {sys.executable} -m referral_watch --config config/referral-watch.toml" in out


def test_the_demo_lead_taken_by_ann_escalates_only_to_her_and_she_answers_it() -> None:
    lines = demo_output(datetime(2026, 3, 2, 9, 0, tzinfo=UTC)).splitlines()
    taken = lines.index(
        "» through referral-watch: Ann de Vries clicks Take it in the alert for Litware Inc: "
        "its reminders go to her alone now"
    )
    answered = lines.index(
        "» through referral-watch: Ann de Vries clicks Accept in her reminder for Litware Inc"
    )
    assert lines[taken + 1] == "  ▸ team      Litware Inc taken by Ann de Vries"
    between = [line for line in lines[taken + 2 : answered] if "Litware Inc" in line]
    assert len(between) == 1, between  # the reminder went to Ann alone, not to the team
    assert between[0].startswith("  ▸ owner → ann.devries@contoso.example Lead expires in 6d")
    assert lines[answered + 1] == "  ▸ team      Lead accepted: Litware Inc"
    assert not any("Litware" in line for line in lines[answered + 3 :] if "▸" in line)


BURST = ["Alpine Ski House", "Bellows College", "Coho Winery", "Datum Systems", "Fourth Coffee"]


def demo_output(start: datetime) -> str:
    out = io.StringIO()
    assert run_demo(out=out, pause=0.0, start=start) == 0
    return out.getvalue()


def summary_of(text: str) -> list[str]:
    return text.split("Summary: what each lead received", 1)[1].strip().splitlines()[1:13]


@pytest.mark.parametrize("hour_minute", [(0, 0), (6, 30), (13, 0), (23, 30)])
def test_the_demo_tells_the_same_story_at_any_start_hour(hour_minute: tuple[int, int]) -> None:
    start = datetime(2026, 3, 2, *hour_minute, tzinfo=UTC)
    text = demo_output(start)
    lines = text.splitlines()

    # Northwind is accepted just in time: never announced expired before (or after) that
    accepted = lines.index("» in Partner Center: Northwind Traders is accepted just in time")
    assert not any("expired unanswered: Northwind" in line for line in lines), start
    assert any("opportunity accepted: Northwind Traders" in line for line in lines[accepted:])
    northwind = next(line for line in summary_of(text) if line.strip().startswith("Northwind"))
    assert "accepted" in northwind and "expired@" not in northwind

    # one header per simulated cycle, never two in a row
    headers = [line for line in lines if line.startswith("── day")]
    assert len(headers) == len(set(headers))
    for before, after in itertools.pairwise(lines):
        assert not (before.startswith("── day") and after.startswith("── day")), before

    # the team digest's body right under its own headline, not under the managers' one
    digest = next(i for i, line in enumerate(lines) if "7 leads need an answer" in line)
    assert "▸ team" in lines[digest]
    body = []
    for line in lines[digest + 1 :]:
        if not line.startswith("      "):
            break
        body.append(line)
    assert all(any(name in line for line in body) for name in BURST), body

    # and the very same story (what each lead received, on which simulated day) every time
    assert summary_of(text) == summary_of(demo_output(datetime(2026, 3, 2, 9, 0, tzinfo=UTC)))


def test_demo_console_keeps_serving_the_story_until_ctrl_c() -> None:
    import re
    import urllib.request
    from datetime import timedelta

    from conftest import demo_console

    with demo_console() as demo:
        url = demo.url + "/"
        assert url in demo.announced and "Ctrl-C" in demo.announced
        with urllib.request.urlopen(url, timeout=10) as page:
            html = page.read().decode()
        assert "Alpine Ski House" in html  # arrived on day 3: still waiting at the story's end
        # the page counts from the story's end (two weeks on), not from today
        shown_now = re.search(r'data-now="([^"]+)"', html)
        assert shown_now
        moment = datetime.fromisoformat(shown_now.group(1).replace("Z", "+00:00"))
        assert moment > datetime.now(UTC) + timedelta(days=13)
        # and it is healthy: the story's last poll is as recent as the story's clock says
        assert 'class="banner ok"' in html, html[:2000]
        with urllib.request.urlopen(url + "healthz", timeout=10) as health:
            assert health.status == 200
            assert json.loads(health.read())["status"] == "ok"
        code, err = demo.stop()  # Ctrl-C
    assert code == 0
    assert "Traceback" not in err


def test_demo_console_on_a_port_in_use_says_so_before_the_story() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [*DEMO_CONSOLE, str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "referral-watch demo" not in done.stdout  # refused before the story started


def test_demo_console_goes_on_polling_the_sandbox_at_the_storys_clock() -> None:
    import threading
    import urllib.request
    from datetime import timedelta

    from conftest import free_port, wait_until

    port = free_port()
    stop = threading.Event()
    out = io.StringIO()
    story = threading.Thread(
        target=run_demo,
        kwargs={
            "out": out,
            "pause": 0.0,
            "console": f"127.0.0.1:{port}",
            "stop": stop,
            "poll_every": timedelta(seconds=1),
        },
    )
    story.start()

    def last_success() -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as got:
                return str(json.loads(got.read())["last_success"])
        except OSError:
            return None

    try:
        wait_until(lambda: "The console: " in out.getvalue(), timeout=120, what="the console")
        story_end = last_success()
        assert story_end is not None
        wait_until(lambda: (last_success() or "") > story_end, what="a poll after the story")
        assert datetime.fromisoformat(last_success() or "") > datetime.now(UTC) + timedelta(days=13)
    finally:
        stop.set()
        story.join(timeout=30)
    assert not story.is_alive()
