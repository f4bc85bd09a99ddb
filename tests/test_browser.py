"""The console in a real browser (Playwright driving Debian's Chromium) against a real daemon
on the sandbox: order, the ticking countdown, search, silencing, Dutch, and the screenshots
the README shows (docs/console.png, docs/console-phone.png)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from conftest import World, free_port, wait_until

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DOCS = Path(__file__).resolve().parent.parent / "docs"
# `RW_SCREENSHOTS=docs .venv/bin/pytest tests/test_browser.py` refreshes the README's pictures;
# otherwise they go to the test's temporary folder (so a test run leaves the tree clean).
SCREENSHOTS = "RW_SCREENSHOTS"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def configured(world: World, console: str, extra: str) -> str:
    """Write a config with the console on a free loopback port; its base URL."""
    port = free_port()
    world.extra = (
        f'[schedule]\ninterval = "1h"\njitter = "0s"\n'
        f'[server]\nlisten = "127.0.0.1:{port}"\n[console]\n{console}\n{extra}'
    )
    world.write_config()
    return f"http://127.0.0.1:{port}"


class Daemon:
    def __init__(self, world: World, env: dict[str, str] | None = None) -> None:
        self.world = world
        self.process = subprocess.Popen(
            [sys.executable, "-m", "referral_watch", "--config", str(world.config_path), "run"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        _, err = self.process.communicate(timeout=10)
        return err


@pytest.fixture
def run_daemon(world: World) -> Iterator[Callable[..., str]]:
    running: list[Daemon] = []

    def start(console: str = 'sign_in = "none"', extra: str = "", **env: str) -> str:
        base = configured(world, console, extra)
        since = datetime.now(UTC)
        daemon = Daemon(world, env)
        running.append(daemon)
        wait_until(lambda: _polled_since(base, since), what="the daemon's first poll")
        return base

    yield start
    for daemon in running:
        daemon.stop()


def _polled_since(base: str, since: datetime) -> bool:
    """The daemon's /healthz reports a successful poll of its own (not an earlier run's)."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(base + "/healthz", timeout=2) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError:
        return False  # 503: no successful poll yet
    except OSError:
        return False  # not listening yet
    last = body.get("last_success")
    return bool(last) and datetime.fromisoformat(last) > since


def person(first: str, last: str) -> dict[str, str]:
    return {"firstName": first, "lastName": last, "email": f"{first.lower()}@contoso.com"}


def a_pipeline(world: World) -> None:
    """A realistic mix of leads at every stage, one of them answered in the last cycle."""
    anna, bas, chen = person("Anna", "de Vries"), person("Bas", "Jansen"), person("Chen", "Li")
    leads = [
        ("Fabrikam Customer Inc", timedelta(days=13, hours=18), 25000, "NL", [anna]),
        ("Contoso Pharmaceuticals", timedelta(days=12, hours=3), 120000, "DE", [bas, chen]),
        ("Northwind Traders", timedelta(days=9), 8000, "US", [chen]),
        ("Tailspin Toys", timedelta(days=4), 43500, "NL", []),
        ("<script>alert(1)</script> Ltd", timedelta(days=2), 1000, "GB", [anna]),
        ("Wide World Importers", timedelta(hours=5), 61000, "BE", [bas]),
    ]
    for customer, age, value, country, team in leads:
        world.add_lead(age=age, customer=customer, deal_value=value, country=country, team=team)
    answered = world.add_lead(
        age=timedelta(days=6), customer="Adventure Works", deal_value=15000, country="NL"
    )
    world.extra = '[server]\nlisten = "127.0.0.1:9"\n[console]\nsign_in = "none"\n'
    assert world.cli("run", "--once").code == 0
    world.sandbox.update(answered, status="Closed", substatus="Accepted")


def test_rows_are_in_deadline_order_and_the_countdown_ticks(
    world: World, run_daemon: Callable[..., str], browser: Any
) -> None:
    a_pipeline(world)
    base = run_daemon()
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(base + "/")
    customers = page.locator("#waiting tbody tr td.customer").all_inner_texts()
    assert customers[:2] == ["Fabrikam Customer Inc", "Contoso Pharmaceuticals"]
    assert customers[-1] == "Wide World Importers"
    deadlines = page.locator("#waiting time[data-deadline]").evaluate_all(
        "els => els.map(e => e.dataset.deadline)"
    )
    assert deadlines == sorted(deadlines)
    # the script replaced the server's "5h 59m" with a clock that ticks
    first = page.locator("#waiting time").first
    before = first.inner_text()
    assert re.fullmatch(r"\d\d:\d\d:\d\d", before), before
    page.wait_for_timeout(1100)
    assert first.inner_text() != before
    assert page.locator("text=<script>alert(1)</script> Ltd").count() == 1  # shown as text
    phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
    phone.goto(base + "/")
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scroll
    page.close()
    phone.close()


