"""The state's webhook events: a v1 file migrates, redeliveries are recognised (the tests
taking `state_location` run on SQLite and on PostgreSQL)."""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from referral_watch.state.pool import POOL_SIZE, StorePool
from referral_watch.state.store import Store
from referral_watch.state.webhook_events import WEBHOOK_KEYS_KEPT, WebhookEvent

NOW = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)


def event(key: str, lead: str | None = "lead-1") -> WebhookEvent:
    return WebhookEvent(key, "referral-created", lead, "2026-11-24T08:59:00Z")


def test_a_version_1_file_gains_the_table_and_keeps_its_leads(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    from referral_watch.state.schema import MIGRATIONS

    db.executescript(MIGRATIONS[1])
    db.execute("INSERT INTO meta (key, value) VALUES ('kept', 'yes')")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    with Store(path) as store:
        assert store.get_meta("kept") == "yes"
        assert store.add_webhook_event(event("a"), NOW)
        assert store.last_webhook_event() == NOW


def test_the_same_event_twice_is_stored_once(state_location: Path | str) -> None:
    with Store(state_location) as store:
        assert store.add_webhook_event(event("a"), NOW) is True
        assert store.add_webhook_event(event("a"), NOW + timedelta(seconds=5)) is False
        assert store.add_webhook_event(event("b"), NOW + timedelta(seconds=6)) is True
        assert store.pending_webhook_leads() == ["lead-1"]  # one lead, two events


def test_handled_events_leave_the_queue_and_are_pruned_after_a_week(
    state_location: Path | str,
) -> None:
    with Store(state_location) as store:
        store.add_webhook_event(event("a", "lead-1"), NOW)
        store.add_webhook_event(event("b", "lead-2"), NOW + timedelta(seconds=1))
        store.add_webhook_event(event("test", None), NOW)  # a test event needs no work
        assert store.pending_webhook_leads() == ["lead-1", "lead-2"]
        with store.transaction():
            store.webhook_events_handled(["lead-1"], NOW)
        assert store.pending_webhook_leads() == ["lead-2"]
        store.prune(NOW + WEBHOOK_KEYS_KEPT + timedelta(hours=1), timedelta(days=30))
        assert store.pending_webhook_leads() == ["lead-2"]  # never drop work not done
        # a redelivery of the pruned event is new again; the pending one is still known
        assert store.add_webhook_event(event("a"), NOW + WEBHOOK_KEYS_KEPT) is True
        assert store.add_webhook_event(event("b", "lead-2"), NOW + WEBHOOK_KEYS_KEPT) is False


def test_the_first_test_event_since_a_moment_is_found(state_location: Path | str) -> None:
    with Store(state_location) as store:
        test = WebhookEvent("t1", "test-created", None, None)
        assert store.add_webhook_event(test, NOW)
        assert store.webhook_event_since("test-created", NOW + timedelta(seconds=1)) is None
        assert store.webhook_event_since("test-created", NOW) == NOW
        assert store.pending_webhook_leads() == []  # a test event needs no work


def test_many_threads_share_a_few_state_connections(state_location: Path | str) -> None:
    """The webhook receiver's threads (up to 40) borrow from a pool of POOL_SIZE connections."""
    pool = StorePool(state_location, write_wait=5.0)
    lent, most, lock = 0, 0, threading.Lock()
    start = threading.Barrier(24)
    connections: set[int] = set()

    def one(n: int) -> None:
        nonlocal lent, most
        start.wait()
        with pool.lend(30.0) as store:
            with lock:
                lent += 1
                most = max(most, lent)
                connections.add(id(getattr(store.db, "conn", store.db)))
            assert store.add_webhook_event(event(f"e{n}", f"lead-{n}"), NOW)
            time.sleep(0.02)
            with lock:
                lent -= 1

    threads = [threading.Thread(target=one, args=(n,)) for n in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert 1 < most <= POOL_SIZE and len(connections) <= POOL_SIZE
        with pool.lend(5.0) as store:
            assert len(store.pending_webhook_leads()) == 24  # every event stored
    finally:
        pool.close()
