"""`run --once --dry-run`: every message shown with its channel and recipients, nothing sent,
nothing recorded (the real run afterwards sends what the dry run showed)."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path

from conftest import World
from receivers import SmtpReceiver


def snapshot(state: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every row that matters of the state file: leads, outbox, polls, meta."""
    db = sqlite3.connect(state)
    try:
        return {
            table: db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
            for table in ("leads", "outbox", "polls", "meta", "silences")
        }
    finally:
        db.close()


def test_dry_run_prints_every_message_sends_and_records_nothing(world: World) -> None:
    with SmtpReceiver() as smtp:
        world.channels = {"managers": smtp.mailto_url(to="sales-managers@example.com")}
        world.add_lead(age=timedelta(days=1), customer="Fresh Lead Ltd")
        world.add_lead(age=timedelta(days=12, hours=12), customer="Urgent Lead BV")

        first = world.cli("run", "--once", "--dry-run")
        assert first.code == 0, first.err
        assert "Fresh Lead Ltd" in first.out and "Urgent Lead BV" in first.out
        assert "sales-managers@example.com" in first.out  # the email channel's recipients
        assert f"team -> json://127.0.0.1:{world.team.port}/hook" in first.out
        assert "a real run would send 3 message(s) (managers 1, team 2)" in first.out
        assert not world.state_path.exists()  # a first dry run creates no state file
        assert world.team.requests == [] and world.managers.requests == []
        assert smtp.messages == []

        real = world.cli("run", "--once")
        assert real.code == 0, real.err
        assert "3 messages delivered" in real.out
        assert len(world.team.requests) == 2 and len(smtp.messages) == 1

        # With a state: a new lead and a due reminder; the dry run changes none of it.
        world.add_lead(age=timedelta(days=2), customer="Later Lead GmbH")
        before = snapshot(world.state_path)
        again = world.cli("run", "--dry-run")  # --dry-run alone is one cycle too
        assert again.code == 0, again.err
        assert "Later Lead GmbH" in again.out
        assert "Fresh Lead Ltd" not in again.out  # already told: not shown again
        assert "a real run would send 1 message(s) (team 1)" in again.out
        assert snapshot(world.state_path) == before  # outbox, leads, polls: unchanged
        assert len(world.team.requests) == 2 and len(smtp.messages) == 1

        # The real run sends what the dry run showed: the dry run did not record the lead.
        after = world.cli("run", "--once")
        assert "1 messages delivered" in after.out
        assert "Later Lead GmbH" in world.team.bodies[-1]["title"]


def test_dry_run_masks_secrets_in_channel_urls(world: World) -> None:
    world.channels = {"team": "slack://T1JJ3T3L2/A1BRTD4JD/TIiajkdnlazkcOXrIdevi7/#sales"}
    world.add_lead(age=timedelta(days=1), customer="Fresh Lead Ltd")
    shown = world.cli("run", "--once", "--dry-run")
    assert shown.code == 0, shown.err
    assert "Fresh Lead Ltd" in shown.out
    assert "TIiajkdnlazkcOXrIdevi7" not in shown.out
    assert "team -> slack://" in shown.out


def test_dry_run_of_a_failing_poll_exits_1_and_records_nothing(world: World) -> None:
    world.cli("run", "--once")  # a state file with one good poll
    before = snapshot(world.state_path)
    world.sandbox.token = "another-token"  # ours is refused now
    failed = world.cli("run", "--once", "--dry-run")
    assert failed.code == 1
    assert "Poll failed" in failed.out
    assert snapshot(world.state_path) == before  # not even the failed poll is recorded


def test_dry_run_on_postgresql_records_nothing(world: World, pg_url: str) -> None:
    import psycopg

    def rows() -> list[object]:
        with psycopg.connect(pg_url) as conn:
            return [
                conn.execute(f"SELECT count(*) FROM {table}").fetchone()
                for table in ("leads", "outbox", "polls")
            ]

    world.state_url = pg_url
    world.add_lead(age=timedelta(days=1), customer="Fresh Lead Ltd")
    assert world.cli("run", "--once").code == 0
    world.add_lead(age=timedelta(days=2), customer="Later Lead GmbH")
    before = rows()
    shown = world.cli("run", "--once", "--dry-run")
    assert shown.code == 0, shown.err
    assert "Later Lead GmbH" in shown.out and "Fresh Lead Ltd" not in shown.out
    assert rows() == before
    assert len(world.team.requests) == 1