# --- the demo's console, as `referral-watch demo --console` leaves it --------------------------

TIERS = ("new", "reminder", "urgent", "final")


@pytest.fixture(scope="module")
def demo_console() -> Iterator[str]:
    """`demo --fast --console` at the story's end; its base URL."""
    from conftest import demo_console as running

    with running() as demo:
        yield demo.url


def tier_badges(page: Any) -> dict[str, dict[str, Any]]:
    """Per tier shown in the waiting list: the badge's colours and the meter's filled steps."""
    found: list[dict[str, Any]] = page.locator("#waiting td.tier-cell .tier").evaluate_all(
        """els => els.map(e => { const s = getComputedStyle(e);
             return {tier: e.innerText.trim(), background: s.backgroundColor, text: s.color,
                     border: s.borderLeftColor, steps: e.querySelectorAll('.meter i.on').length};
           })"""
    )
    return {badge.pop("tier"): badge for badge in found}


def test_the_demo_console_shows_each_tier_apart_and_is_pictured_in_the_docs(
    demo_console: str, browser: Any, tmp_path: Path
) -> None:
    import json
    import urllib.request

    with urllib.request.urlopen(demo_console + "/healthz", timeout=10) as health:
        assert json.loads(health.read())["status"] == "ok"
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(demo_console + "/")
    assert page.locator("#health.ok").count() == 1  # no false alarm at the story's end
    badges = tier_badges(page)
    assert set(badges) == set(TIERS), badges
    # each tier its own colours (reminder and urgent were alike), and a cue that needs no
    # colour vision: the meter fills one step more per tier
    looks = {(b["background"], b["text"], b["border"]) for b in badges.values()}
    assert len(looks) == len(TIERS), badges
    assert [badges[tier]["steps"] for tier in TIERS] == [1, 2, 3, 4]
    shots = DOCS if os.environ.get(SCREENSHOTS) == "docs" else tmp_path
    page.screenshot(path=str(shots / "console.png"))
    assert (shots / "console.png").stat().st_size > 10_000

    # the lead page: each message named for what it was, tries counted, Accept/Decline on top
    page.get_by_role("link", name="Wingtip Toys").click()
    messages = page.locator("#messages tbody tr")
    labels = messages.locator("td.message").all_inner_texts()
    team = [
        row.locator("td.message").inner_text()
        for row in messages.all()
        if row.locator("td").first.inner_text() == "team"
    ]
    assert team == [f"{tier} alert" for tier in TIERS], labels
    sent = [row for row in messages.all() if "sent" in row.inner_text()]
    assert sent and all(row.locator("td.num").inner_text() == "1" for row in sent)
    assert page.locator("dl.facts").inner_text().count("Last seen") == 1
    page.close()

    phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
    phone.goto(demo_console + "/")
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scroll
    card = phone.locator("#waiting tbody tr").first
    title, left = card.locator("td.customer"), card.locator("td.left")
    assert title.bounding_box()["y"] < left.bounding_box()["y"]  # the customer heads the card
    assert float(title.evaluate("e => parseFloat(getComputedStyle(e).fontSize)")) > 14
    phone.screenshot(path=str(shots / "console-phone.png"))
    phone.get_by_role("link", name="Wingtip Toys").click()
    facts = phone.locator("dl.facts").bounding_box()
    for button in ("#answer-accept", "#answer-decline"):
        box = phone.locator(button).bounding_box()
        assert box["y"] + box["height"] <= min(facts["y"], 844), button  # above the facts
        assert box["height"] >= 44 and box["width"] >= 120, button  # a thumb's size
    phone.close()


def test_the_console_has_an_icon(demo_console: str) -> None:
    import urllib.request

    with urllib.request.urlopen(demo_console + "/favicon.ico", timeout=10) as icon:
        assert icon.headers["Content-Type"] == "image/x-icon"
        assert icon.read(4) == b"\x00\x00\x01\x00"  # an ICO file


def test_search_box_filters_rows_without_a_reload(
    world: World, run_daemon: Callable[..., str], browser: Any
) -> None:
    a_pipeline(world)
    base = run_daemon()
    page = browser.new_page()
    page.goto(base + "/")
    from playwright.sync_api import expect

    visible = page.locator("#waiting tbody tr:visible td.customer")
    expect(visible).to_have_count(6)
    page.get_by_label("Search by customer, country or product").fill("nl")
    expect(visible).to_have_text(["Fabrikam Customer Inc", "Tailspin Toys"])
    page.get_by_label("Search by customer, country or product").fill("northwind")
    expect(visible).to_have_text(["Northwind Traders"])
    expect(page.locator("#count")).to_have_text("1 / 6")
    page.close()


