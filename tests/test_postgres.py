"""State in PostgreSQL (`state.url`), end to end: the CLI against the sandbox, with the state in
a real PostgreSQL server started by the test suite (pgserver.py)."""

from __future__ import annotations

import re
import threading
from datetime import timedelta

import pytest

from referral_watch.config.loader import parse_config
from referral_watch.errors import ConfigError, StateError
from referral_watch.state.dialect import SCHEMA_LOCK, WRITE_LOCK, connect_pg, pg_ddl
from referral_watch.state.replica import Leadership
from referral_watch.state.schema import MIGRATIONS, SCHEMA_VERSION
from referral_watch.state.store import Store

from conftest import LOCAL, World, free_port, wait_until
from pgserver import PostgresServer


@pytest.fixture
def pg_world(world: World, pg_url: str) -> World:
    world.state_url = pg_url
    return world


def test_run_once_keeps_the_state_in_postgresql(pg_world: World) -> None:
    lead = pg_world.add_lead(age=timedelta(hours=1), customer="Fabrikam Customer Inc")
    first = pg_world.cli("run", "--once")
    assert first.code == 0, first.err
    assert len(pg_world.team.bodies) == 1
    assert pg_world.cli("run", "--once").code == 0
    assert len(pg_world.team.bodies) == 1  # nothing twice
    shown = pg_world.cli("status", "--json").json()
    assert [(x["id"], x["tiers_sent"]) for x in shown] == [(lead, ["new"])]
    assert not pg_world.state_path.exists()  # no SQLite file on the side
    assert pg_world.cli("silence", lead[:8], "--for", "2d").code == 0
    assert pg_world.cli("status", "--json").json()[0]["silenced_until"] is not None
    assert pg_world.cli("status", "--check").code == 0


def test_status_before_the_first_cycle_says_what_to_run(pg_world: World) -> None:
    shown = pg_world.cli("status")
    assert shown.code == 1
    assert "run --once" in shown.err and "Traceback" not in shown.err


def test_run_once_is_refused_while_a_replica_is_active(pg_world: World, pg_url: str) -> None:
    pg_world.add_lead(age=timedelta(hours=1))
    active = Leadership(pg_url, "the test's replica")
    assert active.check()
    try:
        refused = pg_world.cli("run", "--once")
        assert refused.code == 3
        assert "another referral-watch replica is active" in refused.err
        assert pg_world.team.bodies == []
    finally:
        active.stop()
    assert pg_world.cli("run", "--once").code == 0
    assert len(pg_world.team.bodies) == 1


def test_an_unreachable_database_fails_the_run_without_the_password(pg_world: World) -> None:
    pg_world.state_url = f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/none"
    pg_world.add_lead(age=timedelta(hours=1))
    failed = pg_world.cli("run", "--once")
    assert failed.code == 1
    assert "unreachable" in failed.err and "127.0.0.1" in failed.err
    assert "hunter2" not in failed.err + failed.out
    assert "Traceback" not in failed.err
    assert pg_world.team.bodies == []


