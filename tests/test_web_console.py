"""The console in-process (Starlette's TestClient): pages, the JSON API, CSRF, escaping,
headers, 404s, pagination. State comes from real `run --once` cycles against the sandbox."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from starlette.testclient import TestClient

from referral_watch.config.loader import load_config
from referral_watch.daemon import Daemon
from referral_watch.state.store import Store
from referral_watch.web.app import build_app

from conftest import LOCAL, World

CONSOLE = '[server]\nlisten = "127.0.0.1:9464"\n[console]\nsign_in = "none"\n'


def console(world: World, extra: str = "") -> TestClient:
    world.extra = CONSOLE + extra
    daemon = Daemon(load_config(world.write_config()))
    with Store(world.state_path) as store:
        daemon.last_success = store.last_success()
    return TestClient(build_app(daemon), base_url=LOCAL)


def polled(world: World, **leads: timedelta) -> dict[str, str]:
    """Add leads (customer -> age) to the sandbox, run one cycle; customer -> id."""
    ids = {name: world.add_lead(age=age, customer=name) for name, age in leads.items()}
    world.extra = CONSOLE
    assert world.cli("run", "--once").code == 0
    return ids


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


def test_index_lists_waiting_leads_most_urgent_first_with_deadlines_for_the_countdown(
    world: World,
) -> None:
    polled(
        world,
        **{"Later Ltd": timedelta(days=1), "Soonest BV": timedelta(days=13, hours=20)},
        **{"Middle GmbH": timedelta(days=8)},
    )
    client = console(world)
    page = client.get("/")
    assert page.status_code == 200
    order = [page.text.index(name) for name in ("Soonest BV", "Middle GmbH", "Later Ltd")]
    assert order == sorted(order)
    deadlines = re.findall(r'data-deadline="([^"]+)"', page.text)
    assert deadlines == sorted(deadlines) and len(deadlines) == 3
    assert "sev-failure" in page.text  # the final tier is due for Soonest BV
    assert "Healthy" in page.text


def test_the_banner_is_red_with_the_reason_when_polls_fail(world: World) -> None:
    polled(world, **{"Any Co": timedelta(days=1)})
    world.sandbox.token = "not-ours-any-more"
    world.cli("run", "--once")
    client = console(world)
    client.app.state.host.last_success = datetime.now(UTC) - timedelta(days=1)
    page = client.get("/")
    assert 'class="banner bad"' in page.text
    assert "Not healthy" in page.text
    banner = page.text[page.text.index('id="health"') : page.text.index("<main")]
    assert "sign-in expired" in banner and "referral-watch login" in banner


def test_customer_markup_is_shown_as_text(world: World) -> None:
    polled(world, **{"<script>alert(1)</script> & Co": timedelta(days=1)})
    client = console(world)
    page = client.get("/")
    assert "<script>alert(1)</script>" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; Co" in page.text
    lead_id = re.search(r'href="/leads/([^"]+)"', page.text)
    assert lead_id
    detail = client.get(f"/leads/{lead_id.group(1)}")
    assert "<script>alert" not in detail.text


def test_the_api_returns_what_status_json_prints(world: World) -> None:
    polled(world, **{"Api One": timedelta(days=2), "Api Two": timedelta(days=3)})
    expected = world.cli("status", "--json").json()
    response = console(world).get("/api/leads")
    assert response.headers["cache-control"] == "no-store"  # lead data: no copy kept anywhere
    api = response.json()
    for row in (*expected, *api):
        row.pop("remaining_seconds")  # a second may pass between the two
    assert api == expected


def test_the_api_comes_in_pages_linked_by_next_and_all_streams_every_lead(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from referral_watch.web import console as console_module

    monkeypatch.setattr(console_module, "API_PAGE", 2)
    now = datetime.now(UTC)
    ids = {n: world.add_lead(age=timedelta(days=n), now=now, customer=f"P{n}") for n in range(5)}
    world.add_lead(age=timedelta(days=1), now=now, customer="Same deadline as P1")
    assert world.cli("run", "--once").code == 0
    world.sandbox.remove(ids[3])  # gone meanwhile: resolved, only in ?all=1
    assert world.cli("run", "--once").code == 0
    client = console(world)

    pages, url = [], "/api/leads"
    while url:
        response = client.get(url)
        assert response.status_code == 200
        assert response.headers["cache-control"] == "no-store"
        pages.append(response.json())
        link = response.headers.get("link")
        found = re.fullmatch(r'<([^>]+)>; rel="next"', link) if link else None
        url = found.group(1) if found else ""
    assert [len(page) for page in pages] == [2, 2, 1]
    every = [row for page in pages for row in page]
    expected = world.cli("status", "--json").json()
    streamed = client.get("/api/leads?all=1").json()
    everything = world.cli("status", "--json", "--all").json()
    for row in (*expected, *every, *streamed, *everything):
        row.pop("remaining_seconds")
    assert every == expected  # the same leads in the same order, each once
    assert streamed == everything and len(everything) == 6

    refused = client.get("/api/leads?after=not-a-cursor")
    assert refused.status_code == 400
    assert "start again from /api/leads" in refused.text


def test_silence_and_unsilence_from_the_lead_page_need_the_csrf_token(world: World) -> None:
    ids = polled(world, **{"Quiet Please": timedelta(days=1)})
    lead = ids["Quiet Please"]
    client = console(world)
    page = client.get(f"/leads/{lead}")
    assert page.status_code == 200
    refused = client.post(f"/leads/{lead}/silence", data={"duration": "2d", "reason": "x"})
    assert refused.status_code == 403
    forged = client.post(
        f"/leads/{lead}/silence", data={"duration": "2d", "csrf": "guess", "reason": "x"}
    )
    assert forged.status_code == 403
    assert world.cli("status", "--json").json()[0]["silenced_until"] is None

    token = csrf_of(page.text)
    done = client.post(
        f"/leads/{lead}/silence",
        data={"duration": "2d", "reason": "on holiday", "csrf": token},
        follow_redirects=False,
    )
    assert done.status_code == 303
    shown = world.cli("status", "--json").json()[0]
    assert shown["silenced_until"] is not None and shown["silence_reason"] == "on holiday"
    assert "on holiday" in client.get(f"/leads/{lead}").text

    client.post(f"/leads/{lead}/unsilence", data={"csrf": token})
    assert world.cli("status", "--json").json()[0]["silenced_until"] is None


def test_a_bad_silence_duration_is_explained_and_changes_nothing(world: World) -> None:
    ids = polled(world, **{"Odd Input": timedelta(days=1)})
    lead = ids["Odd Input"]
    client = console(world)
    token = csrf_of(client.get(f"/leads/{lead}").text)
    for duration in ("soon", "0s", "1000w"):
        answer = client.post(f"/leads/{lead}/silence", data={"duration": duration, "csrf": token})
        assert answer.status_code == 200
        assert "at most a year" in answer.text
    assert world.cli("status", "--json").json()[0]["silenced_until"] is None


def test_the_lead_page_lists_each_message_per_channel(world: World) -> None:
    ids = polled(world, **{"History Inc": timedelta(days=13)})
    page = console(world).get(f"/leads/{ids['History Inc']}")
    assert page.status_code == 200
    cells = re.findall(r'<td data-label="Channel">(\w+)</td>', page.text)
    assert set(cells) == {"team", "managers"}
    assert "sent" in page.text and "urgent" in page.text
    assert "skipped (a more urgent tier was due)" in page.text  # "new" and "reminder"


def test_the_lead_page_names_each_message_after_its_tier_and_counts_its_tries(
    world: World,
) -> None:
    ids = polled(world, **{"Tiers Inc": timedelta(days=13)})  # urgent due: new, reminder skipped
    page = console(world).get(f"/leads/{ids['Tiers Inc']}")
    rows = re.findall(r"<tr>\s*(.*?)</tr>", page.text.split('id="messages"', 1)[1], re.S)
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in rows]
    team = {row[1]: (row[2], row[-1]) for row in cells if row and row[0] == "team"}
    assert team == {
        "new alert": ("skipped (a more urgent tier was due)", "–"),
        "reminder alert": ("skipped (a more urgent tier was due)", "–"),
        "urgent alert": ("sent", "1"),  # one try, the one that worked: not "0"
    }


def test_last_seen_of_a_watched_lead_is_the_last_poll_even_when_it_did_not_change(
    world: World,
) -> None:
    from referral_watch.state.journal import PollRecord

    ids = polled(world, **{"Steady BV": timedelta(days=3)})
    later = datetime(2031, 5, 6, 7, 8, tzinfo=UTC)  # a poll that found it unchanged
    with Store(world.state_path) as store:
        store.record_poll(PollRecord(started=later, finished=later, ok=True, fetched=1))
    page = console(world).get(f"/leads/{ids['Steady BV']}")
    seen = re.search(r"<dt>Last seen</dt><dd>([^<]*)</dd>", page.text)
    assert seen is not None and seen.group(1) == "5/6/31, 7:08 AM", seen


def test_dutch_locale_and_time_zone(world: World) -> None:
    world.add_lead(age=timedelta(days=1), customer="Gouda BV", deal_value=25000)
    polled(world)
    client = console(world, '[messages]\nlocale = "nl-NL"\ntimezone = "Europe/Amsterdam"\n')
    page = client.get("/")
    assert "25.000 USD" in page.text
    assert "Wachtende leads" in page.text
    assert 'lang="nl"' in page.text
    assert "Europe/Amsterdam" in page.text


def test_search_on_the_server_filters_by_customer_and_country(world: World) -> None:
    world.add_lead(age=timedelta(days=1), customer="Amsterdam Trading", country="NL")
    world.add_lead(age=timedelta(days=1), customer="Berlin Handel", country="DE")
    polled(world)
    client = console(world)
    by_name = client.get("/", params={"q": "amsterdam"}).text
    assert "Amsterdam Trading" in by_name and "Berlin Handel" not in by_name
    by_country = client.get("/", params={"q": '"DE"'}).text
    assert "Berlin Handel" in by_country and "Amsterdam Trading" not in by_country
    none = client.get("/", params={"q": "100%_"}).text
    assert "No waiting lead matches." in none


def test_a_long_list_is_paged(world: World) -> None:
    now = datetime.now(UTC)
    for n in range(205):
        world.add_lead(age=timedelta(days=1, minutes=n), now=now, customer=f"Bulk {n:03}")
    polled(world)
    client = console(world)
    first = client.get("/").text
    assert first.count("data-deadline=") == 200
    assert "Page 1 of 2" in first
    second = client.get("/", params={"page": "2"}).text
    assert second.count("data-deadline=") == 5
    assert "Bulk 000" in second  # the least urgent come last


def test_static_files_and_nothing_else(world: World) -> None:
    client = console(world)
    css = client.get("/static/console.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert client.get("/static/console.js").status_code == 200
    for path in (
        "/static/../app.py",
        "/static/%2e%2e/app.py",
        "/static/..%2fapp.py",
        "/static/app.py",
        "/leads/../../etc/passwd",
        "/leads/no-such-lead",
        "/nothing",
    ):
        answer = client.get(path)
        assert answer.status_code == 404, path
        assert "import" not in answer.text


def test_pages_carry_the_security_headers_and_no_inline_script(world: World) -> None:
    polled(world, **{"Header Co": timedelta(days=1)})
    page = console(world).get("/")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert re.search(r"<script>(?!</script>)", page.text) is None
    cookie = page.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie


def test_without_a_console_section_only_health_and_metrics_are_served(world: World) -> None:
    world.extra = '[server]\nlisten = "0.0.0.0:9464"\n'
    client = TestClient(build_app(Daemon(load_config(world.write_config()))), base_url=LOCAL)
    assert client.get("/").status_code == 404
    assert client.get("/api/leads").status_code == 404
    assert client.get("/healthz").status_code == 503


@pytest.mark.parametrize(
    ("listen", "ok"), [("127.0.0.1:9464", True), ("[::1]:9464", True), ("0.0.0.0:9464", False)]
)
def test_check_config_refuses_no_sign_in_off_loopback(world: World, listen: str, ok: bool) -> None:
    world.extra = f'[server]\nlisten = "{listen}"\n[console]\nsign_in = "none"\n'
    outcome = world.cli("check-config")
    assert outcome.code == (0 if ok else 2), outcome.err
    if not ok:
        assert "console.sign_in" in outcome.err and "0.0.0.0:9464" in outcome.err


def test_check_config_refuses_no_sign_in_behind_an_https_proxy(world: World) -> None:
    world.extra = (
        '[server]\nlisten = "127.0.0.1:9464"\npublic_url = "https://leads.contoso.example"\n'
        '[console]\nsign_in = "none"\n'
    )
    outcome = world.cli("check-config")
    assert outcome.code == 2
    assert "console.sign_in" in outcome.err and "server.public_url" in outcome.err
    assert "Traceback" not in outcome.err


@pytest.mark.parametrize("tenant", ["common", "organizations", "Consumers"])
def test_check_config_refuses_a_tenant_that_lets_any_organization_in(
    world: World, tenant: str
) -> None:
    world.extra = f"""