def test_silencing_from_the_page_shows_in_status_json(
    world: World, run_daemon: Callable[..., str], browser: Any
) -> None:
    world.add_lead(age=timedelta(days=3), customer="Hush Corp")
    base = run_daemon()
    page = browser.new_page()
    page.goto(base + "/")
    page.get_by_role("link", name="Hush Corp").click()
    page.get_by_label("For how long (e.g. 4h, 2d)").fill("3d")
    page.get_by_label("Reason").fill("customer on holiday")
    page.get_by_role("button", name="Silence").click()
    page.wait_for_selector("#silence-state")
    [lead] = world.cli("status", "--json").json()
    assert lead["silence_reason"] == "customer on holiday"
    assert lead["silenced_until"] is not None
    page.get_by_role("button", name="Unsilence").click()
    page.wait_for_selector("form.silence")
    assert world.cli("status", "--json").json()[0]["silenced_until"] is None
    page.close()


def test_dutch_shows_dutch_words_and_numbers(
    world: World, run_daemon: Callable[..., str], browser: Any
) -> None:
    world.add_lead(age=timedelta(days=1), customer="Gouda Kaas BV", deal_value=25000)
    base = run_daemon(extra='[messages]\nlocale = "nl-NL"\ntimezone = "Europe/Amsterdam"\n')
    page = browser.new_page()
    page.goto(base + "/")
    row = page.locator("#waiting tbody tr").first
    assert "25.000 USD" in row.inner_text()
    assert page.get_by_role("heading", name=re.compile("Wachtende leads")).count() == 1
    page.close()


# --- with Microsoft sign-in (the fake identity endpoint over TLS) ----------------------------


@pytest.fixture
def idp() -> Iterator[Any]:
    from fakeidp import FakeIdP

    with FakeIdP(username="alice@contoso.example") as fake:
        yield fake


def entra_console(idp: Any, allowed: str = '["contoso.example"]') -> str:
    return (
        f'sign_in = "entra"\ntenant_id = "{idp.tenant}"\n'
        'client_id = "22222222-0000-0000-0000-000000000001"\nclient_secret = "console-secret"\n'
        f'authority = "{idp.url}"\nallowed = {allowed}\n'
        f'session_secret = "{"0123456789abcdef" * 4}"\n'
    )


def test_with_entra_an_anonymous_visit_goes_to_authorize_and_sign_in_lands_on_the_console(
    world: World, run_daemon: Callable[..., str], browser: Any, idp: Any
) -> None:
    lead = world.add_lead(age=timedelta(days=2), customer="Behind Sign-in BV")
    base = run_daemon(console=entra_console(idp), REQUESTS_CA_BUNDLE=str(idp.ca_path))
    context = browser.new_context(ignore_https_errors=True)  # the fake's throw-away CA
    page = context.new_page()
    seen: list[str] = []
    page.on("request", lambda request: seen.append(request.url))
    page.goto(base + "/")
    authorize = next(url for url in seen if "/oauth2/v2.0/authorize" in url)
    assert authorize.startswith(idp.url) and "code_challenge=" in authorize
    assert "code_challenge_method=S256" in authorize
    # the fake signed Alice in at once and sent the browser back: the console shows
    assert page.url == base + "/"
    assert page.get_by_role("link", name="Behind Sign-in BV").count() == 1
    assert "Alice Example" in page.locator("header").inner_text()
    # a POST without the CSRF token is refused, even with the session cookie
    status = page.evaluate(
        """async (id) => (await fetch('/leads/' + id + '/silence', {method: 'POST',
             headers: {'Content-Type': 'application/x-www-form-urlencoded'},
             body: 'duration=2d&reason=forged'})).status""",
        lead,
    )
    assert status == 403
    assert world.cli("status", "--json").json()[0]["silenced_until"] is None
    context.close()


def test_with_entra_a_user_outside_allowed_gets_403(
    world: World, run_daemon: Callable[..., str], browser: Any, idp: Any
) -> None:
    idp.username = "mallory@fabrikam.example"
    base = run_daemon(console=entra_console(idp), REQUESTS_CA_BUNDLE=str(idp.ca_path))
    context = browser.new_context(ignore_https_errors=True)
    page = context.new_page()
    response = page.goto(base + "/")
    assert response is not None and response.status == 403
    assert "mallory@fabrikam.example may not use this console" in page.content()
    context.close()