def test_a_database_that_refuses_connections_fails_the_run_and_the_next_catches_up(
    pg_world: World, postgres: PostgresServer, pg_url: str
) -> None:
    pg_world.add_lead(age=timedelta(hours=1))
    assert pg_world.cli("run", "--once").code == 0
    lead = pg_world.add_lead(age=timedelta(hours=2), customer="Second Lead")
    name = pg_url.rsplit("/", 1)[1]  # made by the fixture, not data
    postgres.sql(postgres.url(), f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
    try:
        failed = pg_world.cli("run", "--once")
    finally:
        postgres.sql(postgres.url(), f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
    assert failed.code == 1 and "Traceback" not in failed.err
    assert len(pg_world.team.bodies) == 1
    assert pg_world.cli("run", "--once").code == 0
    assert len(pg_world.team.bodies) == 2 and lead in str(pg_world.team.bodies[1])


BASE = """
[auth]
method = "env"
token_env = "T"
[[policy.tiers]]
name = "new"
remaining = "14d"
notify = ["team"]
[channels]
team = "json://localhost"
"""


def test_state_url_and_path_are_one_or_the_other() -> None:
    both = '[state]\npath = "/tmp/x.db"\nurl = "postgresql://rw@db/rw"\n' + BASE
    with pytest.raises(ConfigError, match=r"state: set either path \(SQLite\) or url"):
        parse_config(both)
    wrong = '[state]\nurl = "mysql://rw@db/rw"\n' + BASE
    with pytest.raises(ConfigError, match=r"state.*must be a PostgreSQL URL"):
        parse_config(wrong)
    config = parse_config(
        '[state]\nurl = "postgresql://rw:${PW}@db/rw"\n' + BASE, env={"PW": "pa55", "T": "x"}
    )
    assert config.state.location == "postgresql://rw:pa55@db/rw"
    assert config.state.shown == "postgresql://rw:***@db/rw"


def test_a_standby_serves_the_console_read_only(pg_world: World, pg_url: str) -> None:
    from starlette.testclient import TestClient

    from referral_watch.config.loader import load_config
    from referral_watch.daemon import Daemon
    from referral_watch.web.app import build_app

    lead = pg_world.add_lead(age=timedelta(days=1), customer="Seen From A Standby")
    assert pg_world.cli("run", "--once").code == 0
    pg_world.extra = (
        '[server]\nlisten = "127.0.0.1:9464"\n[console]\nsign_in = "none"\n'
        '[claims]\nowner_channel = "owners"\n'
    )
    pg_world.channels["owners"] = "mailto://u:p@localhost?to=sales@example.com"
    daemon = Daemon(load_config(pg_world.write_config()))
    active = Leadership(pg_url, "the active replica")
    assert active.check()
    daemon.leadership = Leadership(pg_url, "this standby")
    try:
        assert not daemon.leadership.check()  # the other one holds the lock
        client = TestClient(build_app(daemon), base_url=LOCAL)
        page = client.get(f"/leads/{lead}")
        assert page.status_code == 200 and "Seen From A Standby" in page.text
        assert client.get("/healthz").json()["role"] == "standby"
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token is not None
        refused = client.post(
            f"/leads/{lead}/silence", data={"duration": "2d", "csrf": token.group(1)}
        )
        assert refused.status_code == 409 and "standby" in refused.text
        assert pg_world.cli("status", "--json").json()[0]["silenced_until"] is None
        for action in ("claim", "unclaim"):  # claims too (SPEC 17): the active one writes
            form = {"csrf": token.group(1), "via": "console"}
            refused = client.post(f"/leads/{lead}/{action}", data=form)
            assert refused.status_code == 409 and "standby" in refused.text, action
        assert pg_world.cli("status", "--json").json()[0]["claimed_by"] is None
    finally:
        daemon.leadership.stop()
        active.stop()


def test_a_process_that_waited_while_another_created_the_schema_finds_it_current(
    pg_url: str,
) -> None:
    """Replicas started together on an empty database: the one that waits while another
    creates the schema finds it current afterwards instead of creating it again (issue 26:
    `relation "leads" already exists` killed 1 to 3 of 4 replicas)."""
    first = connect_pg(pg_url, "test")  # another replica, in the middle of creating the schema
    first.execute("BEGIN")
    first.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
    first.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
    opened: dict[str, object] = {}

    def open_second() -> None:
        try:
            with Store(pg_url) as store:
                opened["leads"] = store.leads()
        except StateError as exc:
            opened["error"] = str(exc)

    second = threading.Thread(target=open_second)
    second.start()
    waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    wait_until(lambda: first.execute(waiting).fetchone()[0] > 0, 20, "the second to wait")
    for version in range(1, SCHEMA_VERSION + 1):
        for statement in pg_ddl(MIGRATIONS[version]).split(";"):
            if statement.strip():
                first.execute(statement)
    first.execute("CREATE TABLE schema_version (version BIGINT NOT NULL)")
    first.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION,))
    first.execute("COMMIT")
    second.join(30)
    first.close()
    assert opened == {"leads": []}
