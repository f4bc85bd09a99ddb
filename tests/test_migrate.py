"""`referral-watch state migrate --to URL`: a SQLite state into an empty PostgreSQL database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from referral_watch.model import AuditEntry
from referral_watch.state.lock import InstanceLock
from referral_watch.state.store import Store
from referral_watch.state.webhook_events import WebhookEvent

from conftest import World
from pgserver import PostgresServer


def lived_in_state(world: World) -> list[str]:
    """A state file with something in every table, as months of running leave it."""
    leads = [
        world.add_lead(age=timedelta(hours=1), customer="Fresh Inc"),
        world.add_lead(age=timedelta(days=12, hours=3), customer="Urgent Ltd"),
        world.add_lead(age=timedelta(days=3), customer="Answered BV"),
    ]
    assert world.cli("run", "--once").code == 0
    world.sandbox.update(leads[2], substatus="Accepted", status="Active")
    assert world.cli("run", "--once").code == 0
    assert world.cli("silence", leads[0][:8], "--for", "1d", "--reason", "on it").code == 0
    now = datetime.now(UTC)
    with Store(world.state_path) as store:
        store.quarantine("record:abc", "parse", "no createdDateTime", now, raw="{}")
        store.record_answer(
            AuditEntry(leads[1], now, "ann@contoso.com", "Ann", "console", "decline", "refused")
        )
        store.add_webhook_event(WebhookEvent("evt-1", "referral-created", leads[0], None), now)
    return leads


def test_migrate_copies_every_table_and_the_database_carries_on(world: World, pg_url: str) -> None:
    leads = lived_in_state(world)
    before = world.cli("status", "--json", "--all").json()
    sent = len(world.team.bodies) + len(world.managers.bodies)
    moved = world.cli("state", "migrate", "--to", pg_url)
    assert moved.code == 0, moved.err
    for table in ("leads", "outbox", "silences", "polls", "meta", "quarantine", "audit"):
        assert any(line.split()[:1] == [table] for line in moved.out.splitlines()), table
    assert "webhook_events" in moved.out and "(differs)" not in moved.out
    world.state_url = pg_url
    after = world.cli("status", "--json", "--all").json()
    for lead in before + after:  # the clock moved on between the two
        lead.pop("remaining_seconds")
    assert after == before
    assert world.cli("run", "--once").code == 0
    assert len(world.team.bodies) + len(world.managers.bodies) == sent  # history came along
    with Store(pg_url) as store:
        newer = store.enqueue_message("ops", "team", "t", "b", datetime.now(UTC))
        assert newer > max(
            row[0] for row in store.db.execute("SELECT id FROM outbox WHERE id < ?", (newer,))
        )
        assert store.audit(leads[1])[0].who == "ann@contoso.com"
        assert [q.key for q in store.quarantined()] == ["record:abc"]
    world.add_lead(age=timedelta(hours=2), customer="After The Move")
    assert world.cli("run", "--once").code == 0
    assert "After The Move" in str(world.team.bodies[-1])


def test_a_database_with_rows_is_refused_and_left_as_it_was(
    world: World, pg_url: str, postgres: PostgresServer
) -> None:
    lived_in_state(world)
    assert world.cli("state", "migrate", "--to", pg_url).code == 0
    counted = postgres.sql(pg_url, "SELECT count(*) FROM outbox")
    world.add_lead(age=timedelta(hours=1), customer="Later")
    assert world.cli("run", "--once").code == 0
    again = world.cli("state", "migrate", "--to", pg_url)
    assert again.code == 1
    assert "not empty" in again.err and "table leads has 3 rows" in again.err
    assert postgres.sql(pg_url, "SELECT count(*) FROM outbox") == counted


def test_a_state_file_in_use_is_refused(world: World, pg_url: str) -> None:
    lived_in_state(world)
    with InstanceLock(world.state_path.with_name("state.db.lock")):
        refused = world.cli("state", "migrate", "--to", pg_url)
    assert refused.code == 1
    assert "another referral-watch process holds the state lock" in refused.err


def test_migrate_wants_a_postgresql_url_and_an_existing_file(world: World, pg_url: str) -> None:
    wrong = world.cli("state", "migrate", "--to", "sqlite:///elsewhere.db")
    assert wrong.code == 2 and "postgresql://" in wrong.err
    missing = world.cli("state", "migrate", "--to", pg_url)
    assert missing.code == 1 and "nothing to migrate" in missing.err