def daemon_with_links(
    world: World, idp: Any, label: str, extra: str = ""
) -> tuple[str, Daemon, str]:
    """A daemon whose console signs in at the fake identity endpoint, after its first reminder:
    its base URL, the daemon, and the ``label`` link as the team's JSON webhook received it."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    world.extra = (
        f'[schedule]\ninterval = "1h"\njitter = "0s"\n'
        f'[server]\nlisten = "127.0.0.1:{port}"\npublic_url = "{base}"\n'
        f"{extra}[console]\n{entra_console(idp)}"
    )
    world.write_config()
    since = datetime.now(UTC)
    daemon = Daemon(world, {"REQUESTS_CA_BUNDLE": str(idp.ca_path)})
    try:
        wait_until(lambda: _polled_since(base, since), what="the daemon's first poll")
        wait_until(lambda: len(world.team.bodies) >= 1, what="the reminder")
    except BaseException:
        daemon.stop()
        raise
    found = re.search(rf"\[{label}\]\(([^)]+)\)", str(world.team.bodies[0]["message"]))
    assert found is not None, world.team.bodies[0]
    return base, daemon, found.group(1)


# --- answering from an alert's link (SPEC 14) -------------------------------------------------


def test_accept_from_the_alert_link_answers_with_the_persons_own_token(
    world: World, browser: Any, idp: Any
) -> None:
    lead = world.add_lead(age=timedelta(days=10), customer="Answer Me BV")
    base, daemon, link = daemon_with_links(world, idp, "Accept")
    try:
        assert link == f"{base}/leads/{lead}/answer?action=accept"  # plain: no secret in it

        context = browser.new_context(ignore_https_errors=True)  # the fake's throw-away CA
        page = context.new_page()
        page.goto(link)  # signs in at the fake identity endpoint, lands back on the answer page
        assert page.url == link
        assert page.locator("#answer-customer").inner_text() == "Answer Me BV"
        assert world.sandbox.requests[-1].method == "GET"  # opening the link answered nothing
        world.sandbox.more_tokens.update(idp.issued_access_tokens)  # Alice's token is valid
        page.click("#confirm")
        page.wait_for_url(f"{base}/leads/{lead}")
        assert "alice@contoso.example" in page.locator("#answers").inner_text()
        assert "accepted" in page.locator("h1").inner_text()

        [patch] = [r for r in world.sandbox.requests if r.method == "PATCH"]
        token = patch.headers["Authorization"].removeprefix("Bearer ")
        assert token in idp.issued_access_tokens  # the person's own delegated token...
        assert token != "sandbox-token"  # ...not the daemon's
        assert patch.json()[1] == {"op": "replace", "path": "/substatus", "value": "Accepted"}

        def told() -> bool:
            return any(
                "Accepted by Alice Example via referral-watch" in str(body["message"])
                for body in world.team.bodies
            )

        wait_until(told, what="on_resolved hearing who accepted")
        [entry] = world.cli("status", "--json", "--all").json()
        assert entry["resolution"] == "accepted"
        assert entry["answered_by"]["who"] == "alice@contoso.example"
        context.close()
    finally:
        log = daemon.stop()
    # the answer is logged with the person's email, never with a token
    assert '"event": "answer.done"' in log and "alice@contoso.example" in log
    assert all(issued not in log for issued in idp.issued_access_tokens)


# --- taking a lead from an alert's link (SPEC 17) ---------------------------------------------


def test_take_it_from_the_alert_link_makes_the_person_the_owner_and_the_team_hears_it(
    world: World, browser: Any, idp: Any
) -> None:
    from receivers import SmtpReceiver

    lead = world.add_lead(age=timedelta(days=3), customer="Take Me BV")
    with SmtpReceiver() as owners:
        world.channels["owners"] = owners.mailto_url(to="sales@example.com")
        claims = '[claims]\nowner_channel = "owners"\n'
        base, daemon, link = daemon_with_links(world, idp, "Take it", extra=claims)
        try:
            assert link == f"{base}/leads/{lead}/claim"  # plain: no secret in it

            context = browser.new_context(ignore_https_errors=True)  # the fake's throw-away CA
            page = context.new_page()
            page.goto(link)  # signs in at the fake identity endpoint, back on the claim page
            assert page.url == link
            assert page.locator("#claim-customer").inner_text() == "Take Me BV"
            assert world.cli("status", "--json").json()[0]["claimed_by"] is None
            page.click("#confirm")
            page.wait_for_url(f"{base}/leads/{lead}")
            assert "Taken by Alice Example" in page.locator("#owner-state").inner_text()
            page.goto(base + "/")  # the list shows the owner too
            owner = page.locator("#waiting tbody tr td.owner-cell").first.inner_text()
            assert "Alice Example" in owner

            def told() -> bool:
                return any(
                    "Take Me BV taken by Alice Example" in str(body["title"])
                    for body in world.team.bodies
                )

            wait_until(told, what="the team hearing who took it")
            claimed = world.cli("status", "--json").json()[0]["claimed_by"]
            assert claimed["email"] == "alice@contoso.example" and claimed["via"] == "alert"
            context.close()
        finally:
            daemon.stop()
