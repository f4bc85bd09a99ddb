"""The fault suite: what goes wrong in production, and what the operator sees when it does.

Every test runs the real thing (the sandbox Partner Center over HTTP, a real state file, Apprise
to local webhook receivers, the CLI in-process or the daemon as a subprocess), injects one fault,
checks the one or two lines the operator gets, and then proves that nothing was lost: once the
fault is gone, every alert arrives exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from referral_watch.config import Config
from referral_watch.config.loader import load_config
from referral_watch.cycle.result import CycleResult
from referral_watch.cycle.runner import Cycle
from referral_watch.notify import Notifier
from referral_watch.partner_center.auth import EnvTokenProvider
from referral_watch.partner_center.client import PartnerCenter
from referral_watch.sandbox.records import make_referral
from referral_watch.state.schema import SCHEMA_VERSION
from referral_watch.state.store import Store

from conftest import TOKEN_ENV, World, wait_until

# Every status the Referrals API documents for a list request.
DOCUMENTED = (400, 401, 403, 404, 409, 412, 429, 500, 502, 503, 504)
RETRIED = frozenset({429, 502, 503, 504})  # retried by the client (4 times) before failing


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    # world.cli() points structlog at pytest's captured stderr, which is closed after the test;
    # leave logging as we found it so later tests in the session do not write to a closed file.
    yield
    structlog.reset_defaults()


def titles(receiver: Any) -> list[str]:
    return [str(body["title"]) for body in receiver.bodies]


def leads_view(world: World) -> list[tuple[str, str | None, tuple[str, ...]]]:
    """What `status --json --all` says about each lead, minus the ticking clock."""
    shown = world.cli("status", "--json", "--all").json()
    return sorted((e["id"], e["resolution"], tuple(e["tiers_sent"])) for e in shown)


def small_pages(world: World, leads: int = 5) -> list[str]:
    """`leads` leads over pages of two, so there is a first, a middle and a last page."""
    world.sandbox.max_page_size = 2
    return [
        world.add_lead(age=timedelta(hours=2 + n), customer=f"Known Customer {n}")
        for n in range(leads)
    ]


# --- every documented API status, on the first and on a later page ------------------------


@pytest.mark.parametrize("page", [0, 1], ids=["first-page", "later-page"])
@pytest.mark.parametrize("status", DOCUMENTED)
def test_an_api_error_fails_the_poll_and_changes_nothing(
    world: World, status: int, page: int
) -> None:
    small_pages(world)
    assert world.cli("run", "--once").code == 0
    before = leads_view(world)
    sent = len(world.team.bodies)
    newcomer = world.add_lead(age=timedelta(minutes=5), customer="Newcomer Ltd")

    # 401 gets one token refresh, the retried statuses four retries: fail every attempt.
    times = 5 if status in RETRIED else 2
    world.sandbox.fail(status, page=page, times=times, retry_after=0 if status in RETRIED else None)
    failed = world.cli("run", "--once")

    # The operator sees one line naming the status, exit 1, no traceback.
    assert failed.code == 1
    assert failed.out.startswith("Poll failed: ")
    assert str(status) in failed.out
    assert "Traceback" not in failed.out + failed.err
    # Nothing was concluded: no lead added (the newcomer was on the first page), none marked
    # gone for missing from an incomplete poll, nothing sent.
    assert leads_view(world) == before
    assert len(world.team.bodies) == sent

    world.sandbox.clear_faults()
    recovered = world.cli("run", "--once")
    assert recovered.code == 0, recovered.out
    assert "1 new" in recovered.out
    assert len(world.team.bodies) == sent + 1
    assert "Newcomer Ltd" in titles(world.team)[-1]
    assert {entry[0] for entry in leads_view(world)} == {e[0] for e in before} | {newcomer}


# --- answers cut off, pages that never end, paging loops ----------------------------------


def test_an_answer_cut_off_mid_body_is_retried_and_the_poll_completes(world: World) -> None:
    ids = small_pages(world)
    # Content-Length promises more than is sent: the connection drops mid-body, once.
    world.sandbox.fail(0, page=1, truncate=True, body=b'{"value": [{"id": "half')
    result = world.cli("run", "--once")
    assert result.code == 0, result.out
    assert "Polled 5 leads (5 new" in result.out
    assert sorted(e[0] for e in leads_view(world)) == sorted(ids)
    assert len(world.team.bodies) == 5


def test_a_body_that_is_not_json_fails_the_poll_without_concluding(world: World) -> None:
    small_pages(world)
    assert world.cli("run", "--once").code == 0
    before = leads_view(world)
    world.sandbox.fail(0, page=2, body=b'{"value": [{"id": "x"')  # complete HTTP, broken JSON
    result = world.cli("run", "--once")
    assert result.code == 1
    assert "unreadable page (page 3)" in result.out
    assert leads_view(world) == before  # the leads on page 3 are not "gone"


def _cycle(world: World, config: Config, api: PartnerCenter, clock: Any = None) -> CycleResult:
    with Store(config.state.path) as store:
        notifier = Notifier(config.channels)
        if clock is None:
            return Cycle(config, store, api, notifier).run()
        return Cycle(config, store, api, notifier, clock).run()


def _short_timeout_client(world: World, config: Config) -> PartnerCenter:
    fast = config.partner_center.model_copy(update={"timeout": timedelta(seconds=0.5)})
    # No sleeping between attempts: the backoff is tested in test_partner_center.
    return PartnerCenter(fast, EnvTokenProvider(TOKEN_ENV), max_retries=1)


def test_a_page_that_never_ends_times_out_and_concludes_nothing(world: World) -> None:
    small_pages(world)
    assert world.cli("run", "--once").code == 0
    before = leads_view(world)
    config = load_config(world.write_config())
    world.sandbox.fail(0, page=1, hang=True, times=2)
    with _short_timeout_client(world, config) as api:
        result = _cycle(world, config, api)
    assert not result.poll_ok
    assert result.error is not None
    assert "did not answer after 2 attempts: timed out" in result.error
    assert leads_view(world) == before


def test_a_next_link_that_loops_to_itself_is_refused(world: World) -> None:
    small_pages(world)
    assert world.cli("run", "--once").code == 0
    before = leads_view(world)
    asked = world.sandbox.requests[0].query  # the client's own first request
    first = httpx.get(
        f"{world.sandbox.base_url}/engagements/referrals",
        params=asked,
        headers={"Authorization": "Bearer sandbox-token"},
    ).json()
    own_link = first["@odata.nextLink"]  # page 2's own address
    loop = json.dumps({"value": first["value"], "@odata.nextLink": own_link}).encode()
    world.sandbox.fail(0, page=1, body=loop)
    result = world.cli("run", "--once")
    assert result.code == 1
    assert "paging loop" in result.out
    assert leads_view(world) == before  # nothing past the loop is taken for gone


# --- odd data ---------------------------------------------------------------------------------


def test_a_page_with_the_same_lead_twice_stores_and_announces_it_once(world: World) -> None:
    now = datetime.now(UTC)
    record = make_referral(customer="Twice Shown Ltd", created=now - timedelta(hours=1))
    other = make_referral(customer="Once Shown BV", created=now - timedelta(hours=2))
    world.sandbox.add(record, other)
    world.sandbox.fail(0, page=0, body=json.dumps({"value": [record, other, record]}).encode())
    result = world.cli("run", "--once")
    assert result.code == 0, result.out
    assert "Polled 3 leads (2 new" in result.out
    heard = titles(world.team)
    assert len(heard) == 2
    assert sum("Twice Shown Ltd" in t for t in heard) == 1
    assert sum("Once Shown BV" in t for t in heard) == 1
    assert sorted(e[0] for e in leads_view(world)) == sorted([record["id"], other["id"]])


def test_a_lead_whose_deadline_moves_is_tracked_and_never_demoted(world: World) -> None:
    now = datetime.now(UTC)
    lead = world.add_lead(
        age=timedelta(days=1), customer="Moving Target Inc", expiration=now + timedelta(days=13)
    )
    assert world.cli("run", "--once").code == 0
    assert len(world.team.bodies) == 1  # "new"

    # Partner Center brings the deadline forward to tomorrow: urgent, for team and managers.
    soon = now + timedelta(days=1)
    world.sandbox.update(lead, expirationDateTime=soon.strftime("%Y-%m-%dT%H:%M:%S.0000000Z"))
    moved = world.cli("run", "--once")
    assert moved.code == 0, moved.out
    assert len(world.team.bodies) == 2
    assert len(world.managers.bodies) == 1
    assert "Moving Target Inc" in titles(world.managers)[0]
    status = world.cli("status", "--json").json()[0]
    assert 0 < status["remaining_seconds"] <= 86400
    assert status["tiers_sent"] == ["new", "urgent"]

    # And back out to ten days: shown as such, but nobody is told "reminder" after "urgent".
    later = now + timedelta(days=10)
    world.sandbox.update(lead, expirationDateTime=later.strftime("%Y-%m-%dT%H:%M:%S.0000000Z"))
    assert world.cli("run", "--once").code == 0
    assert len(world.team.bodies) == 2
    assert len(world.managers.bodies) == 1
    assert world.cli("status", "--json").json()[0]["remaining_seconds"] > 9 * 86400


# --- the state file ---------------------------------------------------------------------


def _prepared_state(world: World) -> bytes:
    """A state file from a successful cycle, with its WAL folded in (one file to compare)."""
    world.add_lead(age=timedelta(hours=1), customer="Stored Lead Ltd")
    assert world.cli("run", "--once").code == 0
    db = sqlite3.connect(world.state_path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return world.state_path.read_bytes()


@pytest.mark.parametrize("command", [("run", "--once"), ("status",)])
def test_a_corrupt_state_file_is_reported_and_left_alone(
    world: World, command: tuple[str, ...]
) -> None:
    _prepared_state(world)
    damaged = b"garbage!" * 512 + world.state_path.read_bytes()[4096:]
    world.state_path.write_bytes(damaged)
    for suffix in ("-wal", "-shm"):
        Path(f"{world.state_path}{suffix}").unlink(missing_ok=True)
    result = world.cli(*command)
    assert result.code == 1
    assert "corrupt" in result.err and "backup" in result.err
    assert "Traceback" not in result.out + result.err
    assert world.state_path.read_bytes() == damaged
    assert world.team.bodies[1:] == []  # nothing sent on a state we cannot read


@pytest.mark.parametrize("command", [("run", "--once"), ("status",)])
def test_a_state_file_from_a_newer_version_is_refused_and_left_alone(
    world: World, command: tuple[str, ...]
) -> None:
    _prepared_state(world)
    db = sqlite3.connect(world.state_path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    before = world.state_path.read_bytes()
    world.add_lead(age=timedelta(minutes=1), customer="Not Yet Seen")
    result = world.cli(*command)
    assert result.code == 1
    assert "newer referral-watch" in result.err and "upgrade" in result.err
    assert world.state_path.read_bytes() == before
    assert len(world.team.bodies) == 1


def test_a_read_only_state_file_is_reported_and_left_alone(world: World) -> None:
    """Simulated: root may write to a chmod 0444 file, so the store's connection is opened
    read-only (SQLite's mode=ro), as it is on a read-only mount (see the next test)."""
    before = _prepared_state(world)
    connect = sqlite3.connect

    def read_only(path: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        return connect(f"file:{path}?mode=ro", *args, uri=True, **kwargs)

    world.add_lead(age=timedelta(minutes=1), customer="Not Yet Seen")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sqlite3, "connect", read_only)
        result = world.cli("run", "--once")
    assert result.code == 1
    assert "read-only" in result.err and "write access" in result.err
    assert "Traceback" not in result.out + result.err
    assert world.state_path.read_bytes() == before
    assert len(world.team.bodies) == 1

    recovered = world.cli("run", "--once")  # write access back: the new lead is announced
    assert recovered.code == 0, recovered.out
    assert "Not Yet Seen" in titles(world.team)[-1]
    assert len(world.team.bodies) == 2


def _mount_tmpfs(where: Path) -> bool:
    where.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(where)], capture_output=True)
    except OSError:
        return False
    return done.returncode == 0