[server]
listen = "127.0.0.1:9464"
public_url = "https://leads.contoso.example"
[console]
tenant_id = "{tenant}"
client_id = "22222222-0000-0000-0000-000000000001"
client_secret = "console-secret"
allowed = ["contoso.example"]
session_secret = "{"0123456789abcdef" * 4}"
"""
    outcome = world.cli("check-config")
    assert outcome.code == 2
    assert "console.tenant_id" in outcome.err and tenant in outcome.err


def test_records_set_aside_are_listed_so_nobody_thinks_they_were_handled(world: World) -> None:
    polled(world, **{"Fine Co": timedelta(days=1)})
    with Store(world.state_path) as store:
        store.quarantine(
            "bad-record-1", "parse", "createdDateTime 'soon' is not a time", datetime.now(UTC)
        )
    page = console(world).get("/")
    table = page.text[page.text.index('id="set-aside"') :]
    assert "bad-record-1" in table and "createdDateTime" in table and "parse" in table
    assert "Fine Co" in page.text  # the other leads are still shown


HOSTILE = [
    ("<!channel> <@U123> <http://evil.example|click>", "&lt;!channel&gt;"),
    (
        "[click](http://evil.example) ![x](http://evil.example/p.png)",
        "[click](http://evil.example)",
    ),
    ('"><img src=x onerror=alert(1)>', "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;"),
    ('=HYPERLINK("http://evil.example")', "=HYPERLINK(&#34;http://evil.example&#34;)"),
    ("Müller & Söhne 🚀 شركة", "Müller &amp; Söhne 🚀 شركة"),
]


@pytest.mark.parametrize(("customer", "shown"), HOSTILE)
def test_hostile_customer_text_is_shown_as_text_on_both_pages(
    world: World, customer: str, shown: str
) -> None:
    ids = polled(world, **{customer: timedelta(days=1)})
    client = console(world)
    for path in ("/", f"/leads/{ids[customer]}"):
        html = client.get(path).text
        assert shown in html, path
        assert "<img" not in html and "<!channel>" not in html
        assert 'href="http://evil.example' not in html


def test_the_banner_follows_the_health_verdict_and_its_reason(world: World) -> None:
    """Whatever the verdict weighs (polls, stuck deliveries, a standby), the banner says it."""
    polled(world, **{"Any Co": timedelta(days=1)})
    client = console(world)
    host = client.app.state.host  # type: ignore[attr-defined]
    host.health = lambda: (False, {"status": "stuck", "reason": "deliveries stuck for 2h"})
    page = client.get("/").text
    assert 'class="banner bad"' in page and "deliveries stuck for 2h" in page
    host.health = lambda: (False, {"status": "unreachable", "role": "standby"})
    page = client.get("/").text
    assert "Health check: unreachable" in page and "standby" in page


@pytest.mark.parametrize(
    "host",
    ["rebound.example", "rebound.example:9464", "127.0.0.1.rebound.example", "localhost:x"],
)
def test_a_foreign_host_gets_421_but_the_probes_answer_any(world: World, host: str) -> None:
    """DNS rebinding: a page that re-points its own name at 127.0.0.1 reads nothing."""
    polled(world, **{"Rebound Co": timedelta(days=1)})
    client = console(world)
    for path in ("/", "/api/leads", "/leads/x", "/auth/login"):
        refused = client.get(path, headers={"Host": host})
        assert refused.status_code == 421, path
        assert "Rebound Co" not in refused.text
    assert client.post("/leads/x/silence", headers={"Host": host}).status_code == 421
    assert client.get("/healthz", headers={"Host": host}).status_code == 200
    assert client.get("/metrics", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize(
    "host", ["127.0.0.1:9464", "localhost:9464", "LOCALHOST", "[::1]:9464", "10.1.2.3:9464"]
)
def test_the_listen_address_localhost_and_addresses_are_served(world: World, host: str) -> None:
    polled(world, **{"Local Co": timedelta(days=1)})
    page = console(world).get("/", headers={"Host": host})
    assert page.status_code == 200 and "Local Co" in page.text


def test_the_public_url_host_is_served(world: World) -> None:
    polled(world, **{"Proxied Co": timedelta(days=1)})
    world.extra = CONSOLE.replace(
        'listen = "127.0.0.1:9464"', 'listen = "127.0.0.1:9464"\npublic_url = "http://leads.lan"'
    )
    daemon = Daemon(load_config(world.write_config()))
    client = TestClient(build_app(daemon), base_url="http://leads.lan")
    assert "Proxied Co" in client.get("/").text
    assert client.get("/", headers={"Host": "other.lan"}).status_code == 421