def test_a_state_file_on_a_read_only_mount_is_reported_and_left_alone(world: World) -> None:
    mount = world.tmp / "ro"
    if not _mount_tmpfs(mount):
        pytest.skip("mounting needs root with CAP_SYS_ADMIN; the simulated test covers this")
    try:
        world.config_path.parent.mkdir(exist_ok=True)
        original = world.state_path
        state = mount / "state.db"
        world.add_lead(age=timedelta(hours=1), customer="Stored Lead Ltd")
        world.write_config()
        text = world.config_path.read_text().replace(str(original), str(state))
        config = world.tmp / "ro.toml"
        config.write_text(text)
        run = ["--config", str(config), "--log-format", "json", "run", "--once"]
        assert _cli(world, run)[0] == 0
        db = sqlite3.connect(state)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.close()
        before = state.read_bytes()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        world.add_lead(age=timedelta(minutes=1), customer="Not Yet Seen")
        code, _, err = _cli(world, run)
        assert code == 1
        assert "read-only file system" in err.lower() and "write access" in err
        assert "Traceback" not in err
        assert state.read_bytes() == before
        assert len(world.team.bodies) == 1
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def _cli(world: World, args: list[str]) -> tuple[int, str, str]:
    from referral_watch import cli

    world.capsys.readouterr()
    try:
        cli.main(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = world.capsys.readouterr()
    return code, captured.out, captured.err


def test_a_full_disk_during_the_poll_changes_nothing(world: World) -> None:
    """Simulated: SQLite's max_page_count caps the file just above its size, so the poll's
    transaction fails with SQLITE_FULL ("database or disk is full") as on a full disk."""
    before = _prepared_state(world)
    pages = len(before) // 4096
    connect = sqlite3.connect

    def nearly_full(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        db = connect(*args, **kwargs)
        db.execute(f"PRAGMA max_page_count = {pages + 1}")
        return db

    notes = "A long story. " * 300  # a few pages' worth per lead
    for n in range(20):
        world.add_lead(age=timedelta(minutes=n + 1), customer=f"Overflow {n:02d}", notes=notes)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sqlite3, "connect", nearly_full)
        result = world.cli("run", "--once")
    assert result.code == 1
    assert "no space left for state file" in result.err and "nothing was changed" in result.err
    assert "Traceback" not in result.out + result.err
    assert len(world.team.bodies) == 1  # no alert went out for leads that were not stored
    assert world.state_path.read_bytes()[:100] == before[:100]
    assert [e[2] for e in leads_view(world)] == [("new",)]  # the old state, intact

    recovered = world.cli("run", "--once")  # space again: all 20 arrive, as one digest
    assert recovered.code == 0, recovered.out
    assert "20 new" in recovered.out
    assert len(world.team.bodies) == 2
    assert len(leads_view(world)) == 21


# --- signals and the clock ----------------------------------------------------------------


def test_sigterm_during_delivery_finishes_the_message_in_flight_and_loses_none(
    world: World,
) -> None:
    world.extra = '[schedule]\ninterval = "1h"\njitter = "0s"\n'
    customers = [f"Urgent Account {n}" for n in range(4)]
    for name in customers:  # four urgent leads: four single messages to each channel
        world.add_lead(age=timedelta(days=12, hours=6), customer=name)
    world.team.delay = world.managers.delay = 0.4  # slow channels: SIGTERM comes mid-delivery
    with world.daemon() as daemon:
        wait_until(
            lambda: len(world.team.requests) + len(world.managers.requests) >= 1,
            what="a message",
        )
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=30)
    # The operator sees a clean stop: exit 0, "stopping" then "stopped" in the log.
    assert daemon.returncode == 0, err
    assert "daemon.stopping" in err and "daemon.stopped" in err
    assert "Traceback" not in err
    first_team, first_managers = len(world.team.bodies), len(world.managers.bodies)
    assert first_team + first_managers < 8  # it did stop early

    rest = world.cli("run", "--once")
    assert rest.code == 0, rest.out
    for receiver in (world.team, world.managers):
        heard = titles(receiver)
        assert len(heard) == 4  # every message exactly once across the stop
        assert sorted(name for name in customers for t in heard if name in t) == customers


def test_the_clock_jumping_backwards_repeats_nothing_and_loses_nothing(world: World) -> None:
    start = datetime.now(UTC)
    lead = world.add_lead(age=timedelta(hours=1), now=start, customer="Time Traveller Ltd")
    config = load_config(world.write_config())
    moments = iter(
        [start, start + timedelta(days=8), start + timedelta(days=1), start + timedelta(days=12)]
    )
    now = next(moments)

    def clock() -> datetime:
        return now

    def cycle() -> CycleResult:
        with PartnerCenter(config.partner_center, EnvTokenProvider(TOKEN_ENV)) as api:
            return _cycle(world, config, api, clock)

    assert cycle().ok
    assert len(world.team.bodies) == 1  # new
    now = next(moments)
    assert cycle().ok
    assert len(world.team.bodies) == 2  # reminder, a week later
    now = next(moments)  # the clock jumps back a week
    backwards = cycle()
    assert backwards.ok and backwards.delivered == 0 and backwards.failed == 0
    assert len(world.team.bodies) == 2  # nothing again
    now = next(moments)  # and forward again: urgent is due, and only that
    assert cycle().ok
    assert len(world.team.bodies) == 3
    assert len(world.managers.bodies) == 1
    assert "Time Traveller Ltd" in titles(world.managers)[0]
    with Store(config.state.path) as store:
        shown = store.lead(lead)
    assert shown is not None and shown.tiers_sent == ("new", "reminder", "urgent")


# --- start-up -----------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["status", "--check"]])
def test_help_and_health_check_do_not_load_apprise_or_msal(world: World, args: list[str]) -> None:
    world.write_config()
    code = (
        "import sys\n"
        "from referral_watch import cli\n"
        "try:\n"
        f"    cli.main(['--config', {str(world.config_path)!r}, *{args!r}])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('apprise', 'msal'))\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ}
    )
    assert "HEAVY []" in done.stderr, done.stderr
